"""Session-level state through PgBouncer in transaction mode: probed, isolation holds.

The probes' fleet of tests/router/test_probes_pg.py (alpha and beta on one shared
shard, 20 rows each per table, the routing role ``app`` bound by row-level security),
but the shard's routing URL is PgBouncer: two server connections, shared by every
client. Whatever session-level state alpha's SQL leaves on a server connection (SET,
set_config, RESET, DISCARD, cursors WITH HOLD, prepared statements, LISTEN, advisory
locks) stays there for the next client the pooler hands it to: beta's transactions,
alpha's, or a client of the routing role that sends no fence at all. Each probe runs
that next transaction on the same server connection (``pg_backend_pid()`` says so:
PgBouncer hands out the server connection released last) and asserts that it sees its
own tenant's rows only, or nothing; and, as in the direct probes, that beta's rows are
unchanged and nothing alpha saw mentions beta.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import text

from tenantry import Catalog, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.testing import DatabaseFactory
from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.test_probes_pg import (
    ACTIVE_SQL_TRANSACTION,
    APP_ROLE,
    INSUFFICIENT_PRIVILEGE,
    INVALID_AUTHORIZATION,
    ME,
    ONLY_ME,
    OTHER,
    READ_ONLY_TRANSACTION,
    ROWS,
    TABLES,
    Ctx,
    Seen,
    Shard,
    _no_beta,
    _routing_url,
    alpha_or_nothing,
    pid,
    refused,
    sees_nothing,
    sees_only_alpha,
    sqlstate,
    stash_beta_then_read_as_alpha,
    tenants,
)

ONLY_BETA = {table: {OTHER: ROWS} for table in TABLES}
NOTHING = {table: {} for table in TABLES}
INVALID_CURSOR_NAME = "34000"
UNDEFINED_PREPARED_STATEMENT = "26000"


@pytest.fixture(scope="module")
def shard(pg_servers: list[str], app_role: str, pgbouncer: TempPgBouncer) -> Iterator[Shard]:
    """The probes' shard, its routing URL through PgBouncer (detected: pooled)."""
    with DatabaseFactory(pg_servers) as dbs:
        catalog_url, admin_url = dbs(0), dbs(0)
        settings = load_settings(
            catalog_url=catalog_url,
            alembic_config=str(MIGRATIONS),
            connect_timeout=2,
            pool_size_shared=4,
            max_overflow=4,
            pool_timeout=5,
        )
        catalog = Catalog(settings=settings)
        catalog.init()
        try:
            routing = pgbouncer.url(_routing_url(admin_url))
            added = catalog.add_shard("pool", routing, admin_url=admin_url, tier="shared")
            assert added.pooled
            run = upgrade(catalog, jobs=1)
            assert run.ok, [r.error for r in run.results]
            catalog.add_tenant(ME, shard="pool")
            catalog.add_tenant(OTHER, shard="pool")
            built = Shard(catalog, admin_url, routing, settings)
            built.reset()
            yield built
        finally:
            catalog.close()


# -- helpers ------------------------------------------------------------------------------------


def sees_only_beta(x: Any) -> None:
    """Beta's own transaction: beta's rows, all of them, and nothing of alpha's."""
    assert tenants(x, Seen()) == ONLY_BETA


@contextlib.contextmanager
def raw(c: Ctx) -> Iterator[psycopg.Connection[Any]]:
    """A client of the routing role through the pooler that sends no fence, autocommit:
    it gets whichever server connection PgBouncer hands out."""
    with psycopg.connect(_conninfo(c.shard.routing_url), autocommit=True) as conn:
        yield conn


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def raw_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def raw_counts(conn: psycopg.Connection[Any], seen: Seen) -> dict[str, int]:
    found = {}
    for table in TABLES:
        row = conn.execute(f"SELECT count(*), string_agg(tenant_id, ',') FROM {table}").fetchone()
        assert row is not None
        seen(row)
        found[table] = int(row[0])
    return found


def then_beta(c: Ctx, backend: int, check: Callable[[Any], None] = sees_only_beta) -> None:
    """Beta's next transaction, through another router, on *backend*: sees only beta."""
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend, "not the same server connection"
        check(s)


def then_alpha(c: Ctx, backend: int) -> None:
    """Alpha's next transaction on *backend*: alpha's rows, no more."""
    with c.router.session(ME) as s:
        assert pid(s) == backend, "not the same server connection"
        assert tenants(s, c.seen) == ONLY_ME


def then_unfenced(c: Ctx, backend: int) -> None:
    """A client that sends no fence, on *backend*: sees nothing of anyone."""
    with raw(c) as conn:
        assert raw_pid(conn) == backend, "not the same server connection"
        assert raw_counts(conn, c.seen) == dict.fromkeys(TABLES, 0)


def run(x: Any, statement: str, seen: Seen) -> None:
    """Run *statement*; what it returns (if anything) is seen."""
    result = x.execute(text(statement))
    if result.returns_rows:
        seen(result.all())


def session_wide(c: Ctx, *statements: str) -> int:
    """Alpha runs *statements* in its routed transaction, which commits: whatever they
    leave on the session stays on the server connection. Returns its pid."""
    with c.router.session(ME) as s:
        backend = pid(s)
        for statement in statements:
            run(s, statement, c.seen)
        s.commit()
    return backend


# -- the probes ---------------------------------------------------------------------------------

PROBES: dict[str, Callable[[Ctx], None]] = {}


def probe(name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        assert name not in PROBES
        PROBES[name] = fn
        return fn

    return register


@probe("baseline-alpha-then-beta-on-one-server-connection")
def _baseline(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        sees_only_alpha(s, c.seen)
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() == ME
    then_beta(c, backend)
    then_unfenced(c, backend)
    then_alpha(c, backend)


@probe("set-tenant-id-beta-session-wide")
def _set_tenant(c: Ctx) -> None:
    backend = session_wide(c, "SET tenantry.tenant_id = 'beta'")
    then_unfenced(c, backend)  # the setting is there, no stamp: nothing
    with raw(c) as conn:
        assert raw_pid(conn) == backend
        row = conn.execute("SELECT current_setting('tenantry.tenant_id')").fetchone()
        assert row == (OTHER,)  # the proof the state stayed on the server connection
    then_alpha(c, backend)
    then_beta(c, backend)


@probe("set-config-tenant-and-signature-session-wide")
def _set_config(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        sig = s.execute(text("SELECT current_setting('tenantry.signature')")).scalar_one()
        s.execute(
            text(
                "SELECT set_config('tenantry.signature', :sig, false),"
                " set_config('tenantry.tenant_id', 'beta', false)"
            ),
            {"sig": sig},
        )
        sees_nothing(s, c.seen)
        s.execute(text("COMMIT"))
        s.execute(
            text(
                "SELECT set_config('tenantry.signature', :sig, false),"
                " set_config('tenantry.tenant_id', 'alpha', false)"
            ),
            {"sig": sig},
        )
        sees_nothing(s, c.seen)  # alpha's stamp was for the transaction that ended
        s.commit()
    then_unfenced(c, backend)
    then_beta(c, backend)
    then_alpha(c, backend)


@probe("setval-on-the-stamp")
def _setval(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(
                text(
                    "SELECT setval('pg_temp.tenantry_transaction', hashtextextended('beta',"
                    " (date_part('epoch', transaction_timestamp()) * 1000000)::int8))"
                )
            )
    then_beta(c, backend)


@probe("reset-all-then-commit")
def _reset_all(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        s.execute(text("RESET ALL"))
        alpha_or_nothing(s, c.seen)
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)
        s.commit()
    backend = session_wide(c, "RESET ALL", "SET tenantry.tenant_id = 'beta'")
    then_beta(c, backend)
    then_alpha(c, backend)


@probe("discard-all")
def _discard_all(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        with refused(ACTIVE_SQL_TRANSACTION):  # not inside a transaction
            s.execute(text("DISCARD ALL"))
    # Outside a transaction (a client in autocommit): the stamp is dropped with the rest.
    with raw(c) as conn:
        assert raw_pid(conn) == backend
        conn.execute("DISCARD ALL")
        row = conn.execute("SELECT to_regclass('pg_temp.tenantry_transaction')").fetchone()
        assert row == (None,)
        assert raw_counts(conn, c.seen) == dict.fromkeys(TABLES, 0)
    # The next fence makes the stamp again: beta's and alpha's transactions work.
    then_beta(c, backend)
    then_alpha(c, backend)
    then_unfenced(c, backend)


@probe("discard-temp")
def _discard_temp(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        s.execute(text("DISCARD TEMP"))  # allowed in a transaction: drops the stamp
        sees_nothing(s, c.seen)
        s.commit()
    with raw(c) as conn:
        assert raw_pid(conn) == backend
        conn.execute("DISCARD TEMP")
    then_beta(c, backend)
    then_alpha(c, backend)


@probe("set-session-authorization-and-set-role")
def _set_role(c: Ctx) -> None:
    for statement in (
        "SET SESSION AUTHORIZATION postgres",
        "SET ROLE postgres",
        "SET ROLE pg_read_all_data",
    ):
        with c.router.session(ME) as s:
            backend = pid(s)
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(statement))
        with raw(c) as conn:
            assert raw_pid(conn) == backend
            with refused(INSUFFICIENT_PRIVILEGE):
                conn.execute(statement)
            row = conn.execute("SELECT current_user, session_user").fetchone()
            assert row == (APP_ROLE, APP_ROLE)
    then_beta(c, backend)


@probe("set-search-path-session-wide")
def _search_path(c: Ctx) -> None:
    # Nothing the routing role may create can shadow a table: at worst the next client
    # on the server connection finds no table by its plain name.
    backend = session_wide(c, "SET search_path = pg_catalog")
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        with refused("42P01"):  # undefined_table: the next tenant fails, sees nothing
            s.execute(text("SELECT count(*) FROM users")).all()
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        s.execute(text("SET search_path = public"))
        sees_only_beta(s)


@probe("set-default-transaction-read-only-session-wide")
def _read_only(c: Ctx) -> None:
    # The default stays on the server connection (reset_connections cannot reach it
    # through a pooler): beta's next transaction there is read-only. Its writes fail,
    # but it reads its own rows only and nothing of alpha's changes beta's rows.
    backend = session_wide(c, "SET default_transaction_read_only = on")
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        sees_only_beta(s)
        with contextlib.suppress(sa.exc.DBAPIError), s.begin_nested():
            try:
                s.execute(text("UPDATE users SET name = name WHERE id = 1"))
            except sa.exc.DBAPIError as exc:
                assert sqlstate(exc) == READ_ONLY_TRANSACTION, exc
                raise
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        s.execute(text("SET default_transaction_read_only = off"))
        s.commit()


@probe("cursor-with-hold-left-by-beta-fetched-by-alpha")
def _with_hold(c: Ctx) -> None:
    with c.shard.new_router().session(OTHER) as s:
        backend = pid(s)
        s.execute(text("DECLARE beta_users CURSOR WITH HOLD FOR SELECT * FROM users"))
        s.commit()  # beta's rows are materialised in the cursor, on the server connection
    with c.router.session(ME) as s:
        assert pid(s) == backend
        assert s.execute(text("SELECT count(*) FROM pg_cursors")).scalar() == 0
        with refused(INVALID_CURSOR_NAME):  # the pooled fence closed it
            c.seen(s.execute(text("FETCH ALL FROM beta_users")).all())


def with_hold_unfenced(c: Ctx) -> None:
    """Beta's own transaction leaves a WITH HOLD cursor; alpha, after a raw COMMIT (its
    next statements run in transactions no fence began), tries to FETCH from it.

    Not among PROBES: behind a PgBouncer that keeps session state between clients this
    works (the pooled fence closes such cursors only when the next *fenced* transaction
    begins, and it takes SQL run inside beta's own transaction to make one): README's
    "what the database does not stop" says so, and names PgBouncer's reset
    (``server_reset_query_always``), under which test_reset_query.py runs this probe.
    """
    with c.router.session(ME) as alpha:
        sees_only_alpha(alpha, c.seen)
        alpha.execute(text("COMMIT"))
        with c.shard.new_router().session(OTHER) as s:
            backend = pid(s)
            s.execute(text("DECLARE beta_users CURSOR WITH HOLD FOR SELECT * FROM users"))
            s.commit()
        # Beta's server connection was released last: alpha's next transaction gets it.
        assert pid(alpha) == backend
        try:
            fetched = alpha.execute(text("FETCH ALL FROM beta_users")).all()
        except sa.exc.DBAPIError as exc:
            assert sqlstate(exc) == INVALID_CURSOR_NAME, exc
        else:
            leaked = sorted({str(row[0]) for row in fetched})
            raise AssertionError(f"alpha fetched {len(fetched)} rows of {leaked}")


@probe("prepared-statement-left-by-alpha-executed-by-beta")
def _prepare_alpha(c: Ctx) -> None:
    backend = session_wide(
        c, "PREPARE everyone AS SELECT tenant_id, count(*) FROM users GROUP BY 1"
    )
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        assert s.execute(text("EXECUTE everyone")).all() == [(OTHER, ROWS)]


@probe("prepared-statement-left-by-beta-executed-by-alpha")
def _prepare_beta(c: Ctx) -> None:
    with c.shard.new_router().session(OTHER) as s:
        backend = pid(s)
        s.execute(text("PREPARE mine AS SELECT tenant_id, email FROM users ORDER BY id"))
        assert len(s.execute(text("EXECUTE mine")).all()) == ROWS
        s.commit()
    with c.router.session(ME) as s:
        assert pid(s) == backend
        found = c.seen(s.execute(text("EXECUTE mine")).all())
        assert {r[0] for r in found} == {ME} and len(found) == ROWS
    with raw(c) as conn:
        assert raw_pid(conn) == backend
        assert c.seen(conn.execute("EXECUTE mine").fetchall()) == []


@probe("listen-left-on-the-server-connection")
def _listen(c: Ctx) -> None:
    backend = session_wide(c, "LISTEN tenant_events")
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        channels = s.execute(text("SELECT pg_listening_channels()")).scalars().all()
        assert channels == ["tenant_events"]  # alpha's LISTEN is still there ...
        sees_only_beta(s)  # ... and changes nothing of what beta sees
        s.execute(text("UNLISTEN *"))
        s.commit()


@probe("session-advisory-lock-left-on-the-server-connection")
def _advisory(c: Ctx) -> None:
    backend = session_wide(c, "SELECT pg_advisory_lock(4242)")
    with c.shard.new_router().session(OTHER) as s:
        assert pid(s) == backend
        # The lock is this server connection's: beta's transaction "holds" it too, ...
        held = s.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = :p"),
            {"p": backend},
        ).scalar()
        assert held == 1
        sees_only_beta(s)  # ... and sees only its own rows
        assert s.execute(text("SELECT pg_advisory_unlock_all()")).all()
        s.commit()


@probe("pooled-fence-replayed-from-another-transaction")
def _replay_computed(c: Ctx) -> None:
    # A signature for beta, as a router made it for an earlier transaction on this very
    # server connection: bound to that transaction's start, it verifies in no other.
    key = c.shard.catalog.fence_key("pool")
    with c.shard.new_router().session(OTHER) as s:
        backend = pid(s)
        nonce = s.execute(text("SELECT tenantry.fence_nonce()")).scalar_one()
        earlier = key.sign_pooled(OTHER, *(int(x) for x in nonce.split(":")))
        s.commit()
    with c.router.session(ME) as s:
        assert pid(s) == backend
        with refused(INVALID_AUTHORIZATION):
            s.execute(text("SELECT tenantry.fence_pooled('beta', :s)"), {"s": earlier}).all()
    with c.router.session(ME) as s:
        # signed for beta on this server connection, but not for this transaction
        pid_, micros = s.execute(text("SELECT tenantry.fence_nonce()")).scalar_one().split(":")
        stale = key.sign_pooled(OTHER, int(pid_), int(micros) - 1)
        with refused(INVALID_AUTHORIZATION):
            s.execute(text("SELECT tenantry.fence_pooled('beta', :s)"), {"s": stale}).all()
    with c.router.session(ME) as s:
        # the direct fence does not take a pooled signature either
        with refused(INVALID_AUTHORIZATION):
            s.execute(text("SELECT tenantry.fence('beta', :s)"), {"s": earlier}).all()


@probe("pooled-fence-replayed-from-pg-stat-activity")
def _replay_captured(c: Ctx) -> None:
    # Beta's transaction is open, its fence the last statement it ran: the routing role
    # reads it in pg_stat_activity and replays it in its own transaction.
    with c.shard.new_router().session(OTHER) as beta:
        beta.connection()  # begins the transaction: the fence runs
        with c.router.session(ME) as s:
            captured = s.execute(
                text(
                    "SELECT pid, query FROM pg_stat_activity"
                    " WHERE query LIKE 'SELECT tenantry.fence_pooled(''beta''%'"
                )
            ).all()
            assert len(captured) == 1, captured
            ((beta_pid, query),) = captured
            assert pid(s) != beta_pid
            with refused(INVALID_AUTHORIZATION):
                s.execute(text(query)).all()
        sees_only_beta(beta)
        beta.commit()
        # Now on beta's server connection itself: the transaction differs, refused.
        with c.router.session(ME) as s:
            assert pid(s) == beta_pid
            with refused(INVALID_AUTHORIZATION):
                s.execute(text(query)).all()


@probe("fence-nonce-is-harmless")
def _nonce(c: Ctx) -> None:
    with c.router.session(ME) as s:
        backend = pid(s)
        nonce = s.execute(text("SELECT tenantry.fence_nonce()")).scalar_one()
        assert nonce.split(":")[0] == str(backend)
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() == ME
        sees_only_alpha(s, c.seen)


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_through_the_pooler(shard: Shard, name: str) -> None:
    shard.reset()
    beta_before, alpha_before = shard.checksums(OTHER), shard.checksums(ME)
    seen = Seen()
    try:
        PROBES[name](Ctx(shard, shard.new_router(), seen))
    finally:
        shard.close_routers()
    for value in seen.values:
        _no_beta(value)
    assert shard.checksums(OTHER) == beta_before, "beta's rows changed"
    assert shard.checksums(ME) == alpha_before, "alpha's rows changed (no probe commits any)"


def test_the_shard_is_pooled_and_shares_two_server_connections(shard: Shard) -> None:
    """The control: routed transactions of both tenants run on the pooler's server
    connections, never more than two."""
    shard.reset()
    router = shard.new_router()
    try:
        pids = set()
        for tenant in (ME, OTHER) * 5:
            with router.session(tenant) as s:
                pids.add(pid(s))
                assert tenants(s, Seen()) == {t: {tenant: ROWS} for t in TABLES}
        assert 1 <= len(pids) <= 2
    finally:
        shard.close_routers()


def test_reset_connections_cannot_reach_the_server_connections(
    shard: Shard, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented gap (README, "What the database does not stop"), wider through a
    pooler: ``reset_connections`` is not applied there (a warning says so), so a
    session-wide setting filled in beta's own transaction reaches whoever gets the
    server connection next, alpha included."""
    shard.reset()
    seen = Seen()
    try:
        with caplog.at_level(logging.WARNING, logger="tenantry"):
            stash_beta_then_read_as_alpha(
                Ctx(shard, shard.new_router(), seen), reset_connections=True
            )
    finally:
        shard.close_routers()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("routed through a pooler" in w and "RESET_CONNECTIONS" in w for w in warnings)
    (stash,) = seen.values
    assert stash is not None and stash.count("@") == ROWS  # beta's e-mails, all of them
    with pytest.raises(AssertionError):
        _no_beta(stash)
