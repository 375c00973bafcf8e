"""Fence keys rotated under routers whose shard is routed through PgBouncer."""

from __future__ import annotations

import sqlalchemy as sa

from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.conftest import FleetBuilder

QUERY = sa.text("SELECT DISTINCT tenant_id FROM projects")


def test_rotation_through_the_pooler(
    pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer
) -> None:
    fleet = pg_fleet_builder()
    assert fleet.add_shard("pooled", routing_port=pgbouncer.port).pooled
    for tenant in ("acme", "globex"):
        fleet.add_tenant(tenant, "pooled")
    old = fleet.new_router()
    with old.connection("acme") as conn:
        assert conn.execute(QUERY).scalars().all() == ["acme"]
    first = fleet.catalog.fence_key("pooled")
    second = fleet.catalog.rotate_fence_key("pooled")
    # Both keys are accepted: the old router still signs with the first.
    with old.connection("globex") as conn:
        assert conn.execute(QUERY).scalars().all() == ["globex"]
    assert old._fence_keys["pooled"] == first
    new = fleet.new_router()
    with new.session("acme") as session:
        assert session.execute(QUERY).scalars().all() == ["acme"]
    assert new._fence_keys["pooled"] == second
    # The first key retired: the old router's pooled fence is refused once, it reads
    # the key again and goes on without the application seeing an error.
    third = fleet.catalog.rotate_fence_key("pooled", retire_previous=True)
    for tenant in ("acme", "globex", "acme"):
        with old.session(tenant) as session:
            assert session.execute(QUERY).scalars().all() == [tenant]
    assert old._fence_keys["pooled"] == third
