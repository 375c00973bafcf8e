"""Routers on a shard routed through PgBouncer in transaction mode: sync and asyncio,
no prepared statement on the server, the fence signed for each transaction."""

from __future__ import annotations

import asyncio

import psycopg
import sqlalchemy as sa

from tenantry import AsyncRouter
from tenantry.shardmap.residency import Residency
from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.conftest import Fleet, FleetBuilder

TENANTS = ("a1", "a2", "a3")
QUERY = sa.text("SELECT DISTINCT tenant_id FROM projects")


def _pooled_fleet(build: FleetBuilder, bouncer: TempPgBouncer) -> Fleet:
    fleet = build()
    assert fleet.add_shard("pooled", routing_port=bouncer.port).pooled
    for tenant in TENANTS:
        fleet.add_tenant(tenant, "pooled")
    return fleet


def test_sync_router_through_pgbouncer(
    pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer
) -> None:
    fleet = _pooled_fleet(pg_fleet_builder, pgbouncer)
    router = fleet.new_router()
    pids: set[int] = set()
    for _ in range(10):  # more than psycopg's prepare threshold (5) per statement
        for tenant in TENANTS:
            with router.session(tenant) as s:
                assert s.execute(QUERY).scalars().all() == [tenant]
                pids.add(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
                driver = s.connection().connection.driver_connection
                assert driver is not None and driver.prepare_threshold is None
    # the server's pids, not the pooler's: two server connections serve every tenant
    assert 1 <= len(pids) <= 2
    with fleet.new_router() as other:
        with other.session("a1") as s:
            found = s.execute(sa.text("SELECT count(*) FROM pg_prepared_statements")).scalar()
            assert found == 0


def test_async_router_through_pgbouncer(
    pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer
) -> None:
    fleet = _pooled_fleet(pg_fleet_builder, pgbouncer)

    async def run() -> None:
        async with AsyncRouter(catalog=fleet.catalog, background=False) as router:
            for _ in range(10):
                for tenant in TENANTS:
                    async with router.session(tenant) as s:
                        assert (await s.execute(QUERY)).scalars().all() == [tenant]

    asyncio.run(run())


def test_routing_leaves_nothing_on_the_server_connections(
    pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer
) -> None:
    # The fence's settings are transaction-local: after routed transactions (a frozen
    # tenant's among them), the same server connections, taken by two plain clients at
    # once (the pool has two), hold no tenant, no signature, no read-only default.
    fleet = _pooled_fleet(pg_fleet_builder, pgbouncer)
    fleet.set_residency("a2", "pooled", Residency.FROZEN)
    router = fleet.new_router()
    routed: set[int] = set()
    for tenant in TENANTS * 3:
        with router.session(tenant) as s:
            routed.add(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            s.execute(QUERY).all()
    url = sa.make_url(fleet.shard("pooled").url).set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as one, psycopg.connect(conninfo) as two:
        seen = [
            conn.execute(
                "SELECT pg_backend_pid(), current_setting('tenantry.tenant_id', true),"
                " current_setting('tenantry.signature', true),"
                " current_setting('transaction_read_only'),"
                " (SELECT count(*) FROM pg_cursors), (SELECT count(*) FROM pg_locks"
                "  WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
            ).fetchone()
            for conn in (one, two)
        ]
    assert routed <= {row[0] for row in seen if row}  # the very connections routing used
    for row in seen:
        assert row is not None and row[1] in (None, "") and row[2] in (None, "")
        assert row[3:] == ("off", 0, 0)
