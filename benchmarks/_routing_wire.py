"""Where a routed transaction's time goes on the wire and in the server (issue 17).

    python benchmarks/_routing_wire.py [--pg-url URL] [--rounds N] [--out FILE] [--parts tflp]

The routing benchmark's fleet (``_routing_fleet.build_fleet``), then raw libpq calls
through psycopg's ``pgconn`` (no psycopg cursor, no SQLAlchemy), one thread, each
transaction a point select by ``(tenant_id, id)`` of a random tenant and row, ended
by ROLLBACK. The variants differ only in how the transaction begins:

- ``bare``: ``BEGIN``, the select of the table without a policy (3 round trips);
- ``fence apart``: ``BEGIN``, then the signed fence as its own statement (extended
  protocol, unnamed), then the select of the signed table (4 round trips);
- ``fence with BEGIN, simple``: what the router sent until issue 17's fourth round,
  ``BEGIN; SELECT tenantry.fence('t', 's')`` as one simple-protocol query (3 round
  trips; the signature in the SQL text, so in ``pg_stat_activity``);
- ``... open table``: the same, then the select of the table without a policy (what
  the fence costs without the policy);
- ``fence prepared, pipelined``: ``BEGIN`` and a server-side prepared fence
  (``EXECUTE`` of a statement prepared once per connection) sent in one pipeline,
  one sync (3 round trips);
- ``fence EXECUTE ..., simple``: ``BEGIN; EXECUTE wire_fence('t', 's')`` as one simple
  query, the fence prepared once per connection;
- ``fence unnamed, pipelined``: what the router sends since the fourth round, the
  same pipeline with an unnamed statement (parsed each time), its values bound;
- ``set_config with BEGIN``: ``BEGIN; SELECT set_config('tenantry.tenant_id', 't',
  true)``, then the select of the table with the classic policy (the hand-written
  pattern, in one message).

And, on an operations-role connection (superuser; a temporary sequence of its own),
and as the routing role where it may call them, the pieces of the fence's body, each
in ``BEGIN; SELECT ...`` then ROLLBACK: nothing (``SELECT 1``), the fence and copies
of it with one part left out or done another way (:func:`fence_bodies`), the stamp's
``setval``, three ``set_config(..., true)``. The same functions again in a loop of
transactions inside the server (:func:`loop_variants`), where neither the messages
nor the client are counted. And the policy's predicate per statement
(:func:`policy_variants`), with two other ``tenantry.tenant()`` bodies under a real
policy. ``--parts`` picks the sections.

Per variant: the wall time per transaction (p50, p90), the client's CPU per
transaction (``time.thread_time``), and the server backend's CPU per transaction
(``/proc/<pid>/schedstat``: the server runs on this machine), whose difference to
the wall is the waiting: the round trips, the scheduler. Rounds interleave the
variants in a fresh random order, 20 transactions each.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import load_average, markdown_table, pg_servers
from _procfs import schedstat_ns
from _routing_fleet import QUICK, SHARD_NAME, build_fleet
from psycopg import pq
from sqlalchemy.pool import NullPool

from tenantry.shardmap.drivers import make_engine

SELECT = b"SELECT tenant_id, id, charger, kwh FROM {table} WHERE tenant_id = $1 AND id = $2::int4"
FENCE = b"SELECT tenantry.fence($1, $2)"
OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
BATCH = 20


def _check(result: Any) -> Any:
    if result.status not in OK:
        raise RuntimeError(result.get_error_message("utf8") or str(result.status))
    return result


def _quote(value: str) -> bytes:
    assert value.replace("_", "").replace(":", "").replace("-", "").isalnum()
    return b"'" + value.encode() + b"'"


def variants(fleet: Any, routing: Any) -> dict[str, tuple[Any, Callable[..., None]]]:
    """name -> (pgconn, one transaction of tenant t, row i)."""
    key = fleet.catalog.fence_key(SHARD_NAME)
    pid = routing.backend_pid
    signatures = {t: key.sign(t, pid) for t in fleet.tenants}
    signed = SELECT.replace(b"{table}", b"bench_readings")
    open_ = SELECT.replace(b"{table}", b"bench_readings_open")
    classic = SELECT.replace(b"{table}", b"bench_readings_classic")
    _check(routing.prepare(b"tenantry_fence", FENCE))

    def select(conn: Any, sql: bytes, t: str, i: int) -> None:
        result = _check(conn.exec_params(sql, [t.encode(), str(i).encode()]))
        if result.ntuples != 1:
            raise RuntimeError("the point select found no row")

    def end(conn: Any) -> None:
        _check(conn.exec_(b"ROLLBACK"))

    def bare(count: int) -> Callable[[str, int], None]:
        def tx(t: str, i: int) -> None:
            _check(routing.exec_(b"BEGIN"))
            for _ in range(count):
                select(routing, open_, t, i)
            end(routing)

        return tx

    def fence_apart(t: str, i: int) -> None:
        _check(routing.exec_(b"BEGIN"))
        _check(routing.exec_params(FENCE, [t.encode(), signatures[t].encode()]))
        select(routing, signed, t, i)
        end(routing)

    def simple(table: bytes, count: int = 1) -> Callable[[str, int], None]:
        def tx(t: str, i: int) -> None:
            fence = b"BEGIN; SELECT tenantry.fence(%s, %s)" % (_quote(t), _quote(signatures[t]))
            if routing.exec_(fence).get_value(0, 0) != b"active":
                raise RuntimeError("the fence did not answer active")
            for _ in range(count):
                select(routing, table, t, i)
            end(routing)

        return tx

    _check(routing.exec_(b"PREPARE wire_fence(text, text) AS SELECT tenantry.fence($1, $2)"))

    def execute(t: str, i: int) -> None:
        fence = b"BEGIN; EXECUTE wire_fence(%s, %s)" % (_quote(t), _quote(signatures[t]))
        if routing.exec_(fence).get_value(0, 0) != b"active":
            raise RuntimeError("the fence did not answer active")
        select(routing, signed, t, i)
        end(routing)

    def pipelined(prepared: bool) -> Callable[[str, int], None]:
        def tx(t: str, i: int) -> None:
            params = [t.encode(), signatures[t].encode()]
            routing.enter_pipeline_mode()
            routing.send_query_params(b"BEGIN", None)
            if prepared:
                routing.send_query_prepared(b"tenantry_fence", params)
            else:
                routing.send_query_params(FENCE, params)
            routing.pipeline_sync()
            values = []
            for _ in range(2):
                result = _check(routing.get_result())
                values.append(result.get_value(0, 0) if result.ntuples else None)
                if routing.get_result() is not None:
                    raise RuntimeError("a second result")
            if routing.get_result().status != pq.ExecStatus.PIPELINE_SYNC:
                raise RuntimeError("no sync")
            routing.exit_pipeline_mode()
            if values[1] != b"active":
                raise RuntimeError("the fence did not answer active")
            select(routing, signed, t, i)
            end(routing)

        return tx

    def setting(count: int) -> Callable[[str, int], None]:
        def tx(t: str, i: int) -> None:
            begin = b"BEGIN; SELECT set_config('tenantry.tenant_id', %s, true)" % _quote(t)
            _check(routing.exec_(begin))
            for _ in range(count):
                select(routing, classic, t, i)
            end(routing)

        return tx

    return {
        "bare (no fence, no policy)": (routing, bare(1)),
        "bare, 5 selects": (routing, bare(5)),
        "fence apart (4 round trips)": (routing, fence_apart),
        "fence with BEGIN, simple (the router's until round 4)": (routing, simple(signed)),
        "fence with BEGIN, simple, open table": (routing, simple(open_)),
        "fence with BEGIN, simple, 5 selects": (routing, simple(signed, 5)),
        "fence with BEGIN, simple, open table, 5 selects": (routing, simple(open_, 5)),
        "fence prepared, pipelined with BEGIN": (routing, pipelined(True)),
        "fence EXECUTE of a prepared statement, with BEGIN, simple": (routing, execute),
        "fence unnamed, pipelined with BEGIN (the router's)": (routing, pipelined(False)),
        "set_config with BEGIN, classic policy": (routing, setting(1)),
        "set_config with BEGIN, classic policy, 5 selects": (routing, setting(5)),
    }


# -- the fence's body, piece by piece ---------------------------------------------------

#: The policy's function and the fence body of the shard's current revision.
_FENCE_REVISION = "0006_fence_cost.py"
_SD = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"


def _revision(name: str) -> Any:
    path = Path(__file__).parents[1] / "tenantry/shardmap/alembic_shard/versions" / name
    spec = importlib.util.spec_from_file_location(f"tenantry_wire_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cut(body: str, old: str, new: str) -> str:
    if old not in body:
        raise RuntimeError(f"the fence body has no {old[:40]!r}: update _routing_wire.py")
    return body.replace(old, new)


# -- alternatives measured and not adopted (issue 17, round 4) --------------------------

#: The current transaction's start in microseconds, as the stamp hashes it.
_MICROS = (
    "(pg_catalog.date_part('epoch', pg_catalog.transaction_timestamp())"
    " OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8"
)
_SETTING = "pg_catalog.current_setting('tenantry.tenant_id', true)"
_STAMP_OID = "pg_catalog.to_regclass('pg_temp.tenantry_transaction')"

#: ``tenantry.tenant()`` as one RETURN expression (s0004's: a DECLARE, two IFs).
ALT_TENANT_ONE_EXPRESSION = f"""
BEGIN
  RETURN CASE WHEN pg_catalog.currval({_STAMP_OID})
                   OPERATOR(pg_catalog.=) pg_catalog.hashtextextended({_SETTING}, {_MICROS})
                   AND {_SETTING} OPERATOR(pg_catalog.<>) ''
              THEN {_SETTING} END;
END
"""
#: ``tenantry.tenant()`` in SQL, which the planner inlines into the policy (it must be
#: VOLATILE for that: currval is).
ALT_TENANT_SQL = f"""
SELECT CASE WHEN pg_catalog.currval({_STAMP_OID})
                 OPERATOR(pg_catalog.=) pg_catalog.hashtextextended({_SETTING}, {_MICROS})
                 AND {_SETTING} OPERATOR(pg_catalog.<>) ''
            THEN {_SETTING} END
"""

_SHAPE_BAD = """p_tenant IS NULL OR v_colon IS NULL OR v_colon < 2 OR v_colon > 10
     OR length(p_signature) <> v_colon + 64
     OR ltrim(left(p_signature, v_colon - 1), '0123456789') <> ''
     OR ltrim(substr(p_signature, v_colon + 1), '0123456789abcdef') <> ''"""

#: What follows the read in both alternatives: the fence's own checks and settings.
_AFTER_READ = """
  IF v_valid IS NOT TRUE THEN
    RAISE EXCEPTION 'tenantry: the fence signature for tenant "%" does not verify here',
      p_tenant USING ERRCODE = '28000';
  END IF;
  IF v_stamp IS NULL THEN
    PERFORM tenantry.open_session(true);
  ELSIF v_may_set THEN
    IF session_user <> current_user
       AND NOT (SELECT o.rolsuper OR o.rolbypassrls FROM pg_roles o
                 WHERE o.rolname = session_user) THEN
      RAISE EXCEPTION 'tenantry: the routing role "%" may set the fence''s stamp', session_user
        USING ERRCODE = '42501';
    END IF;
  END IF;
  v_done := set_config('tenantry.signature',
                       left(p_signature, v_colon)
                       || setval('pg_temp.tenantry_transaction', {stamp}, true), true)
            || set_config('tenantry.tenant_id', p_tenant, true);
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
"""
_HMAC_VALID = """sha256(k.opad || sha256(k.ipad || convert_to(p_tenant, 'UTF8')
                                 || int4send(pg_backend_pid())))
           = decode(substr(p_signature, {colon} + 1), 'hex')"""
_STAMP_COLUMNS = """to_regclass('pg_temp.tenantry_transaction'),
         has_sequence_privilege(session_user, to_regclass('pg_temp.tenantry_transaction'),
                                'UPDATE')"""
_DECLARE = """
DECLARE
  v_colon int4{colon};
  v_state text;
  v_valid boolean;
  v_stamp regclass;
  v_may_set boolean;
  v_done text;
BEGIN"""

#: The fence with the stamp's checks (existence, privilege) as columns of the read.
ALT_FENCE_CHECKS_IN_READ = (
    _DECLARE.replace("{colon}", " := strpos(p_signature, ':')")
    + f"""
  IF {_SHAPE_BAD} THEN
    RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
  END IF;
  SELECT r.state, {_HMAC_VALID.replace("{colon}", "v_colon")}, {_STAMP_COLUMNS}
    INTO v_state, v_valid, v_stamp, v_may_set
    FROM tenantry.fence_keys k LEFT JOIN {{residency}} r ON r.tenant_id = p_tenant
   WHERE k.key_id = left(p_signature, v_colon - 1)::int4;"""
    + _AFTER_READ
)
#: The same, and the signature's shape checked by the read too (on the error path only
#: by an expression of its own).
ALT_FENCE_ALL_IN_READ = (
    _DECLARE.replace("{colon}", "")
    + f"""
  SELECT s.colon, r.state, {_HMAC_VALID.replace("{colon}", "s.colon")}, {_STAMP_COLUMNS}
    INTO v_colon, v_state, v_valid, v_stamp, v_may_set
    FROM (SELECT strpos(p_signature, ':') AS colon) s
         JOIN tenantry.fence_keys k
           ON k.key_id = CASE WHEN NOT ({_SHAPE_BAD.replace("v_colon", "s.colon")})
                              THEN left(p_signature, s.colon - 1)::int4 END
         LEFT JOIN {{residency}} r ON r.tenant_id = p_tenant;
  IF v_valid IS NULL THEN
    v_colon := strpos(p_signature, ':');
    IF {_SHAPE_BAD} THEN
      RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
    END IF;
  END IF;"""
    + _AFTER_READ
)
_KEY_ID = "left(p_signature, strpos(p_signature, ':') - 1)::int4"
_GENERIC = " SET plan_cache_mode = force_generic_plan"


def alternative_bodies(residency: str) -> dict[str, tuple[str, str]]:
    """name -> (function options, plpgsql body): the fence's alternatives, and its
    read alone."""
    revision = _revision(_FENCE_REVISION)
    stamp = revision._STAMP
    body = revision._FENCE_BODY.replace("{residency}", residency)
    checks = ALT_FENCE_CHECKS_IN_READ.replace("{residency}", residency).replace("{stamp}", stamp)
    every = ALT_FENCE_ALL_IN_READ.replace("{residency}", residency).replace("{stamp}", stamp)
    return {
        "alt.: the stamp's checks in the read": (_SD, checks),
        "alt.: the stamp's and the shape's checks in the read": (_SD, every),
        "alt.: the fence, plan_cache_mode = force_generic_plan": (_SD + _GENERIC, body),
        "the read alone: the key": (
            "",
            "DECLARE v bytea; BEGIN SELECT k.ipad INTO v FROM tenantry.fence_keys k"
            f" WHERE k.key_id = {_KEY_ID}; RETURN 'active'; END",
        ),
        "the read alone: the key and the residency row": (
            "",
            f"DECLARE v text; BEGIN SELECT r.state INTO v FROM tenantry.fence_keys k"
            f" LEFT JOIN {residency} r ON r.tenant_id = p_tenant WHERE k.key_id = {_KEY_ID};"
            " RETURN v; END",
        ),
    }


def fence_bodies(residency: str) -> dict[str, tuple[str, str]]:
    """name -> (function options, plpgsql body): the fence as the shard has it, and
    with one part left out at a time (each still returns the state)."""
    body = _revision(_FENCE_REVISION)._FENCE_BODY.replace("{residency}", residency)
    read = body[body.index("  SELECT r.state,") : body.index("::int4;") + len("::int4;")]
    hmac = read[read.index("sha256(k.opad") : read.index("INTO v_state")]
    stamp_set = body[body.index("  v_done := set_config(") : body.index("  IF v_state = 'frozen'")]
    stamp = "v_stamp := to_regclass('pg_temp.tenantry_transaction');"
    may_set = "ELSIF has_sequence_privilege(session_user, v_stamp, 'UPDATE') THEN"
    return {
        "plpgsql function, empty body": ("", "BEGIN RETURN 'active'; END"),
        "... SECURITY DEFINER": ("SECURITY DEFINER", "BEGIN RETURN 'active'; END"),
        "... SECURITY DEFINER, SET search_path": (_SD, "BEGIN RETURN 'active'; END"),
        "... ten plpgsql assignments": (
            "",
            "DECLARE v int := 0; BEGIN "
            + " ".join(f"v := v + {i};" for i in range(10))
            + " RETURN 'active'; END",
        ),
        "... one SELECT INTO (the residency row)": (
            "",
            "DECLARE v text; BEGIN SELECT r.state INTO v FROM "
            f"{residency} r WHERE r.tenant_id = p_tenant; RETURN v; END",
        ),
        "the fence (a copy)": (_SD, body),
        "the fence, not SECURITY DEFINER": ("", body),
        "the fence without the signature's shape check": (
            _SD,
            _cut(body, "IF p_tenant IS NULL OR", "IF false AND p_tenant IS NULL OR"),
        ),
        "the fence without the key and residency read": (
            _SD,
            _cut(body, read, "v_state := 'active'; v_valid := true;"),
        ),
        "the fence without the HMAC (the read kept)": (_SD, _cut(body, hmac, "true\n    ")),
        "the fence without the stamp's checks": (
            _SD,
            _cut(_cut(body, stamp, "v_stamp := 1::regclass;"), may_set, "ELSIF false THEN"),
        ),
        "the fence without setting the stamp and settings": (
            _SD,
            _cut(body, stamp_set, "  v_done := '';\n"),
        ),
        **alternative_bodies(residency),
    }


def fence_variants(
    fleet: Any, admin: Any, routing: Any
) -> dict[str, tuple[Any, Callable[..., None]]]:
    """Each of :func:`fence_bodies` as a function of a scratch schema, called as the
    operations role (``BEGIN; SELECT f(t, s)``, ROLLBACK), beside ``BEGIN; SELECT 1``
    and the pieces the fence sets."""
    key = fleet.catalog.fence_key(SHARD_NAME)
    pid = admin.backend_pid
    signatures = {t: key.sign(t, pid) for t in fleet.tenants}
    residency = _check(
        admin.exec_(
            b"SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
            b" FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            b" WHERE c.oid = to_regclass('tenantry_residency')"
        )
    ).get_value(0, 0)
    _check(admin.exec_(b"SELECT tenantry.open_session(true)"))
    _check(admin.exec_(b"CREATE SCHEMA wire"))
    _check(admin.exec_(b"GRANT USAGE ON SCHEMA wire TO " + fleet.role.encode()))
    routing_signatures = {t: key.sign(t, routing.backend_pid) for t in fleet.tenants}
    _check(admin.exec_(b"CREATE TEMPORARY SEQUENCE wire_stamp MINVALUE -9223372036854775808"))
    table: dict[str, tuple[Any, Callable[..., None]]] = {}

    def call(sql: bytes, conn: Any = admin) -> Callable[[str, int], None]:
        sigs = signatures if conn is admin else routing_signatures

        def tx(t: str, _i: int) -> None:
            query = sql.replace(b"$t", _quote(t)).replace(b"$s", _quote(sigs[t]))
            result = _check(conn.exec_(b"BEGIN; " + query))
            if result.ntuples != 1:
                raise RuntimeError(f"{sql!r} returned no row")
            _check(conn.exec_(b"ROLLBACK"))

        return tx

    table["BEGIN; SELECT 1"] = (admin, call(b"SELECT 1"))
    table["tenantry.fence (the shard's)"] = (admin, call(b"SELECT tenantry.fence($t, $s)"))
    for number, (name, (options, body)) in enumerate(fence_bodies(residency.decode()).items()):
        _check(
            admin.exec_(
                f"CREATE FUNCTION wire.f{number}(p_tenant text, p_signature text) RETURNS text"
                f" LANGUAGE plpgsql VOLATILE {options} AS $wire${body}$wire$".encode()
            )
        )
        table[name] = (admin, call(b"SELECT wire.f%d($t, $s)" % number))
        if "SECURITY DEFINER" in options:
            table[name + ", routing role"] = (
                routing,
                call(b"SELECT wire.f%d($t, $s)" % number, routing),
            )
    table["BEGIN; SELECT 1, routing role"] = (routing, call(b"SELECT 1", routing))
    table["tenantry.fence (the shard's), routing role"] = (
        routing,
        call(b"SELECT tenantry.fence($t, $s)", routing),
    )
    table["set_config of the tenant, routing role"] = (
        routing,
        call(b"SELECT set_config('tenantry.tenant_id', $t, true)", routing),
    )
    loops.clear()
    loops["(no call)"] = ("v := 'active';", True)
    loops["tenantry.fence (the shard's)"] = ("v := tenantry.fence(t, s);", True)
    for number, (name, (options, _)) in enumerate(fence_bodies(residency.decode()).items()):
        loops[name] = (f"v := wire.f{number}(t, s);", "SECURITY DEFINER" in options)
    table["setval of a temporary sequence"] = (
        admin,
        call(
            b"SELECT setval('pg_temp.wire_stamp', hashtextextended($t, (date_part('epoch',"
            b" transaction_timestamp()) * 1000000)::int8), true)"
        ),
    )
    table["three set_config(..., true)"] = (
        admin,
        call(
            b"SELECT set_config('tenantry.signature', '1:', true)"
            b" || set_config('tenantry.tenant_id', $t, true)"
            b" || set_config('tenantry.x', 'y', true)"
        ),
    )
    return table


#: name -> the plpgsql statement that calls it, for :func:`loop_variants`.
loops: dict[str, tuple[str, bool]] = {}


def loop_variants(
    fleet: Any, admin: Any, routing: Any
) -> dict[str, tuple[Any, Callable[..., None]]]:
    """The fence functions of :func:`fence_variants` called in a loop of transactions
    inside the server (a procedure: the call, then ROLLBACK, LOOP_COUNT times): no
    message, no client, so the backend's CPU per iteration is the function's and the
    transaction's alone."""
    key = fleet.catalog.fence_key(SHARD_NAME)
    _check(admin.exec_(b"GRANT USAGE ON SCHEMA wire TO " + fleet.role.encode()))
    table: dict[str, tuple[Any, Callable[..., None]]] = {}
    for number, (name, (statement, routable)) in enumerate(loops.items()):
        _check(
            admin.exec_(
                f"CREATE PROCEDURE wire.loop{number}(n int, t text, s text) LANGUAGE plpgsql"
                f" AS $wire$DECLARE v text; BEGIN FOR i IN 1..n LOOP {statement}"
                " IF v IS DISTINCT FROM 'active' THEN RAISE 'not active'; END IF;"
                " ROLLBACK; END LOOP; END$wire$".encode()
            )
        )
        for who, conn in (("", admin), (", routing role", routing))[: 1 + routable]:

            def tx(t: str, _i: int, number: int = number, conn: Any = conn) -> None:
                call = b"CALL wire.loop%d(%d, %s, %s)" % (
                    number,
                    LOOP_COUNT,
                    _quote(t),
                    _quote(key.sign(t, conn.backend_pid)),
                )
                _check(conn.exec_(call))

            table[name + who] = (conn, tx)
    return table


LOOP_COUNT = 50


# -- the policy's predicate, per statement ----------------------------------------------


def policy_variants(
    fleet: Any, routing: Any, admin: Any
) -> dict[str, tuple[Any, Callable[..., None]]]:
    """A routed transaction (the fence with BEGIN) of five point selects: of the table
    without a policy, with the signed and the classic policies, and of the table
    without a policy with the signed policy's predicate, or parts of it, in its WHERE
    clause. The difference to the first, over five, is what a predicate costs one
    statement."""
    key = fleet.catalog.fence_key(SHARD_NAME)
    pid = routing.backend_pid
    signatures = {t: key.sign(t, pid) for t in fleet.tenants}
    body = _revision("0004_fence.py")._TENANT_BODY
    copies = {
        "tenant_copy": body,
        "setting_only": "BEGIN RETURN current_setting('tenantry.tenant_id', true); END",
    }
    _check(admin.exec_(b"CREATE SCHEMA IF NOT EXISTS wire"))
    _check(admin.exec_(b"GRANT USAGE ON SCHEMA wire TO " + fleet.role.encode()))
    for name, text_ in copies.items():
        _check(
            admin.exec_(
                f"CREATE FUNCTION wire.{name}() RETURNS text LANGUAGE plpgsql STABLE"
                f" PARALLEL RESTRICTED AS $wire${text_}$wire$".encode()
            )
        )
    tenant_fns = {
        "tenant_one_expression": ("plpgsql STABLE PARALLEL RESTRICTED", ALT_TENANT_ONE_EXPRESSION),
        "tenant_sql": ("sql VOLATILE", ALT_TENANT_SQL),
    }
    for name, (options, text_) in tenant_fns.items():
        _check(
            admin.exec_(
                f"CREATE FUNCTION wire.{name}() RETURNS pg_catalog.text LANGUAGE {options}"
                f" AS $wire${text_}$wire$".encode()
            )
        )
        table = f"wire.readings_{name}".encode()
        for statement in (
            b"CREATE TABLE %s (LIKE bench_readings_open INCLUDING ALL)" % table,
            b"INSERT INTO %s SELECT * FROM bench_readings_open" % table,
            b"ALTER TABLE %s ENABLE ROW LEVEL SECURITY" % table,
            b"ALTER TABLE %s FORCE ROW LEVEL SECURITY" % table,
            b"CREATE POLICY p ON %s FOR SELECT USING (tenant_id = (SELECT wire.%s()))"
            % (table, name.encode()),
            b"GRANT SELECT ON %s TO %s" % (table, fleet.role.encode()),
            b"VACUUM ANALYZE %s" % table,
        ):
            _check(admin.exec_(statement))
    where = b" AND tenant_id = "
    forms = {
        "no policy": (b"bench_readings_open", b""),
        "signed policy (row-level security)": (b"bench_readings", b""),
        "classic policy (row-level security)": (b"bench_readings_classic", b""),
        "alt.: signed policy, tenant() one RETURN expression": (
            b"wire.readings_tenant_one_expression",
            b"",
        ),
        "alt.: signed policy, tenant() in SQL (inlined)": (b"wire.readings_tenant_sql", b""),
        "no policy + (SELECT tenantry.tenant())": (
            b"bench_readings_open",
            where + b"(SELECT tenantry.tenant())",
        ),
        "no policy + tenantry.tenant(), no sub-select": (
            b"bench_readings_open",
            where + b"tenantry.tenant()",
        ),
        "no policy + (SELECT current_setting(...))": (
            b"bench_readings_open",
            where + b"(SELECT current_setting('tenantry.tenant_id', true))",
        ),
        "no policy + (SELECT plpgsql returning the setting)": (
            b"bench_readings_open",
            where + b"(SELECT wire.setting_only())",
        ),
    }
    table: dict[str, tuple[Any, Callable[..., None]]] = {}
    for number, (name, (relation, extra)) in enumerate(forms.items()):
        sql = SELECT.replace(b"{table}", relation) + extra
        table[name] = (routing, _five(routing, signatures, sql, None))
        if not extra:  # the same, a statement prepared on the server once (a generic plan)
            prepared = b"wire_%d" % number
            _check(routing.prepare(prepared, sql))
            table[f"{name}, prepared"] = (routing, _five(routing, signatures, sql, prepared))
    return table


def _five(
    routing: Any, signatures: dict[str, str], sql: bytes, prepared: bytes | None
) -> Callable[[str, int], None]:
    """A routed transaction of five point selects *sql* (by the prepared statement
    *prepared* if given)."""

    def tx(t: str, i: int) -> None:
        fence = b"BEGIN; SELECT tenantry.fence(%s, %s)" % (_quote(t), _quote(signatures[t]))
        if _check(routing.exec_(fence)).get_value(0, 0) != b"active":
            raise RuntimeError("the fence did not answer active")
        params = [t.encode(), str(i).encode()]
        for _ in range(5):
            if prepared is None:
                result = routing.exec_params(sql, params)
            else:
                result = routing.exec_prepared(prepared, params)
            if _check(result).ntuples != 1:
                raise RuntimeError("the point select found no row")
        _check(routing.exec_(b"ROLLBACK"))

    return tx


# -- running ----------------------------------------------------------------------------


def measure(
    table: dict[str, tuple[Any, Callable[..., None]]],
    tenants: list[str],
    rows: int,
    rounds: int,
    rng: random.Random,
) -> dict[str, dict[str, float]]:
    """Interleaved rounds (each variant BATCH transactions, a fresh random order each
    round, two rounds of warm-up): per variant, the wall p50 and p90, and the medians
    over rounds of the client's and the server backend's CPU per transaction (µs)."""
    walls: dict[str, list[int]] = {name: [] for name in table}
    cpu: dict[str, list[int]] = {name: [] for name in table}
    server: dict[str, list[int]] = {name: [] for name in table}
    for round_no in range(rounds + 2):
        order = list(table)
        rng.shuffle(order)
        for name in order:
            conn, tx = table[name]
            work = [(rng.choice(tenants), rng.randint(1, rows)) for _ in range(BATCH)]
            s0, c0 = schedstat_ns(conn.backend_pid), time.thread_time_ns()
            laps = []
            for t, i in work:
                start = time.perf_counter_ns()
                tx(t, i)
                laps.append(time.perf_counter_ns() - start)
            c1, s1 = time.thread_time_ns(), schedstat_ns(conn.backend_pid)
            if round_no >= 2:
                walls[name] += laps
                cpu[name].append((c1 - c0) // BATCH)
                server[name].append((s1 - s0) // BATCH)
    out = {}
    for name in table:
        w = sorted(walls[name])
        out[name] = {
            "n": len(w),
            "p50": statistics.median(w) / 1000,
            "p90": w[int(len(w) * 0.9)] / 1000,
            "client_cpu": statistics.median(cpu[name]) / 1000,
            "server_cpu": statistics.median(server[name]) / 1000,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pg-url", help="superuser URL of a running PostgreSQL server")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here (else stdout)")
    parser.add_argument(
        "--parts",
        default="tflp",
        help="sections: t transactions, f the fence's parts, l the same in a server loop,"
        " p the policy's predicate (default: all)",
    )
    args = parser.parse_args()
    cfg = replace(QUICK, tenants=200)
    rng = random.Random(args.seed)
    with pg_servers([args.pg_url] if args.pg_url else None, count=2) as urls, ExitStack() as st:
        fleet = build_fleet(urls[0], urls[1], cfg, st)
        record = fleet.plain.raw_connection()
        st.callback(record.close)
        routing = record.driver_connection.pgconn
        _check(routing.exec_(b"SELECT tenantry.open_session()"))
        admin_engine = make_engine(fleet.shard.admin_url, poolclass=NullPool)
        st.callback(admin_engine.dispose)
        admin_record = admin_engine.raw_connection()
        st.callback(admin_record.close)
        admin = admin_record.driver_connection.pgconn
        load = load_average()
        parts = args.parts
        fence = fence_variants(fleet, admin, routing) if {"f", "l"} & set(parts) else {}
        tables = [
            variants(fleet, routing) if "t" in parts else {},
            fence if "f" in parts else {},
            loop_variants(fleet, admin, routing) if "l" in parts else {},
            policy_variants(fleet, routing, admin) if "p" in parts else {},
        ]
        results = [
            measure(table, fleet.tenants, cfg.rows_per_tenant, args.rounds, rng) if table else {}
            for table in tables
        ]
        _check(admin.exec_(b"DROP SCHEMA IF EXISTS wire CASCADE"))
    report = render(results, load, args.rounds)
    if args.out:
        args.out.write_text(report)
    print(report)


def render(parts: list[dict[str, dict[str, float]]], load: Any, rounds: int) -> str:
    transactions, fence, loop, policy = parts
    loop_rows = []
    for name, m in loop.items():
        base_name = "(no call)" + (", routing role" if name.endswith("routing role") else "")
        loop_base = loop[base_name]["server_cpu"]
        loop_rows.append(
            [
                name,
                f"{m['server_cpu'] / LOOP_COUNT:.1f}",
                f"{(m['server_cpu'] - loop_base) / LOOP_COUNT:+.1f}",
            ]
        )
    rows = [
        [
            name,
            int(m["n"]),
            f"{m['p50']:.0f}",
            f"{m['p90']:.0f}",
            f"{m['client_cpu']:.0f}",
            f"{m['server_cpu']:.0f}",
            f"{m['p50'] - m['client_cpu'] - m['server_cpu']:.0f}",
        ]
        for name, m in transactions.items()
    ]
    fence_rows = []
    for name, m in fence.items():
        if name.endswith("routing role"):
            base = fence["BEGIN; SELECT 1, routing role"]["server_cpu"]
        else:
            base = fence["BEGIN; SELECT 1"]["server_cpu"]
        over = f"{m['server_cpu'] - base:+.1f}"
        fence_rows.append([name, f"{m['server_cpu']:.1f}", over, f"{m['p50']:.0f}"])
    policy_rows = []
    for name, m in policy.items():
        none = policy["no policy, prepared" if name.endswith("prepared") else "no policy"]
        per = (m["server_cpu"] - none["server_cpu"]) / 5
        policy_rows.append([name, f"{m['server_cpu']:.0f}", f"{per:+.1f}", f"{m['p50']:.0f}"])
    return (
        "# Where a routed transaction's time goes: the wire and the server\n\n"
        "`python benchmarks/_routing_wire.py` (see its docstring). Load average "
        f"{load} at the start, {load_average()} at the end; {rounds} rounds of {BATCH} "
        "transactions per variant, interleaved. *Server CPU*: the backend process's CPU "
        "time (`/proc/<pid>/schedstat`) per transaction, message handling included; "
        "*wait*: p50 less both CPU times.\n\n"
        "## Transactions (raw libpq, one point select unless said, ROLLBACK)\n\n"
        + markdown_table(
            [
                "transaction",
                "n",
                "wall p50 µs",
                "wall p90 µs",
                "client CPU µs",
                "server CPU µs",
                "wait µs",
            ],
            rows,
        )
        + "\n\n## The fence's body, part by part (operations role, `BEGIN; SELECT f(t, s)`, "
        "ROLLBACK)\n\nServer CPU per transaction, and over `BEGIN; SELECT 1`'s (the "
        "routing role's rows over its own). *alt.*: measured, not adopted.\n\n"
        + markdown_table(["call", "server CPU µs", "over SELECT 1", "wall p50 µs"], fence_rows)
        + "\n\n## The fence's body in a loop of transactions inside the server\n\n"
        f"A procedure calls the function, then ROLLBACK, {LOOP_COUNT} times per call: "
        "server CPU per iteration, and over an iteration without the call.\n\n"
        + markdown_table(["call", "server CPU µs", "over no call"], loop_rows)
        + "\n\n## The policy's predicate, per statement (the fence with BEGIN, five point "
        "selects, ROLLBACK)\n\nServer CPU per transaction, and per statement over the "
        "table without a policy (the prepared ones over the prepared one's).\n\n"
        + markdown_table(
            ["point selects of", "server CPU µs", "per statement", "wall p50 µs"], policy_rows
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
