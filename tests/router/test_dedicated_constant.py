"""A dedicated database's tenant as a constant (shard revision s0007), attacked.

On a dedicated shard holding one tenant the policies compare ``tenant_id`` with that
tenant as a constant: no stamp, no signature. These tests try to make the constant lie:
on a shared shard, in a copy, with a second tenant, after a demote's switch, through the
routing role's own SQL, across ``PREPARE TRANSACTION``, under logical replication's
``session_replication_role``. Raw statements run as the routing role ``app``
(NOSUPERUSER NOBYPASSRLS), so whatever the shard admits is admitted by its policies.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tenantry.errors import StaleRoute, TenantFrozen
from tenantry.migrations.rls import install_rls
from tenantry.router import AsyncRouter, Router
from tenantry.shardmap.dedicated import constant_tenant, mark_tier
from tenantry.shardmap.drivers import make_async_engine, make_engine
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.residency import Residency, write_residency
from tenantry.shardmap.scripts import ALEMBIC_LOCK, SHARD
from tenantry.urls import libpq_conninfo
from tests.router.conftest import Fleet, Project, seed_rows

pytestmark = pytest.mark.usefixtures("app_role")


def _raw(shard: Shard) -> psycopg.Connection[Any]:
    """A connection as the routing role, with no fence."""
    return psycopg.connect(libpq_conninfo(shard.url), autocommit=True)


def _raw_tenants(shard: Shard) -> list[str]:
    """The tenants whose projects a routing-role session sees with no fence."""
    with _raw(shard) as conn:
        rows = conn.execute("SELECT DISTINCT tenant_id FROM projects ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def _constant(shard: Shard) -> str | None:
    with operator_transaction(shard) as conn:
        return constant_tenant(conn)


def _plant(shard: Shard, tenant: str) -> None:
    """Rows of *tenant* on *shard*, written by the operations role (no residency row):
    what a careless restore or a move's leftovers leave."""
    projects, _tasks = seed_rows(tenant)
    with operator_transaction(shard) as conn:
        conn.execute(Project.__table__.insert(), projects)


def _dedicated(fleet: Fleet, name: str, tenant: str | None) -> Shard:
    """A dedicated shard with the policies installed, holding *tenant*'s rows."""
    shard = fleet.add_shard(name, tier=Tier.DEDICATED, server=0)
    with operator_transaction(shard) as conn:
        install_rls(conn)
    if tenant is not None:
        fleet.add_tenant(tenant, name)
    return shard


@pytest.fixture
def fleet(pg_fleet_builder: Any) -> Iterator[Fleet]:
    yield pg_fleet_builder()


class _ReadOnly(Router):
    engine_factory = staticmethod(
        partial(make_engine, execution_options={"postgresql_readonly": True})
    )


def _routed_tenants(fleet: Fleet, tenant: str, router: Router | None = None) -> list[str]:
    with (router or fleet.new_router()).session(tenant) as session:
        rows = session.execute(sa.text("SELECT DISTINCT tenant_id FROM projects ORDER BY 1"))
        return [r[0] for r in rows]


def _temporary_relations(conn: sa.Connection) -> int:
    return int(
        conn.exec_driver_sql(
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't'"
            " AND relnamespace = pg_my_temp_schema()"
        ).scalar_one()
    )


def test_the_constant_shows_its_tenant_and_nothing_else(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    _plant(shard, "intruder")  # another tenant's rows, no residency
    assert _constant(shard) == "umbrella"
    # A routing-role session with no fence acts for the one tenant: the accepted cost.
    assert _raw_tenants(shard) == ["umbrella"]
    assert _routed_tenants(fleet, "umbrella") == ["umbrella"]
    router = fleet.new_router()
    with router.connection("umbrella") as conn:
        assert _temporary_relations(conn) == 0  # no stamp made
        assert conn.exec_driver_sql("SELECT tenantry.tenant()").scalar_one() == "umbrella"
    with router.session("umbrella") as session:
        session.add(Project(tenant_id="umbrella", id=99, name="new"))
        session.commit()
    with pytest.raises(sa.exc.ProgrammingError, match="row-level security"):
        with router.session("umbrella") as session:
            session.execute(
                sa.text("INSERT INTO projects (tenant_id, id, name) VALUES ('intruder', 98, 'x')")
            )
    with _raw(shard) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES ('intruder', 97, 'x')")


def test_the_setting_off_keeps_the_stamp(pg_fleet_builder: Any) -> None:
    fleet = pg_fleet_builder(dedicated_constant=False)
    shard = _dedicated(fleet, "solo", "umbrella")
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []
    assert _routed_tenants(fleet, "umbrella") == ["umbrella"]
    with operator_transaction(shard) as conn:  # the setting's default, as a run would
        assert mark_tier(conn, Tier.DEDICATED) == "umbrella"
    assert _raw_tenants(shard) == ["umbrella"]
    with operator_transaction(shard) as conn:  # and off again
        assert mark_tier(conn, Tier.DEDICATED, constant=False) is None
    assert _raw_tenants(shard) == []


def test_a_shared_shard_never_gets_the_constant(fleet: Fleet) -> None:
    shard = fleet.add_shard("pool", server=0)
    fleet.add_tenant("acme", "pool")  # its only tenant
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []
    with operator_transaction(shard) as conn:
        # Only tenantry marks a database: a shared shard's operator call unmarks it.
        assert conn.exec_driver_sql("SELECT tenantry.mark_dedicated(false)").scalar() is None
    assert _raw_tenants(shard) == []
    assert _routed_tenants(fleet, "acme") == ["acme"]


def test_the_routing_role_cannot_mark_or_read_the_mark(fleet: Fleet) -> None:
    pool = fleet.add_shard("pool", server=0)
    fleet.add_tenant("acme", "pool")
    for statement in (
        "SELECT tenantry.mark_dedicated(true)",
        "SELECT tenantry.refresh_dedicated()",
        "SELECT * FROM tenantry.dedicated",
        "UPDATE tenantry.dedicated SET installed = 'acme'",
        "DELETE FROM tenantry_residency",
        "CREATE OR REPLACE FUNCTION tenantry.tenant() RETURNS text LANGUAGE sql"
        " AS $$SELECT 'acme'$$",
    ):
        with _raw(pool) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    assert _constant(pool) is None
    assert _raw_tenants(pool) == []


def test_a_second_tenant_puts_the_stamp_back_in_the_same_transaction(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    _plant(shard, "hooli")
    assert _constant(shard) == "umbrella"
    version = fleet.catalog.map_version()
    with operator_transaction(shard) as conn:
        write_residency(conn, "hooli", Residency.ACTIVE, version)
        assert constant_tenant(conn) is None  # before the write commits
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []
    with operator_transaction(shard) as conn:
        conn.execute(sa.text("DELETE FROM tenantry_residency WHERE tenant_id = 'hooli'"))
    assert _constant(shard) == "umbrella"
    assert _raw_tenants(shard) == ["umbrella"]


def test_a_moved_tenant_leaves_nothing_visible(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    fleet.set_residency("umbrella", "solo", Residency.MOVED)  # a demote's switch
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []  # its leftover rows
    with pytest.raises(StaleRoute):
        _routed_tenants(fleet, "umbrella")


def test_a_frozen_tenant_is_read_only_with_the_constant(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    fleet.set_residency("umbrella", "solo", Residency.FROZEN)
    assert _constant(shard) == "umbrella"
    assert _raw_tenants(shard) == ["umbrella"]
    with _raw(shard) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("UPDATE projects SET name = 'x'")
    with fleet.new_router().session("umbrella") as session:
        assert session.execute(sa.text("SHOW transaction_read_only")).scalar_one() == "on"
        with pytest.raises(TenantFrozen):
            session.execute(sa.text("UPDATE projects SET name = 'x'"))


def test_another_tenants_fence_is_a_stale_route(fleet: Fleet) -> None:
    _dedicated(fleet, "solo", "umbrella")
    router = fleet.new_router()
    key = fleet.catalog.fence_key("solo")
    with _raw(fleet.shard("solo")) as conn:
        signature = key.sign("acme", conn.info.backend_pid)
        conn.execute("BEGIN")
        assert conn.execute("SELECT tenantry.fence('acme', %s)", (signature,)).fetchone() == (None,)
        # (no tenant set for it: the constant is the only tenant there is)
        assert conn.execute("SELECT current_setting('tenantry.tenant_id', true)").fetchone() in (
            (None,),
            ("",),
        )
        conn.execute("ROLLBACK")
    assert _routed_tenants(fleet, "umbrella", router) == ["umbrella"]


def test_a_copy_of_a_dedicated_database_shows_nothing(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    source = sa.make_url(shard.admin_url or shard.url)
    copy = f"{source.database}_copy"
    server = source.set(database="postgres").set(drivername="postgresql")
    with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (source.database,),
        )
        conn.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{source.database}"')
    try:
        url = sa.make_url(shard.url).set(database=copy).render_as_string(hide_password=False)
        copied = Shard(name="copy", url=url, tier=Tier.DEDICATED)
        assert _raw_tenants(copied) == []  # the constant names the original database
        with _raw(copied) as conn, pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("BEGIN")
            conn.execute("SELECT tenantry.fence('umbrella', '1:' || repeat('0', 64))")
        assert _raw_tenants(shard) == ["umbrella"]  # the original is untouched
        # Registered as a shared shard, the copy is unmarked: the stamp comes back.
        admin = sa.make_url(shard.admin_url or shard.url).set(database=copy)
        fleet.catalog.add_shard("copy", url, admin_url=admin.render_as_string(hide_password=False))
        assert _constant(fleet.shard("copy")) is None
        assert _raw_tenants(copied) == []
    finally:
        with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(f'DROP DATABASE "{copy}" WITH (FORCE)')


def _rename(server: str, old: str, new: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (old,),
        )
        conn.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')


def test_a_renamed_dedicated_database_is_refused_until_marked_again(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    admin = sa.make_url(shard.admin_url or shard.url)
    name = str(admin.database)
    server = admin.set(database="postgres", drivername="postgresql")
    server_url = server.render_as_string(hide_password=False)
    _rename(server_url, name, f"{name}_renamed")
    try:
        renamed = Shard(
            name="solo",
            url=sa.make_url(shard.url)
            .set(database=f"{name}_renamed")
            .render_as_string(hide_password=False),
            admin_url=admin.set(database=f"{name}_renamed").render_as_string(hide_password=False),
            tier=Tier.DEDICATED,
        )
        assert _raw_tenants(renamed) == []  # the constant names the old name
        with _raw(renamed) as conn, pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("BEGIN")
            conn.execute("SELECT tenantry.fence('umbrella', '1:' || repeat('0', 64))")
        with operator_transaction(renamed) as conn:
            # what `migrate upgrade` does on every shard
            assert mark_tier(conn, Tier.DEDICATED) == "umbrella"
        assert _raw_tenants(renamed) == ["umbrella"]
    finally:
        _rename(server_url, f"{name}_renamed", name)


def test_connections_opened_under_the_constant_get_a_stamp_when_it_goes(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    router = fleet.new_router()
    read_only = _ReadOnly(catalog=fleet.catalog, background=False)
    # Connections of the pools opened while the tenant was a constant: no stamp.
    with router.connection("umbrella") as conn:
        assert _temporary_relations(conn) == 0
    assert _routed_tenants(fleet, "umbrella", read_only) == ["umbrella"]
    _plant(shard, "hooli")
    with operator_transaction(shard) as conn:
        write_residency(conn, "hooli", Residency.ACTIVE, fleet.catalog.map_version())
    assert _constant(shard) is None
    try:
        # A read-only transaction cannot make the stamp: the router retries on a new
        # connection, which makes it when it opens.
        assert _routed_tenants(fleet, "umbrella", read_only) == ["umbrella"]
        assert _routed_tenants(fleet, "umbrella", read_only) == ["umbrella"]
    finally:
        read_only.close()
    # A read-write transaction on an old connection makes it in the fence.
    assert _routed_tenants(fleet, "umbrella", router) == ["umbrella"]
    with router.connection("umbrella") as conn:
        assert _temporary_relations(conn) == 1
    assert _raw_tenants(shard) == []


class _AsyncReadOnly(AsyncRouter):
    engine_factory = staticmethod(
        partial(make_async_engine, execution_options={"postgresql_readonly": True})
    )


def test_async_connections_opened_under_the_constant_get_a_stamp_when_it_goes(
    fleet: Fleet,
) -> None:
    """The asyncio router's read-only transaction on a connection without a stamp: the
    shard says TY001, and it begins again on a fresh connection, as the sync router."""
    shard = _dedicated(fleet, "solo", "umbrella")

    async def tenants(router: AsyncRouter) -> tuple[list[str], int]:
        async with router.connection("umbrella") as conn:
            rows = await conn.exec_driver_sql("SELECT DISTINCT tenant_id FROM projects")
            found = [r[0] for r in rows]
            temporary = await conn.exec_driver_sql(
                "SELECT count(*) FROM pg_class WHERE relpersistence = 't'"
                " AND relnamespace = pg_my_temp_schema()"
            )
            return found, int(temporary.scalar_one())

    async def main() -> list[tuple[list[str], int]]:
        router = _AsyncReadOnly(catalog=fleet.catalog, background=False)
        try:
            seen = [await tenants(router)]  # under the constant: no stamp
            await asyncio.to_thread(_plant, shard, "hooli")
            await asyncio.to_thread(fleet.set_residency, "hooli", "solo", Residency.ACTIVE)
            seen += [await tenants(router), await tenants(router)]
            return seen
        finally:
            await router.close()

    assert asyncio.run(main()) == [(["umbrella"], 0), (["umbrella"], 1), (["umbrella"], 1)]


@pytest.mark.parametrize("revision", ["s0007", "s0006"])
def test_a_dedicated_shard_without_the_constant_gets_stamps_when_it_asks(
    fleet: Fleet, revision: str
) -> None:
    """A dedicated shard's engine skips ``open_session`` on new connections (no stamp to
    make under the constant). On a dedicated database without the constant (not marked;
    before s0007) a read-only transaction cannot make the stamp in its fence: the shard
    says so, and from then on the engine's new connections make it."""
    shard = _dedicated(fleet, "solo", "umbrella")
    with operator_transaction(shard) as conn:
        if revision == "s0006":
            with ALEMBIC_LOCK:
                command.downgrade(SHARD.config(conn), "s0006")
        else:
            mark_tier(conn, Tier.SHARED)  # (a shard added --no-prepare, say)
    assert _raw_tenants(shard) == []
    read_only = _ReadOnly(catalog=fleet.catalog, background=False)
    router = fleet.new_router()
    try:
        for _ in range(3):
            assert _routed_tenants(fleet, "umbrella", read_only) == ["umbrella"]
            with read_only.connection("umbrella") as conn:
                assert _temporary_relations(conn) == 1
        # read-write: the fence makes the stamp of a new connection itself
        assert _routed_tenants(fleet, "umbrella", router) == ["umbrella"]
        with router.connection("umbrella") as conn:
            assert _temporary_relations(conn) == 1
    finally:
        read_only.close()


def test_two_residency_writers_at_once_leave_the_stamp(fleet: Fleet) -> None:
    """Two transactions write residency rows of two tenants at once, each seeing only
    its own: the second's refresh waits for the first to commit, then counts both, and
    the database ends with the stamp (no deadlock, no 'tuple concurrently updated')."""
    shard = _dedicated(fleet, "solo", None)
    version = fleet.catalog.map_version()
    written, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def write(tenant: str, hold: bool) -> None:
        try:
            with operator_transaction(shard) as conn:
                write_residency(conn, tenant, Residency.ACTIVE, version)
                if hold:  # the constant installed for it, not committed
                    assert constant_tenant(conn) == tenant
                    written.set()
                    assert go.wait(30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=write, args=("umbrella", True))
    first.start()
    assert written.wait(30)
    second = threading.Thread(target=write, args=("hooli", False))
    second.start()
    database = sa.make_url(shard.url).database
    # (as the operations role: the routing role cannot see others' wait events)
    with psycopg.connect(libpq_conninfo(shard.admin_url or shard.url), autocommit=True) as conn:
        for _ in range(300):  # until the second writer waits for the first's lock
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND wait_event_type = 'Lock'",
                (database,),
            ).fetchone()
            if waiting and waiting[0]:
                break
            conn.execute("SELECT pg_sleep(0.05)")
        else:
            raise AssertionError("the second writer never waited")
    go.set()
    first.join(60)
    second.join(60)
    assert errors == []
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []
    with operator_transaction(shard) as conn:
        conn.execute(sa.text("DELETE FROM tenantry_residency WHERE tenant_id = 'hooli'"))
    assert _constant(shard) == "umbrella"


def test_the_trigger_fires_under_replication_role(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    with operator_transaction(shard) as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        write_residency(conn, "hooli", Residency.INCOMING, fleet.catalog.map_version())
    assert _constant(shard) is None
    assert _raw_tenants(shard) == []


def test_prepare_transaction_is_refused_with_the_constant(fleet: Fleet) -> None:
    _dedicated(fleet, "solo", "umbrella")
    with fleet.new_router().connection("umbrella") as conn:
        assert conn.exec_driver_sql("SHOW max_prepared_transactions").scalar_one() != "0"
        with pytest.raises(sa.exc.NotSupportedError, match="LISTEN, UNLISTEN, or NOTIFY"):
            conn.exec_driver_sql("PREPARE TRANSACTION 'held'")


def test_s0007_goes_down_to_the_stamp_and_up_again(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    assert _constant(shard) == "umbrella"
    with operator_transaction(shard) as conn, ALEMBIC_LOCK:
        command.downgrade(SHARD.config(conn), "s0006")
    assert _raw_tenants(shard) == []
    assert _routed_tenants(fleet, "umbrella") == ["umbrella"]
    with operator_transaction(shard) as conn:
        SHARD.upgrade(conn)
        assert constant_tenant(conn) is None  # not marked until tenantry marks it
        assert mark_tier(conn, Tier.DEDICATED) == "umbrella"
    assert _raw_tenants(shard) == ["umbrella"]
    assert _routed_tenants(fleet, "umbrella") == ["umbrella"]


# -- s0008: the residency state installed in the fence ------------------------------------


def _fence_source(shard: Shard) -> str:
    with operator_transaction(shard) as conn:
        return str(
            conn.exec_driver_sql(
                "SELECT prosrc FROM pg_proc WHERE oid = 'tenantry.fence(text, text)'::regprocedure"
            ).scalar_one()
        )


def _fence(conn: psycopg.Connection[Any], tenant: str) -> tuple[Any, str]:
    """The fence's result and the transaction's read-only setting, in a transaction
    rolled back."""
    conn.execute("BEGIN")
    try:
        (state,) = conn.execute("SELECT tenantry.fence(%s, 'dedicated')", (tenant,)).fetchone()
        (read_only,) = conn.execute("SHOW transaction_read_only").fetchone()
        return state, read_only
    finally:
        conn.execute("ROLLBACK")


def test_the_fence_reads_no_table_with_the_constant(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    with _raw(shard) as conn:
        conn.execute("BEGIN")
        assert conn.execute("SELECT tenantry.fence('umbrella', 'x')").fetchone() == ("active",)
        scans = (
            "SELECT relname, seq_scan + coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('tenantry_residency', 'projects') ORDER BY 1"
        )
        assert conn.execute(scans).fetchall() == [("projects", 0), ("tenantry_residency", 0)]
        conn.execute("SELECT count(*) FROM projects")  # (the view counts this transaction)
        assert conn.execute(scans).fetchall() == [("projects", 1), ("tenantry_residency", 0)]
        conn.execute("ROLLBACK")


def test_every_state_reaches_a_backend_that_already_ran_the_fence(fleet: Fleet) -> None:
    """The fence's state is installed by the transaction that writes the residency
    row: a backend that compiled the fence before sees each change committed since at
    its next transaction (the freeze's ``wait_out`` counts on it)."""
    shard = _dedicated(fleet, "solo", "umbrella")
    router = fleet.new_router()
    with _raw(shard) as conn:
        assert _fence(conn, "umbrella") == ("active", "off")
        with router.session("umbrella") as session:
            session.execute(sa.text("UPDATE projects SET name = name"))
        for state, expected in (
            (Residency.FROZEN, ("frozen", "on")),
            (Residency.ACTIVE, ("active", "off")),
            (Residency.INCOMING, ("incoming", "off")),
            (Residency.FROZEN, ("frozen", "on")),
        ):
            fleet.set_residency("umbrella", "solo", state)
            assert _constant(shard) == "umbrella"
            assert _fence(conn, "umbrella") == expected, state
            assert _fence(conn, "hooli") == (None, "off")
            if state is Residency.INCOMING:
                with pytest.raises(StaleRoute), router.session("umbrella") as session:
                    session.execute(sa.text("SELECT 1"))
                continue
            with router.session("umbrella") as session:
                if state is Residency.FROZEN:
                    with pytest.raises(TenantFrozen):
                        session.execute(sa.text("UPDATE projects SET name = name"))
                else:
                    session.execute(sa.text("UPDATE projects SET name = name"))
        # a state written with the trigger disabled (by the table's owner) leaves the
        # fence's stale, but writes are still refused by the residency row itself
        fleet.set_residency("umbrella", "solo", Residency.ACTIVE)
        with operator_transaction(shard) as admin:
            admin.exec_driver_sql(
                "ALTER TABLE tenantry_residency DISABLE TRIGGER tenantry_dedicated"
            )
            admin.exec_driver_sql("UPDATE tenantry_residency SET state = 'frozen'")
            admin.exec_driver_sql(
                "ALTER TABLE tenantry_residency ENABLE ALWAYS TRIGGER tenantry_dedicated"
            )
        assert _fence(conn, "umbrella") == ("active", "off")
        conn.execute("BEGIN")
        conn.execute("SELECT tenantry.fence('umbrella', 'x')")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE projects SET name = name")
        conn.execute("ROLLBACK")


def test_s0008_goes_down_to_the_row_read_and_up_again(fleet: Fleet) -> None:
    shard = _dedicated(fleet, "solo", "umbrella")
    fleet.set_residency("umbrella", "solo", Residency.FROZEN)
    assert "tenantry_residency" not in _fence_source(shard)
    with operator_transaction(shard) as conn, ALEMBIC_LOCK:
        command.downgrade(SHARD.config(conn), "s0007")
    assert "tenantry_residency" in _fence_source(shard)  # s0007's fence, with its read
    assert _constant(shard) == "umbrella"
    with _raw(shard) as conn:
        assert _fence(conn, "umbrella") == ("frozen", "on")
    with operator_transaction(shard) as conn:
        SHARD.upgrade(conn)  # installs the state it finds: frozen
    assert "tenantry_residency" not in _fence_source(shard)
    assert _constant(shard) == "umbrella"
    with _raw(shard) as conn:
        assert _fence(conn, "umbrella") == ("frozen", "on")
        fleet.set_residency("umbrella", "solo", Residency.ACTIVE)
        assert _fence(conn, "umbrella") == ("active", "off")
    assert _routed_tenants(fleet, "umbrella") == ["umbrella"]
