"""fleet_scale.py's what-if ``--what-if-stamp-free``: a dedicated tier without the
fence's per-connection stamp, measured on the benchmark's own fleet only.

A WHAT-IF, NOT tenantry's behaviour: it weakens nothing in tenantry. It changes the
functions of the dedicated databases *this benchmark built* (as the superuser, after
the build) and which connect event *the benchmark's own routers* run; the shared
shards, the shard revisions, the router and every other database are untouched, and
the original functions are put back (``pg_get_functiondef``) before each baseline
router and at the end. The idea measured: a dedicated database holds one tenant, so
its policies can compare ``tenant_id`` with that tenant as a constant; no stamp and no
signed fence are then needed there (the fence only reads the residency row: a stale
route, a frozen tenant's transaction made read-only).

In each dedicated database, while the what-if is on:

- ``tenantry.tenant()`` is ``LANGUAGE sql STABLE`` returning the database's tenant id
  as a literal (the planner inlines it: the policies' InitPlan is a constant);
- ``tenantry.fence(p_tenant, p_signature)`` (plpgsql, ``SECURITY DEFINER``, ``search_path
  = pg_catalog, pg_temp`` as s0006's) refuses (SQLSTATE 28000) any tenant but the
  database's, ignores the signature, reads the residency row, makes the transaction
  read-only when the tenant is frozen and returns the state (s0006's contract: NULL
  when the tenant has no row there); it sets no stamp and makes none;
- ``StampFreeRouter`` (a subclass, benchmark only) removes the router's connect-event
  stamp (``tenantry.open_session(false)``) from the engines of dedicated shards.

``check`` proves it is what it says on a few dedicated databases: the routed
transaction sees exactly its tenant's rows (another tenant's row, written there as
the superuser, is not seen), a wrong tenant is refused by the fence, no
``open_session`` call is counted (``pg_stat_user_functions`` with ``track_functions``
set for those databases) and no temporary relation exists while the router holds its
connections (``pg_class.relpersistence = 't'``); the same check with the baseline
router counts one stamp per connection, so it can fail.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy import Engine, event

from tenantry import Router, load_settings
from tenantry.router import router as router_module
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.model import Shard, Tier

TENANT_FN = "tenantry.tenant()"
FENCE_FN = "tenantry.fence(text,text)"

_TENANT_SQL = (
    "CREATE OR REPLACE FUNCTION tenantry.tenant() RETURNS pg_catalog.text"
    " LANGUAGE sql STABLE PARALLEL RESTRICTED AS $tenantry$SELECT {lit}::pg_catalog.text$tenantry$"
)
_FENCE_SQL = """
CREATE OR REPLACE FUNCTION tenantry.fence(p_tenant text, p_signature text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $tenantry$
DECLARE
  v_state text;
  v_done text;
BEGIN
  IF p_tenant IS DISTINCT FROM {lit} THEN
    RAISE EXCEPTION 'tenantry: tenant "%" does not live in this dedicated database', p_tenant
      USING ERRCODE = '28000';
  END IF;{guard}
  SELECT r.state INTO v_state FROM {residency} r WHERE r.tenant_id = p_tenant;
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
$tenantry$
"""
#: ``--what-if-prepare-guard``: PostgreSQL refuses PREPARE TRANSACTION in a transaction
#: that ran LISTEN or UNLISTEN (a bare UNLISTEN in a session that never listened is a
#: no-op and does not), read-only transactions included; no temporary object.
_GUARD = """
  LISTEN tenantry_no_prepare;
  UNLISTEN tenantry_no_prepare;"""
_RESIDENCY = (
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = to_regclass('tenantry_residency')"
)


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def originals(admin_url: str) -> tuple[str, str]:
    """The shard revisions' ``tenantry.tenant()`` and ``tenantry.fence`` of one
    database (``pg_get_functiondef``: CREATE OR REPLACE statements, owner kept)."""
    with psycopg.connect(_conninfo(admin_url), autocommit=True) as conn:
        out = []
        for fn in (TENANT_FN, FENCE_FN):
            row = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)", (fn,)).fetchone()
            assert row is not None
            out.append(str(row[0]))
    return out[0], out[1]


def _apply(entry: tuple[str, str], mode: str, saved: tuple[str, str]) -> None:
    tenant, admin_url = entry
    with psycopg.connect(_conninfo(admin_url)) as conn:  # one transaction
        if mode:
            row = conn.execute(_RESIDENCY).fetchone()
            assert row is not None
            lit = sql.Literal(tenant).as_string(conn)
            conn.execute(_TENANT_SQL.replace("{lit}", lit).encode())
            fence = _FENCE_SQL.replace("{lit}", lit).replace("{residency}", str(row[0]))
            fence = fence.replace("{guard}", _GUARD if mode == "guard" else "")
            conn.execute(fence.encode())
        else:
            conn.execute(saved[0].encode())
            conn.execute(saved[1].encode())


def switch(dedicated: Sequence[tuple[str, str]], mode: str, saved: tuple[str, str]) -> float:
    """Put the what-if's functions (*mode* ``stamp-free``, or ``guard``: with the
    PREPARE TRANSACTION guard) or the originals (*mode* ``""``: *saved*) in every
    dedicated database ((tenant, superuser URL) pairs); return the seconds it took."""
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(partial(_apply, mode=mode, saved=saved), dedicated))
    return time.monotonic() - started


class StampFreeRouter(Router):
    """The benchmark's router for the what-if: no connect-event stamp on the engines
    of dedicated shards (everything else is Router's; shared shards keep the stamp)."""

    def _configure_engine(self, engine: Engine, shard: Shard) -> None:
        super()._configure_engine(engine, shard)
        if shard.tier == Tier.DEDICATED:
            stamps = [
                fn
                for fn in engine.pool.dispatch.connect
                if isinstance(fn, partial) and fn.func is router_module._stamp_connection
            ]
            assert len(stamps) == 1, stamps  # the router registers exactly one
            event.remove(engine, "connect", stamps[0])


def check(
    catalog_url: str,
    dedicated: Sequence[tuple[str, str]],
    settings: dict[str, Any],
    mode: str,
) -> dict[str, Any]:
    """Route transactions to the tenants of *dedicated* ((tenant, superuser URL), a few)
    with the what-if's router (*stamp_free*) or the baseline's, and report what the
    server saw (see the module's doc)."""
    from _fleet_scale_workers import TABLE

    intruder = "zz-intruder"
    for tenant, admin in dedicated:
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(
                    sql.Identifier(conn.info.dbname)
                )
            )
            conn.execute("SELECT pg_stat_reset()")
            for who in (tenant, intruder):
                conn.execute(
                    f"INSERT INTO {TABLE} (tenant_id, id, n) VALUES (%s, 1, 7)"
                    " ON CONFLICT DO NOTHING",
                    (who,),
                )
    stamp_free = bool(mode)
    cls = StampFreeRouter if stamp_free else Router
    router = cls(settings=load_settings(catalog_url=catalog_url, **settings))
    seen: dict[str, Any] = {}
    temp: dict[str, int] = {}
    try:
        for tenant, admin in dedicated:
            for _ in range(3):
                with router.session(tenant) as session:
                    rows = session.execute(sa.text(f"SELECT tenant_id, n FROM {TABLE}")).all()
                    mine = session.execute(sa.text("SELECT tenantry.tenant()")).scalar_one()
            seen[tenant] = {"rows": sorted({r[0] for r in rows}), "tenant()": mine}
            with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_class WHERE relpersistence = 't'"
                ).fetchone()
                temp[tenant] = int(row[0]) if row else -1
        # PREPARE TRANSACTION in a routed transaction: refused for its temporary
        # object (the stamp) before PostgreSQL looks at max_prepared_transactions
        tenant = dedicated[0][0]
        with router.connection(tenant) as conn:
            conn.exec_driver_sql(f"SELECT n FROM {TABLE} WHERE id = 1").all()
            try:
                conn.exec_driver_sql("PREPARE TRANSACTION 'tenantry-what-if-probe'")
                prepared = "prepared"
            except sa.exc.DBAPIError as exc:
                prepared = f"{getattr(exc.orig, 'sqlstate', '')}: {str(exc.orig).strip()}"
        # the fence refuses another tenant (as the routing role, on the router's
        # connection, in a transaction of its own)
        other = dedicated[1][0]
        with router.engine_for(tenant).connect() as conn:
            try:
                conn.exec_driver_sql(f"SELECT tenantry.fence('{other}', '1:{'0' * 64}')")
                refused = "not refused"
            except sa.exc.DBAPIError as exc:
                refused = getattr(exc.orig, "sqlstate", None) or str(exc)
    finally:
        router.close()
    if prepared == "prepared":  # a server with max_prepared_transactions > 0
        with psycopg.connect(_conninfo(dedicated[0][1]), autocommit=True) as conn:
            conn.execute("ROLLBACK PREPARED 'tenantry-what-if-probe'")
    # a read-only routed transaction (as the engine option postgresql_readonly makes it)
    readonly = type(
        "ReadOnly",
        (cls,),
        {"engine_factory": staticmethod(partial(make_engine, execution_options={
            "postgresql_readonly": True}))},
    )  # fmt: skip
    ro_router = readonly(settings=load_settings(catalog_url=catalog_url, **settings))
    try:
        with ro_router.session(tenant) as session:
            ro = session.execute(
                sa.text(
                    "SELECT current_setting('transaction_read_only'), tenantry.tenant(),"
                    f" (SELECT count(*) FROM {TABLE})"
                )
            ).one()
            read_only = {"read_only": ro[0], "tenant()": ro[1], "rows": int(ro[2])}
    finally:
        ro_router.close()
    time.sleep(1.0)  # the backends exit and flush their function statistics
    calls: dict[str, dict[str, int]] = {}
    for tenant, admin in dedicated:
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            got = conn.execute(
                "SELECT funcname, calls FROM pg_stat_user_functions WHERE schemaname = 'tenantry'"
            ).fetchall()
            calls[tenant] = {str(n): int(c) for n, c in got}
            conn.execute(f"DELETE FROM {TABLE} WHERE tenant_id IN (%s, %s)", (tenant, intruder))
            conn.execute(
                sql.SQL("ALTER DATABASE {} RESET track_functions").format(
                    sql.Identifier(conn.info.dbname)
                )
            )
    return {
        "stamp_free": stamp_free,
        "mode": mode,
        "rows_seen": seen,
        "temporary_relations_while_connected": temp,
        "function_calls": calls,
        "fence_for_another_tenant": refused,
        "prepare_transaction": prepared,
        "read_only_transaction": read_only,
    }
