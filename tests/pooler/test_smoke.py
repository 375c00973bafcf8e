from __future__ import annotations

import sqlalchemy as sa

from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.conftest import Fleet, FleetBuilder


def test_routed_through_pgbouncer(pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer) -> None:
    fleet: Fleet = pg_fleet_builder()
    shard = fleet.add_shard("pooled", routing_port=pgbouncer.port)
    assert shard.pooled
    for t in ("a1", "a2", "a3"):
        fleet.add_tenant(t, "pooled")
    router = fleet.new_router()
    for _ in range(20):
        for t in ("a1", "a2", "a3"):
            with router.session(t) as s:
                query = sa.text("SELECT DISTINCT tenant_id FROM projects")
                assert s.execute(query).scalars().all() == [t]
