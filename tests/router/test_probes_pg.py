"""Adversarial probes of tenant isolation on real PostgreSQL.

Two tenants, alpha and beta, share one shard of the demo app (users, chargers,
charging_sessions; 20 rows each per tenant). Applications route as ``app``, a role
that is NOSUPERUSER NOBYPASSRLS and owns nothing; the superuser is the operations
role (the shard's ``admin_url``), and ``tenantry.migrations.upgrade`` installs
row-level security and the signed fence (docs/DESIGN.md, "Two roles per shard").

Every probe runs as alpha, inside ``router.session("alpha")`` or
``router.connection("alpha")``, the way an attacker with one SQL injection in the
application would: it tries to make the policies admit beta's rows. Afterwards, read
as the operations role, beta's rows (md5 of the sorted rows of every tenant table)
are unchanged, and nothing the probe saw contains beta's data: no value mentioning
``beta`` and no count beyond alpha's. A probe that errors (permission denied, a
row-level-security violation) passes as long as that holds; where the kind of error
means something, the probe asserts its SQLSTATE.

Every row of beta mentions "beta" in its text (tenant_id, names, e-mails), so a
leaked row shows wherever it surfaces: rows, COPY output, statistics, plans, errors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.errors import TenantryError
from tenantry.migrations import upgrade
from tenantry.settings import TenantrySettings
from tenantry.testing import DatabaseFactory

ME, OTHER = "alpha", "beta"
ROWS = 20  # per tenant and table
TABLES = ("users", "chargers", "charging_sessions")
APP_ROLE = "app"  # the routing role; tests/router/conftest.py's app_role makes it

# SQLSTATEs
INSUFFICIENT_PRIVILEGE = "42501"  # permission denied; also "violates row-level security"
INVALID_AUTHORIZATION = "28000"  # the fence: a signature that does not verify
ACTIVE_SQL_TRANSACTION = "25001"
READ_ONLY_TRANSACTION = "25006"
FEATURE_NOT_SUPPORTED = "0A000"
NOT_IN_PREREQUISITE_STATE = "55000"
INVALID_TEXT_REPRESENTATION = "22P02"


# -- the shard ---------------------------------------------------------------------------


def _conninfo(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _routing_url(admin_url: str) -> str:
    return (
        sa.make_url(admin_url)
        .set(username=APP_ROLE, password=None)
        .render_as_string(hide_password=False)
    )


SEED = (
    "INSERT INTO users (tenant_id, id, email, name)"
    " SELECT CAST(:t AS text), i, 'u' || i || '@' || CAST(:t AS text) || '.test',"
    " CAST(:t AS text) || '-user-' || i FROM generate_series(1, :n) AS i",
    "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
    " SELECT CAST(:t AS text), i, CAST(:t AS text) || '-charger-' || i,"
    " CAST(:t AS text) || '-bay-' || (i % 3), 11 + i, 'available'"
    " FROM generate_series(1, :n) AS i",
    "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id, started_at,"
    " ended_at, energy_kwh)"
    " SELECT CAST(:t AS text), i, i, 1 + (i % 5),"
    " timestamptz '2026-11-01 00:00+00' + i * interval '1 minute', NULL, 1.5 * i"
    " FROM generate_series(1, :n) AS i",
)


@dataclass
class Shard:
    """The probes' fleet: one shared shard ``pool`` holding alpha and beta."""

    catalog: Catalog
    admin_url: str  # the operations role (superuser)
    routing_url: str  # the routing role ``app``
    settings: TenantrySettings
    routers: list[Router] = field(default_factory=list)

    def admin(self) -> sa.Engine:
        return sa.create_engine(self.admin_url, poolclass=NullPool)

    def admin_query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        engine = self.admin()
        try:
            with engine.begin() as conn:
                result = conn.execute(text(sql), params)
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def reset(self) -> None:
        """Both tenants' rows as seeded, both active; no leftovers of an earlier probe."""
        engine = self.admin()
        try:
            with engine.begin() as conn:
                # a probe's connections are closed by now; make sure of it
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND usename = :r"
                    ),
                    {"r": APP_ROLE},
                )
                for xid in conn.execute(
                    text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                ).scalars():
                    conn.execute(text(f"ROLLBACK PREPARED '{xid}'"))
            with engine.begin() as conn:
                conn.execute(text(f'ALTER ROLE "{APP_ROLE}" RESET ALL'))
                for table in reversed(TABLES):
                    conn.execute(text(f"DELETE FROM {table}"))
                for tenant in (ME, OTHER):
                    for sql in SEED:
                        conn.execute(text(sql), {"t": tenant, "n": ROWS})
                    conn.execute(
                        text("UPDATE tenantry_residency SET state = 'active' WHERE tenant_id = :t"),
                        {"t": tenant},
                    )
        finally:
            engine.dispose()

    def checksums(self, tenant: str) -> dict[str, tuple[int, str]]:
        """table -> (row count, md5 of the sorted row texts) of *tenant*, read as the
        operations role."""
        found = {}
        for table in TABLES:
            ((count, digest),) = self.admin_query(
                f"SELECT count(*), md5(coalesce(string_agg(CAST(t AS text), '|'"
                f" ORDER BY CAST(t AS text)), '')) FROM {table} AS t WHERE t.tenant_id = :t",
                t=tenant,
            )
            found[table] = (count, digest)
        return found

    def new_router(self, **overrides: Any) -> Router:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        router = Router(catalog=self.catalog, settings=settings, listen=False, background=False)
        self.routers.append(router)
        return router

    def close_routers(self) -> None:
        for router in self.routers:
            router.close()
        self.routers.clear()


@pytest.fixture(scope="module")
def shard(pg_servers: list[str], app_role: str) -> Iterator[Shard]:
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
            routing = _routing_url(admin_url)
            catalog.add_shard("pool", routing, admin_url=admin_url, tier="shared")
            run = upgrade(catalog, jobs=1)  # what `tenantry migrate upgrade` does
            assert run.ok, [r.error for r in run.results]
            catalog.add_tenant(ME, shard="pool")
            catalog.add_tenant(OTHER, shard="pool")
            built = Shard(catalog, admin_url, routing, settings)
            built.reset()
            built.admin_query("ANALYZE")  # statistics for the pg_stats probe
            yield built
        finally:
            catalog.close()


# -- what the probes see -----------------------------------------------------------------


class Seen:
    """What a probe saw: every value is checked for beta's data at the end."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> Any:
        self.values.append(value)
        return value


@dataclass
class Ctx:
    shard: Shard
    router: Router
    seen: Seen

    def raw(self) -> psycopg.Connection[Any]:
        """A psycopg connection as the routing role, outside any router."""
        return psycopg.connect(_conninfo(self.shard.routing_url))


Runner = Callable[[Any, str], Any]


def rows(x: Any, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run *sql* on a session or connection; the rows as tuples."""
    return [tuple(r) for r in x.execute(text(sql), params)]


def tenants(x: Any, seen: Seen) -> dict[str, dict[str, int]]:
    """table -> {tenant: rows} of every tenant table, as the caller sees them."""
    found: dict[str, dict[str, int]] = {}
    for table in TABLES:
        found[table] = dict(
            seen(rows(x, f"SELECT tenant_id, count(*) FROM {table} GROUP BY 1 ORDER BY 1"))
        )
    return found


ONLY_ME = {table: {ME: ROWS} for table in TABLES}
NOTHING: dict[str, dict[str, int]] = {table: {} for table in TABLES}


def alpha_or_nothing(x: Any, seen: Seen) -> dict[str, dict[str, int]]:
    """The caller sees alpha's rows or nothing at all, table by table; never beta's."""
    found = tenants(x, seen)
    for table, counts in found.items():
        assert counts in ({}, {ME: ROWS}), f"{table}: saw {counts}"
    return found


def sees_nothing(x: Any, seen: Seen) -> None:
    assert tenants(x, seen) == NOTHING


def sees_only_alpha(x: Any, seen: Seen) -> None:
    assert tenants(x, seen) == ONLY_ME


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None)


@contextlib.contextmanager
def refused(*states: str, errors: tuple[type[BaseException], ...] = ()) -> Iterator[list[Any]]:
    """The block must fail with one of the SQLSTATEs *states* (or one of *errors*)."""
    caught: list[Any] = []
    try:
        yield caught
    except (sa.exc.DBAPIError, psycopg.Error) as exc:
        state = sqlstate(exc)
        assert state in states, f"refused with {state} ({exc}), expected one of {states}"
        caught.append(exc)
    except errors as exc:  # e.g. TenantFrozen, FenceRejected
        caught.append(exc)
    else:
        raise AssertionError(f"not refused (expected {states or errors})")


def signature(x: Any) -> str:
    """The signature the fence gave this transaction."""
    value = x.execute(text("SELECT current_setting('tenantry.signature', true)")).scalar()
    assert value, "the fence set no tenantry.signature"
    return str(value)


def pid(x: Any) -> int:
    return int(x.execute(text("SELECT pg_backend_pid()")).scalar_one())


# -- the probes --------------------------------------------------------------------------

PROBES: dict[str, Callable[[Ctx], None]] = {}


def probe(name: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        assert name not in PROBES
        PROBES[name] = fn
        return fn

    return register


# switching the tenant setting ------------------------------------------------------------


@probe("baseline-session-sees-only-alpha")
def _baseline(c: Ctx) -> None:
    with c.router.session(ME) as s:
        sees_only_alpha(s, c.seen)
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() == ME


@probe("set-tenant-id-beta")
def _set(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)
        assert s.execute(text("UPDATE chargers SET name = 'pwned'")).rowcount == 0
        assert s.execute(text("DELETE FROM users WHERE tenant_id = 'beta'")).rowcount == 0
        s.commit()


@probe("set-tenant-id-beta-on-core-connection")
def _set_core(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        conn.exec_driver_sql("SET tenantry.tenant_id = 'beta'")
        sees_nothing(conn, c.seen)
        assert conn.execute(text("UPDATE users SET name = 'pwned'")).rowcount == 0


@probe("set-local-tenant-id-beta")
def _set_local(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SET LOCAL tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)
        assert s.execute(text("UPDATE chargers SET name = 'pwned'")).rowcount == 0
        s.commit()


@probe("set-config-beta-session-wide")
def _set_config_false(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', false)"))
        sees_nothing(s, c.seen)
        s.commit()
        # the session-wide value outlives the routed transaction: still nothing
        s.execute(text("COMMIT"))
        sees_nothing(s, c.seen)


@probe("set-config-beta-transaction-local")
def _set_config_true(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        conn.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', true)"))
        sees_nothing(conn, c.seen)
        assert conn.execute(text("DELETE FROM charging_sessions")).rowcount == 0


@probe("set-config-beta-in-the-same-statement")
def _set_config_inline(c: Ctx) -> None:
    with c.router.session(ME) as s:
        # a set_config in the WHERE (after the policy's qual) and in a LATERAL before it
        found = c.seen(
            rows(
                s,
                "SELECT tenant_id, name FROM chargers"
                " WHERE set_config('tenantry.tenant_id', 'beta', true) IS NOT NULL",
            )
        )
        assert {r[0] for r in found} <= {ME}
        found = c.seen(
            rows(
                s,
                "SELECT c.tenant_id, c.name FROM"
                " (SELECT set_config('tenantry.tenant_id', 'beta', true)) AS x,"
                " LATERAL (SELECT * FROM chargers) AS c",
            )
        )
        assert {r[0] for r in found} <= {ME}
        alpha_or_nothing(s, c.seen)


@probe("savepoint-set-then-release")
def _savepoint_release(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SAVEPOINT probe"))
        s.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', true)"))
        sees_nothing(s, c.seen)
        s.execute(text("RELEASE SAVEPOINT probe"))
        sees_nothing(s, c.seen)
        assert s.execute(text("UPDATE users SET name = 'pwned'")).rowcount == 0
        s.commit()


@probe("savepoint-set-then-rollback-to")
def _savepoint_rollback(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SAVEPOINT probe"))
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)
        s.execute(text("ROLLBACK TO SAVEPOINT probe"))
        sees_only_alpha(s, c.seen)  # back to the fence's own setting


@probe("orm-nested-savepoint-set")
def _nested(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with s.begin_nested():
            s.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', false)"))
            sees_nothing(s, c.seen)
        alpha_or_nothing(s, c.seen)
        s.commit()


@probe("reset-tenant-id")
def _reset(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("RESET tenantry.tenant_id"))
        alpha_or_nothing(s, c.seen)
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        s.execute(text("RESET tenantry.signature"))
        sees_nothing(s, c.seen)


@probe("reset-all")
def _reset_all(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("RESET ALL"))
        alpha_or_nothing(s, c.seen)
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)


@probe("discard-all-in-a-transaction")
def _discard(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(ACTIVE_SQL_TRANSACTION):  # DISCARD ALL cannot run in a transaction
            s.execute(text("DISCARD ALL"))
    with c.router.session(ME) as s:
        s.execute(text("COMMIT"))
        with refused(ACTIVE_SQL_TRANSACTION):  # psycopg begins a transaction first
            s.execute(text("DISCARD ALL"))
    with c.router.session(ME) as s:
        sees_only_alpha(s, c.seen)


@probe("do-block-set-config")
def _do_block(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(
            text(
                "DO $$ BEGIN PERFORM set_config('tenantry.tenant_id', 'beta', true);"
                " PERFORM set_config('tenantry.signature',"
                " current_setting('tenantry.signature'), true); END $$"
            )
        )
        sees_nothing(s, c.seen)


@probe("alter-role-set-tenant-id")
def _alter_role(c: Ctx) -> None:
    # An ordinary role may set its own defaults: the next connection starts as "beta"
    # with alpha's signature, but the signature is bound to the backend and the tenant.
    # (PostgreSQL 15 refuses it for a placeholder setting: 42501, permission denied to
    # set parameter; where it is allowed, what follows must hold anyway.)
    with c.router.session(ME) as s:
        sig = signature(s)
        try:
            with s.begin_nested():
                s.execute(text("ALTER ROLE CURRENT_USER SET tenantry.tenant_id = 'beta'"))
                s.execute(text(f"ALTER ROLE CURRENT_USER SET tenantry.signature = '{sig}'"))
        except sa.exc.DBAPIError as exc:
            assert sqlstate(exc) == INSUFFICIENT_PRIVILEGE, exc
        s.commit()
    with c.raw() as raw:
        for table in TABLES:
            assert raw.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    fresh = c.shard.new_router()
    with fresh.connection(ME) as conn:
        sees_only_alpha(conn, c.seen)
        conn.execute(text("COMMIT"))
        sees_nothing(conn, c.seen)


# the signature ---------------------------------------------------------------------------


@probe("keep-alpha-signature-then-set-beta")
def _sig_then_beta(c: Ctx) -> None:
    with c.router.session(ME) as s:
        sig = signature(s)
        s.execute(
            text(
                "SELECT set_config('tenantry.signature', :sig, false),"
                " set_config('tenantry.tenant_id', 'beta', false)"
            ),
            {"sig": sig},
        )
        sees_nothing(s, c.seen)
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() is None
        s.commit()
        s.execute(text("COMMIT"))  # now only the session-wide copies are left
        sees_nothing(s, c.seen)


@probe("alpha-signature-replayed-after-commit-same-connection")
def _sig_after_commit(c: Ctx) -> None:
    # The spec allows a replay on the same backend for the same tenant: alpha at most.
    with c.router.connection(ME) as conn:
        sig = signature(conn)
        conn.execute(
            text(
                "SELECT set_config('tenantry.signature', :sig, false),"
                " set_config('tenantry.tenant_id', 'alpha', false)"
            ),
            {"sig": sig},
        )
        conn.execute(text("COMMIT"))
        alpha_or_nothing(conn, c.seen)
        conn.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', false)"))
        sees_nothing(conn, c.seen)
        with refused(INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION):
            conn.execute(
                text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " VALUES ('beta', 99, 'x@beta.test', 'beta-planted')"
                )
            )


@probe("alpha-signature-replayed-on-a-second-router-connection")
def _sig_other_routed(c: Ctx) -> None:
    with c.router.connection(ME) as first, c.router.connection(ME) as second:
        assert pid(first) != pid(second)
        sig = signature(first)
        second.execute(
            text(
                "SELECT set_config('tenantry.signature', :sig, true),"
                " set_config('tenantry.tenant_id', 'beta', true)"
            ),
            {"sig": sig},
        )
        sees_nothing(second, c.seen)
        second.execute(text("SELECT set_config('tenantry.tenant_id', 'alpha', true)"))
        # back to its own tenant: second's own fence stamped this transaction for alpha
        sees_only_alpha(second, c.seen)
        sees_only_alpha(first, c.seen)


@probe("alpha-signature-replayed-on-a-raw-routing-connection")
def _sig_raw(c: Ctx) -> None:
    with c.router.session(ME) as s:
        sig = signature(s)
        with c.raw() as raw:
            for tenant in (OTHER, ME):
                with raw.transaction():
                    raw.execute(
                        "SELECT set_config('tenantry.signature', %s, true),"
                        " set_config('tenantry.tenant_id', %s, true)",
                        (sig, tenant),
                    )
                    for table in TABLES:
                        found = c.seen(raw.execute(f"SELECT * FROM {table}").fetchall())
                        assert found == [], f"replay as {tenant} saw {table}"
                    assert raw.execute("SELECT tenantry.tenant()").fetchone() == (None,)
        sees_only_alpha(s, c.seen)


@probe("fence-function-beta-with-alpha-signature")
def _fence_beta(c: Ctx) -> None:
    with c.router.session(ME) as s:
        sig = signature(s)
        with refused(INVALID_AUTHORIZATION, errors=(TenantryError,)):
            s.execute(text("SELECT tenantry.fence('beta', :sig)"), {"sig": sig})
    with c.router.session(ME) as s:
        sig = signature(s)
        with refused(INVALID_AUTHORIZATION, errors=(TenantryError,)):
            with s.begin_nested():
                s.execute(text("SELECT tenantry.fence('beta', :sig)"), {"sig": sig})
        alpha_or_nothing(s, c.seen)


@probe("fence-function-beta-with-made-up-signatures")
def _fence_forged(c: Ctx) -> None:
    well_formed = ["1:" + "0" * 64, "0:" + "ab" * 32, "2:" + "f" * 64, "9999:" + "1" * 64]
    for sig in well_formed:
        with c.router.session(ME) as s:
            with refused(INVALID_AUTHORIZATION, errors=(TenantryError,)):
                s.execute(text("SELECT tenantry.fence('beta', :sig)"), {"sig": sig})
    for sig in ["", "1:", "not a signature", ":" * 3, "1:zz"]:
        # malformed: refused as a bad signature, or as bad input (class 22)
        with c.router.session(ME) as s:
            try:
                s.execute(text("SELECT tenantry.fence('beta', :sig)"), {"sig": sig})
            except TenantryError:
                pass
            except sa.exc.DBAPIError as exc:
                state = sqlstate(exc) or ""
                assert state == INVALID_AUTHORIZATION or state.startswith("22"), exc
            else:
                raise AssertionError(f"signature {sig!r} accepted")
    with c.raw() as raw:  # outside any routed transaction too
        with refused(INVALID_AUTHORIZATION):
            raw.execute("SELECT tenantry.fence('beta', %s)", ("1:" + "0" * 64,))


@probe("fence-function-alpha-replayed")
def _fence_alpha(c: Ctx) -> None:
    # The setting holds the transaction's token, not the router's signature (which never
    # leaves the fence function): handing it back to the fence is refused.
    with c.router.session(ME) as s:
        token = signature(s)
        with pytest.raises(sa.exc.DBAPIError) as refused:
            s.execute(text("SELECT tenantry.fence('alpha', :sig)"), {"sig": token})
        assert getattr(refused.value.orig, "sqlstate", None) == "28000"


@probe("tenant-functions-called-directly")
def _tenant_fn(c: Ctx) -> None:
    with c.router.session(ME) as s:
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() == ME
        assert s.execute(text("SELECT tenantry.writable_tenant()")).scalar() == ME
        s.execute(text("SET LOCAL tenantry.tenant_id = 'beta'"))
        assert s.execute(text("SELECT tenantry.tenant()")).scalar() is None
    with c.raw() as raw:
        assert raw.execute("SELECT tenantry.tenant()").fetchone() == (None,)


# temporary objects, search_path, roles -------------------------------------------------------


@probe("create-temp-table-shadowing-chargers")
def _temp_table(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("CREATE TEMP TABLE chargers (tenant_id text, id int, name text)"))
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("CREATE TEMP TABLE fence_keys (key_id int, ipad bytea, opad bytea)"))


@probe("create-plpgsql-function-in-pg-temp")
def _temp_function(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(
                text(
                    "CREATE FUNCTION pg_temp.tenant() RETURNS text"
                    " LANGUAGE plpgsql AS $$ BEGIN RETURN 'beta'; END $$"
                )
            )


@probe("create-function-view-or-schema")
def _create_objects(c: Ctx) -> None:
    for sql in (
        "CREATE FUNCTION public.leak() RETURNS text LANGUAGE sql AS $$ SELECT 'beta' $$",
        "CREATE VIEW public.all_chargers AS SELECT * FROM chargers",
        "CREATE SCHEMA probe",
        "CREATE TABLE tenantry.probe (x int)",
        "CREATE TABLE public.chargers_copy AS SELECT * FROM chargers",
    ):
        with c.router.session(ME) as s:
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(sql))


@probe("set-search-path")
def _search_path(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SET search_path = pg_temp, pg_catalog, public"))
        found = c.seen(rows(s, "SELECT tenant_id FROM public.chargers"))
        assert {r[0] for r in found} <= {ME}
        s.execute(text("SET search_path = pg_catalog"))
        found = c.seen(rows(s, "SELECT tenant_id FROM public.users"))
        assert {r[0] for r in found} <= {ME}
        s.execute(text("SET search_path = public"))
        alpha_or_nothing(s, c.seen)


@probe("set-role-to-the-owner")
def _set_role(c: Ctx) -> None:
    owner = c.shard.admin_query("SELECT tableowner FROM pg_tables WHERE tablename = 'chargers'")
    for sql in (f'SET ROLE "{owner[0][0]}"', "SET ROLE pg_read_all_data"):
        with c.router.session(ME) as s:
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(sql))


@probe("set-session-authorization-to-the-owner")
def _session_auth(c: Ctx) -> None:
    owner = c.shard.admin_query("SELECT tableowner FROM pg_tables WHERE tablename = 'chargers'")
    with c.router.connection(ME) as conn:
        with refused(INSUFFICIENT_PRIVILEGE):
            conn.exec_driver_sql(f'SET SESSION AUTHORIZATION "{owner[0][0]}"')


@probe("row-security-off")
def _row_security_off(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SET row_security = off"))
        with refused(INSUFFICIENT_PRIVILEGE):  # "query would be affected by row-level security"
            s.execute(text("SELECT * FROM chargers")).all()


@probe("disable-rls-truncate-drop-policy")
def _owner_only(c: Ctx) -> None:
    for sql in (
        "ALTER TABLE chargers DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE chargers NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY IF EXISTS tenantry_read ON chargers",
        "CREATE POLICY probe ON chargers USING (true)",
        "TRUNCATE charging_sessions",  # TRUNCATE ignores policies: no privilege for it
        "ALTER FUNCTION tenantry.tenant() OWNER TO CURRENT_USER",
        "CREATE OR REPLACE FUNCTION tenantry.tenant() RETURNS text LANGUAGE sql"
        " AS $$ SELECT 'beta' $$",
    ):
        with c.router.session(ME) as s:
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(sql))


# tenantry's own tables ------------------------------------------------------------------------


@probe("read-tenantry-residency")
def _residency(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("SELECT tenant_id, state FROM tenantry_residency")).all()
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("UPDATE tenantry_residency SET state = 'active'"))


@probe("read-tenantry-fence-keys")
def _keys(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("SELECT * FROM tenantry.fence_keys")).all()
    for sql in (
        "INSERT INTO tenantry.fence_keys (key_id, secret, ipad, opad, created_at)"
        " VALUES (777, '\\x00', '\\x00', '\\x00', now())",
        "UPDATE tenantry.fence_keys SET ipad = opad",
        "DELETE FROM tenantry.fence_keys",
    ):
        with c.router.session(ME) as s:
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(sql))
    with c.raw() as raw:
        with refused(INSUFFICIENT_PRIVILEGE):
            raw.execute("SELECT * FROM tenantry.fence_keys").fetchall()


@probe("read-server-files")
def _files(c: Ctx) -> None:
    for sql in (
        "SELECT pg_read_file('PG_VERSION')",
        "SELECT pg_ls_dir('.')",
        "SELECT pg_read_binary_file('global/pg_control')",
        "SELECT lo_import('/etc/hostname')",
        "COPY chargers TO '/tmp/tenantry-probe.csv'",
        "COPY chargers FROM PROGRAM 'true'",
    ):
        with c.router.session(ME) as s:
            with refused(INSUFFICIENT_PRIVILEGE):
                s.execute(text(sql))


# ending the routed transaction from inside ---------------------------------------------------


@probe("raw-commit-then-select-and-write")
def _commit(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("COMMIT"))
        sees_nothing(s, c.seen)
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        sees_nothing(s, c.seen)
        assert s.execute(text("UPDATE chargers SET name = 'pwned'")).rowcount == 0
        assert s.execute(text("DELETE FROM users WHERE tenant_id = 'beta'")).rowcount == 0
        with refused(INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION):
            s.execute(
                text(
                    "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                    " VALUES ('beta', 99, 'beta-planted', 'x', 1, 'available')"
                )
            )
        s.commit()


@probe("raw-commit-on-core-connection")
def _commit_core(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        conn.exec_driver_sql("COMMIT")
        sees_nothing(conn, c.seen)
        assert conn.execute(text("DELETE FROM charging_sessions")).rowcount == 0
        conn.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', false)"))
        sees_nothing(conn, c.seen)


@probe("raw-rollback-then-select-and-write")
def _rollback(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("ROLLBACK"))
        sees_nothing(s, c.seen)
        s.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', true)"))
        sees_nothing(s, c.seen)
        assert s.execute(text("UPDATE users SET name = 'pwned'")).rowcount == 0
        with refused(INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION):
            s.execute(
                text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " VALUES ('beta', 99, 'x@beta.test', 'beta-planted')"
                )
            )


@probe("raw-commit-then-begin-and-set")
def _commit_begin(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        conn.exec_driver_sql("COMMIT")
        conn.exec_driver_sql("BEGIN")  # a warning: psycopg began one already
        conn.exec_driver_sql("SET LOCAL tenantry.tenant_id = 'beta'")
        sees_nothing(conn, c.seen)


@probe("prepare-transaction")
def _prepare(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        try:
            s.execute(text("PREPARE TRANSACTION 'tenantry-probe'"))
        except sa.exc.DBAPIError as exc:
            # refused: the fence set its stamp, a temporary object, so PostgreSQL will not
            # prepare the transaction (0A000); or prepared transactions are disabled
            assert sqlstate(exc) in ("0A000", NOT_IN_PREREQUISITE_STATE), exc
        else:
            # allowed: the routed transaction is parked; what follows is outside it
            sees_nothing(s, c.seen)
    assert c.shard.admin_query("SELECT count(*) FROM pg_prepared_xacts") in ([(0,)], [(1,)])


@probe("prepared-statement-executed-after-switch")
def _prepared_statement(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("PREPARE probe_q AS SELECT tenant_id, name FROM chargers"))
        assert {r[0] for r in c.seen(rows(s, "EXECUTE probe_q"))} == {ME}
        s.execute(text("SET tenantry.tenant_id = 'beta'"))
        assert c.seen(rows(s, "EXECUTE probe_q")) == []
        s.execute(text("COMMIT"))
        assert c.seen(rows(s, "EXECUTE probe_q")) == []


@probe("cursor-declared-then-switch")
def _cursor(c: Ctx) -> None:
    with c.router.session(ME) as s:
        s.execute(text("DECLARE probe_c CURSOR WITH HOLD FOR SELECT tenant_id, name FROM users"))
        s.execute(text("SELECT set_config('tenantry.tenant_id', 'beta', true)"))
        found = c.seen(rows(s, "FETCH ALL FROM probe_c"))
        assert {r[0] for r in found} <= {ME}


@probe("pooled-connection-left-with-beta-settings")
def _pool_poison(c: Ctx) -> None:
    # beta's own request (say, a second-order injection) leaves session-wide settings
    # on its pooled connection; alpha's next request on that backend ends the routed
    # transaction with a raw COMMIT.
    router = c.shard.new_router(pool_size_shared=1, max_overflow=0)
    with router.session(OTHER) as s:
        theirs = pid(s)
        s.execute(
            text(
                "SELECT set_config('tenantry.signature', current_setting('tenantry.signature'),"
                " false), set_config('tenantry.tenant_id', 'beta', false)"
            )
        )
        s.commit()
    with router.session(ME) as s:
        assert pid(s) == theirs
        sees_only_alpha(s, c.seen)
        s.execute(text("COMMIT"))
        alpha_or_nothing(s, c.seen)
        assert s.execute(text("UPDATE chargers SET name = 'pwned'")).rowcount == 0


def stash_beta_then_read_as_alpha(c: Ctx, **settings: Any) -> None:
    """A session-wide custom setting filled in beta's request, read in alpha's next
    request on that pooled backend."""
    router = c.shard.new_router(pool_size_shared=1, max_overflow=0, **settings)
    with router.session(OTHER) as s:
        theirs = pid(s)
        s.execute(
            text(
                "SELECT set_config('probe.stash',"
                " (SELECT string_agg(email, ',') FROM users), false)"
            )
        )
        s.commit()
    with router.session(ME) as s:
        assert pid(s) == theirs
        c.seen(s.execute(text("SELECT current_setting('probe.stash', true)")).scalar())


@probe("pooled-connection-left-with-a-stash-of-beta-rows")
def _pool_stash(c: Ctx) -> None:
    # With TENANTRY_RESET_CONNECTIONS the router discards session state at checkin.
    stash_beta_then_read_as_alpha(c, reset_connections=True)


@probe("other-backends-query-text-shows-no-signature")
def _activity(c: Ctx) -> None:
    # The routing role sees its own other sessions in pg_stat_activity: beta's fence
    # must not show beta's signature there (it is a bound parameter, not SQL text).
    # Beta's session is looked at right after its fence (entering the session runs it),
    # before any statement of its own replaces the query text.
    with c.router.session(OTHER) as theirs, c.router.session(ME) as s:
        # its pid as libpq knows it: a query would replace the text looked at
        theirs_pid = theirs.connection().connection.dbapi_connection.info.backend_pid
        found = rows(
            s,
            "SELECT pid, state, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert found, "the routing role sees none of its other sessions"
        fenced = [r for r in found if r[0] == theirs_pid]
        assert fenced and "tenantry.fence" in str(fenced[0][2]), found  # the window itself
        hmac_hex = re.compile(r"[0-9a-f]{64}")
        assert not [r for r in found if hmac_hex.search(str(r[2])) or "beta" in str(r[2])], found
        c.seen(found)


# raw writes naming beta ---------------------------------------------------------------------


@probe("update-and-delete-where-tenant-is-beta")
def _update_delete(c: Ctx) -> None:
    with c.router.session(ME) as s:
        for table in TABLES:
            sql = f"UPDATE {table} SET id = id WHERE tenant_id = 'beta'"
            assert s.execute(text(sql)).rowcount == 0
        assert s.execute(text("UPDATE users SET name = 'pwned' WHERE true")).rowcount == ROWS
        assert (
            s.execute(text("DELETE FROM charging_sessions WHERE tenant_id = 'beta'")).rowcount == 0
        )
        found = c.seen(
            rows(s, "UPDATE chargers SET status = status WHERE tenant_id <> 'alpha' RETURNING *")
        )
        assert found == []
        s.rollback()


@probe("insert-a-beta-row")
def _insert(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):  # "violates row-level security policy"
            s.execute(
                text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " VALUES ('beta', 99, 'x@beta.test', 'beta-planted')"
                )
            )
    with c.router.connection(ME) as conn:
        with refused(INSUFFICIENT_PRIVILEGE):
            conn.exec_driver_sql(
                "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                " SELECT 'beta', 100 + id, name, location, power_kw, status FROM chargers"
            )


@probe("upsert-onto-a-beta-key")
def _upsert(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(
                text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " VALUES ('beta', 1, 'x@beta.test', 'x')"
                    " ON CONFLICT (tenant_id, id) DO UPDATE SET name = 'pwned'"
                )
            )
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(
                text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " VALUES ('beta', 1, 'x@beta.test', 'x') ON CONFLICT DO NOTHING"
                )
            )


@probe("merge-onto-beta-rows")
def _merge(c: Ctx) -> None:
    # beta's row is invisible, so MERGE takes it as "not matched" and inserts: refused
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(
                text(
                    "MERGE INTO users u USING (SELECT 'beta' AS t, 1 AS id) AS x"
                    " ON u.tenant_id = x.t AND u.id = x.id"
                    " WHEN MATCHED THEN UPDATE SET name = 'pwned'"
                    " WHEN NOT MATCHED THEN INSERT (tenant_id, id, email, name)"
                    " VALUES (x.t, x.id, 'x@beta.test', 'beta-planted')"
                )
            )
    with c.router.session(ME) as s:
        result = s.execute(
            text(
                "MERGE INTO chargers c USING (SELECT 'beta' AS t, id FROM generate_series(1, 20)"
                " AS id) AS x ON c.tenant_id = x.t AND c.id = x.id"
                " WHEN MATCHED THEN DELETE"
            )
        )
        assert result.rowcount == 0


@probe("update-moving-alpha-rows-to-beta")
def _move_rows(c: Ctx) -> None:
    with c.router.session(ME) as s:
        with refused(INSUFFICIENT_PRIVILEGE):
            s.execute(text("UPDATE chargers SET tenant_id = 'beta', id = id + 1000"))


@probe("copy-to-stdout")
def _copy_out(c: Ctx) -> None:
    with c.router.session(ME) as s:
        dbapi: Any = s.connection().connection.dbapi_connection
        for sql in (
            "COPY chargers TO STDOUT",
            "COPY users (tenant_id, email) TO STDOUT",
            "COPY (SELECT * FROM charging_sessions) TO STDOUT",
        ):
            with dbapi.cursor() as cur, cur.copy(sql) as copy:
                data = b"".join(bytes(block) for block in copy)
            c.seen(data.decode())
            lines = data.decode().splitlines()
            assert len(lines) == ROWS and all(line.startswith("alpha\t") for line in lines)


@probe("copy-from-stdin-beta-rows")
def _copy_in(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        dbapi: Any = conn.connection.dbapi_connection
        with refused(FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE):
            with (
                dbapi.cursor() as cur,
                cur.copy("COPY users (tenant_id, id, email, name) FROM STDIN") as copy,
            ):
                copy.write_row(("beta", 99, "x@beta.test", "beta-planted"))


# reads by other shapes ------------------------------------------------------------------------


@probe("cte-subquery-union-reads")
def _shapes(c: Ctx) -> None:
    with c.router.session(ME) as s:
        queries = {
            "WITH b AS (SELECT * FROM chargers WHERE tenant_id = 'beta') SELECT count(*) FROM b": 0,
            "SELECT (SELECT count(*) FROM users WHERE tenant_id = 'beta')": 0,
            "SELECT count(*) FROM users WHERE tenant_id = 'beta' OR true": ROWS,
            "SELECT count(*) FROM (SELECT tenant_id FROM chargers UNION ALL"
            " SELECT tenant_id FROM users) AS u": 2 * ROWS,
            "SELECT count(*) FROM chargers c JOIN charging_sessions x ON x.charger_id = c.id": ROWS,
            "WITH RECURSIVE r AS (SELECT tenant_id, id FROM users UNION"
            " SELECT u.tenant_id, u.id FROM users u JOIN r ON u.id = r.id + 1) "
            "SELECT count(*) FROM r": ROWS,
            "SELECT count(*) FROM chargers WHERE tenant_id = ANY(ARRAY['alpha', 'beta'])": ROWS,
            "SELECT count(*) FROM users WHERE EXISTS (SELECT 1 FROM users b"
            " WHERE b.tenant_id = 'beta')": 0,
        }
        for sql, expected in queries.items():
            assert c.seen(s.execute(text(sql)).scalar()) == expected, sql
        found = c.seen(rows(s, "SELECT to_jsonb(u) FROM users u"))
        assert len(found) == ROWS
        found = c.seen(rows(s, "SELECT string_agg(name, ',') FROM chargers"))


@probe("functions-and-aggregates-over-the-tables")
def _functions(c: Ctx) -> None:
    with c.router.connection(ME) as conn:
        for sql in (
            "SELECT json_agg(c) FROM chargers c",
            "SELECT array_agg(email ORDER BY email) FROM users",
            "SELECT query_to_xml('SELECT * FROM chargers', true, false, '')",
            "SELECT table_to_xml('users', true, false, '')",
            "SELECT max(tenant_id), min(tenant_id) FROM charging_sessions",
        ):
            value = c.seen(conn.execute(text(sql)).scalar())
            assert value is not None and "alpha" in str(value), sql


@probe("cast-error-message-leak")
def _cast_error(c: Ctx) -> None:
    # Policies run before a user's leaky qual: an error shows an alpha value, never beta's.
    with c.router.session(ME) as s:
        with refused(INVALID_TEXT_REPRESENTATION) as caught:
            s.execute(text("SELECT * FROM chargers WHERE CAST(name AS integer) > 0")).all()
        c.seen(str(caught[0]))
        assert "alpha" in str(caught[0])


@probe("statistics-and-plans")
def _stats(c: Ctx) -> None:
    with c.router.session(ME) as s:
        stats = c.seen(
            rows(
                s,
                "SELECT tablename, attname, CAST(most_common_vals AS text),"
                " CAST(histogram_bounds AS text) FROM pg_stats"
                " WHERE tablename IN ('users', 'chargers', 'charging_sessions')",
            )
        )
        assert stats == []  # pg_stats hides tables whose policies bind the reader
        plan = c.seen(rows(s, "EXPLAIN (ANALYZE, VERBOSE, COSTS OFF) SELECT * FROM chargers"))
        assert plan


# -- the test ----------------------------------------------------------------------------------


def _no_beta(value: Any) -> None:
    shown = repr(value)
    assert OTHER not in shown, f"the probe saw beta's data: {shown[:500]}"


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_cannot_reach_beta(shard: Shard, name: str) -> None:
    shard.reset()
    beta_before, alpha_before = shard.checksums(OTHER), shard.checksums(ME)
    assert beta_before["users"][0] == ROWS
    seen = Seen()
    try:
        PROBES[name](Ctx(shard, shard.new_router(), seen))
    finally:
        shard.close_routers()
        # the role is the whole server's: take back any default a probe gave it
        shard.admin_query(f'ALTER ROLE "{APP_ROLE}" RESET ALL')
    for value in seen.values:
        _no_beta(value)
    assert shard.checksums(OTHER) == beta_before, "beta's rows changed"
    assert shard.checksums(ME) == alpha_before, "alpha's rows changed (no probe commits any)"


def test_there_are_enough_probes() -> None:
    assert len(PROBES) >= 30


def test_the_routing_role_binds_rls(shard: Shard) -> None:
    """The control: rows of both tenants exist, and the routing role is plain."""
    ((superuser, bypass),) = shard.admin_query(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r", r=APP_ROLE
    )
    assert (superuser, bypass) == (False, False)
    counts = shard.admin_query("SELECT tenant_id, count(*) FROM chargers GROUP BY 1 ORDER BY 1")
    assert counts == [(ME, ROWS), (OTHER, ROWS)]
    owners = shard.admin_query(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename = ANY(:t)", t=list(TABLES)
    )
    assert owners != [(APP_ROLE,)]
    with psycopg.connect(_conninfo(shard.routing_url)) as raw:
        # no fence: fail closed
        for table in TABLES:
            assert raw.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        with refused(INSUFFICIENT_PRIVILEGE):
            raw.execute("CREATE TEMP TABLE probe (x int)")


def test_without_reset_connections_session_state_reaches_the_next_tenant(shard: Shard) -> None:
    """The documented gap (README, "What the database does not stop"): without
    ``reset_connections`` a session-wide setting made by SQL run inside beta's own
    transaction is still on the pooled connection when alpha's transaction gets it."""
    shard.reset()
    seen = Seen()
    try:
        stash_beta_then_read_as_alpha(Ctx(shard, shard.new_router(), seen))
    finally:
        shard.close_routers()
    (stash,) = seen.values
    assert stash is not None and stash.count("@") == ROWS  # beta's e-mails, all of them
    with pytest.raises(AssertionError):
        _no_beta(stash)
