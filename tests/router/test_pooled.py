"""Routers on a shard routed through PgBouncer in transaction mode: sync and asyncio,
no prepared statement on the server, the fence signed for each transaction."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from tenantry import AsyncRouter
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
