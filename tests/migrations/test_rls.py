"""Row-level security installed by the fleet run on PostgreSQL shared shards, and the
status warnings about routing roles that bypass it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fleet_helpers import PASSWORD, Cli, engine, query, with_password

from tenantry import Catalog, load_settings, migrations
from tenantry.demo import MIGRATIONS
from tenantry.migrations.rls import POLICY_NAMES
from tenantry.testing import DatabaseFactory

TENANT_TABLES = ["charging_sessions", "chargers", "users"]
POLICIES = sorted(POLICY_NAMES)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with Catalog(
        url, settings=load_settings(catalog_url=url, alembic_config=str(MIGRATIONS))
    ) as cat:
        cat.init()
        yield cat


def rls_flags(url: str) -> dict[str, tuple[bool, bool]]:
    """table -> (relrowsecurity, relforcerowsecurity) of every table in ``public``."""
    rows = query(
        url,
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r'",
    )
    return {name: (bool(row), bool(force)) for name, row, force in rows}


def policies(url: str) -> dict[str, list[str]]:
    rows = query(url, "SELECT tablename, policyname FROM pg_policies ORDER BY 1, 2")
    found: dict[str, list[str]] = {}
    for table, policy in rows:
        found.setdefault(table, []).append(policy)
    return found


def seed(admin_url: str) -> None:
    """Two tenants' chargers, written as the operations role (which bypasses RLS)."""
    query(
        admin_url,
        "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status) VALUES "
        "('a', 1, 'a1', 'x', 22, 'available'), ('a', 2, 'a2', 'x', 50, 'available'), "
        "('b', 1, 'b1', 'y', 11, 'available')",
    )


def fence(conn: sa.Connection, catalog: Catalog, shard: str, tenant: str) -> str | None:
    """Run the signed fence by hand, as the router does: the residency state."""
    pid = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
    signature = catalog.fence_key(shard).sign(tenant, pid)
    state: str | None = conn.scalar(
        sa.text("SELECT tenantry.fence(:t, :s)"), {"t": tenant, "s": signature}
    )
    return state


def test_the_run_installs_rls_that_binds_the_routing_role(
    catalog: Catalog,
    make_pg_database: DatabaseFactory,
    make_role: Callable[..., str],
) -> None:
    app = make_role("NOSUPERUSER NOBYPASSRLS")
    shared, dedicated = make_pg_database(0), make_pg_database(0)
    for name, url, tier in (("shared", shared, "shared"), ("dedicated", dedicated, "dedicated")):
        catalog.add_shard(
            name, with_password(url, user=app), admin_url=with_password(url), tier=tier
        )

    result = migrations.upgrade(catalog, jobs=1)
    assert result.ok and {r.result for r in result.results} == {"upgraded"}
    seed(shared)
    seed(dedicated)
    for url in (shared, dedicated):
        query(url, "INSERT INTO tenantry_residency VALUES ('a', 'active', 1, now())")
    as_app = engine(with_password(shared, user=app))
    try:
        with as_app.begin() as conn:
            assert conn.scalar(sa.text("SELECT current_user")) == app
            # no tenant setting: fail closed, nothing at all
            assert conn.execute(sa.text("SELECT * FROM chargers")).all() == []
            assert conn.scalar(sa.text("SELECT count(*) FROM users")) == 0
        with as_app.begin() as conn:
            # the plain setting is not enough any more: only a signed fence admits rows
            conn.execute(sa.text("SELECT set_config('tenantry.tenant_id', 'a', true)"))
            assert conn.scalar(sa.text("SELECT count(*) FROM chargers")) == 0
        with as_app.begin() as conn:
            assert fence(conn, catalog, "shared", "a") == "active"
            rows = conn.execute(sa.text("SELECT tenant_id, id FROM chargers ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [("a", 1), ("a", 2)]
            # the routing role was granted what routing needs: its own tenant's writes
            conn.execute(
                sa.text(
                    "INSERT INTO users (tenant_id, id, email, name) "
                    "VALUES ('a', 1, 'x@a.test', 'x')"
                )
            )
        with as_app.begin() as conn:
            # the setting was transaction-local: gone again
            assert conn.scalar(sa.text("SELECT count(*) FROM chargers")) == 0
        with pytest.raises(sa.exc.ProgrammingError, match="violates row-level security policy"):
            with as_app.begin() as conn:
                fence(conn, catalog, "shared", "a")
                conn.execute(
                    sa.text(
                        "INSERT INTO users (tenant_id, id, email, name) "
                        "VALUES ('b', 9, 'x@b.test', 'x')"
                    )
                )
        with pytest.raises(sa.exc.ProgrammingError, match="violates row-level security policy"):
            with as_app.begin() as conn:
                fence(conn, catalog, "shared", "a")
                conn.execute(sa.text("UPDATE chargers SET tenant_id = 'b' WHERE id = 2"))
        for statement in ("SELECT * FROM tenantry_residency", "DELETE FROM tenantry_residency"):
            # the residency is read through the fence only; the keys never
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                with as_app.begin() as conn:
                    conn.execute(sa.text(statement))
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            with as_app.begin() as conn:
                conn.execute(sa.text("SELECT * FROM tenantry.fence_keys"))
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            with as_app.begin() as conn:
                conn.execute(sa.text("CREATE TEMP TABLE chargers (tenant_id text)"))
    finally:
        as_app.dispose()
    assert query(shared, "SELECT tenant_id, count(*) FROM users GROUP BY 1") == [("a", 1)]

    flags = rls_flags(shared)
    assert {t: flags[t] for t in TENANT_TABLES} == dict.fromkeys(TENANT_TABLES, (True, True))
    assert flags["tenantry_residency"] == (False, False)  # no grant at all to the router
    assert policies(shared) == {key: POLICIES for key in TENANT_TABLES}
    # dedicated shards hold one tenant, and get the same policies: they refuse writes
    # while the tenant is frozen, whatever SQL the application sends
    assert {t: rls_flags(dedicated)[t] for t in TENANT_TABLES} == dict.fromkeys(
        TENANT_TABLES, (True, True)
    )
    assert policies(dedicated) == {key: POLICIES for key in TENANT_TABLES}
    as_dedicated = engine(with_password(dedicated, user=app))
    try:
        with as_dedicated.begin() as conn:
            # marked dedicated by the run and holding one tenant, its tenant is a
            # constant there (shard revision s0007): its rows, with or without a fence
            assert conn.scalar(sa.text("SELECT tenantry.tenant()")) == "a"
            assert conn.scalar(sa.text("SELECT count(*) FROM chargers")) == 2
            assert fence(conn, catalog, "dedicated", "a") == "active"
            assert conn.scalar(sa.text("SELECT count(*) FROM chargers")) == 2
    finally:
        as_dedicated.dispose()

    # idempotent: re-runs, and a table dropped and made again, end with one policy each
    again = migrations.upgrade(catalog, jobs=1)
    assert {r.result for r in again.results} == {"skipped"}
    migrations.downgrade(catalog, "d0001", shards=["shared"], jobs=1)
    assert policies(shared) == {key: POLICIES for key in ["chargers", "users"]}
    migrations.upgrade(catalog, shards=["shared"], jobs=1)
    assert policies(shared) == {key: POLICIES for key in TENANT_TABLES}
    assert rls_flags(shared)["charging_sessions"] == (True, True)
    with as_app.begin() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM charging_sessions")) == 0
    as_app.dispose()


def test_status_warns_about_routing_roles_that_bypass_rls(
    catalog: Catalog,
    make_pg_database: DatabaseFactory,
    make_role: Callable[..., str],
) -> None:
    app = make_role("NOSUPERUSER NOBYPASSRLS")
    bypass = make_role("NOSUPERUSER BYPASSRLS")
    urls = {name: make_pg_database(0) for name in ("s-app", "s-bypass", "s-one", "d-one")}
    catalog.add_shard(
        "s-app", with_password(urls["s-app"], user=app), admin_url=with_password(urls["s-app"])
    )
    catalog.add_shard(
        "s-bypass",
        with_password(urls["s-bypass"], user=bypass),
        admin_url=with_password(urls["s-bypass"]),
    )
    catalog.add_shard("s-one", with_password(urls["s-one"]))  # the superuser routes
    catalog.add_shard("d-one", with_password(urls["d-one"]), tier="dedicated")
    assert migrations.upgrade(catalog, jobs=1).ok

    found = migrations.status(catalog)
    assert found.in_step  # warnings do not make the schema out of step
    warnings = {s.shard: s.warnings for s in found.shards}
    assert warnings["s-app"] == ()
    assert warnings["d-one"] == ()  # a dedicated shard has no policies to bypass
    (bypassing,) = warnings["s-bypass"]
    assert bypassing == (
        f"shard 's-bypass': the routing role '{bypass}' has BYPASSRLS, so row-level security "
        "does nothing for it: run `tenantry shard secure s-bypass` (a routing role with only "
        "the grants it needs)"
    )
    one_url, superuser = warnings["s-one"]
    assert "one URL serves routing and operations" in one_url
    assert "the routing role 'postgres' is a superuser" in superuser

    run = Cli(catalog.settings.catalog_url, {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)})
    out = run("migrate", "status")
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 3
    assert all("'s-bypass'" in line or "'s-one'" in line for line in lines)
    assert "in step: all 4 shard(s) at d0002" in out
    doc = run.json("migrate", "status")
    assert doc["warnings"] == [bypassing, one_url, superuser]
    assert PASSWORD not in str(found)
