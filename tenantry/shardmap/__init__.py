"""What lives where: the shard map's model, its catalog and placement ring."""

from tenantry.shardmap.catalog import NOTIFY_CHANNEL, Catalog
from tenantry.shardmap.model import (
    MapDelta,
    MapSnapshot,
    Shard,
    ShardState,
    Tenant,
    TenantState,
    Tier,
    mask_url,
    validate_shard_name,
    validate_tenant_id,
)
from tenantry.shardmap.residency import Residency
from tenantry.shardmap.ring import PlacementRing

__all__ = [
    "NOTIFY_CHANNEL",
    "Catalog",
    "MapDelta",
    "MapSnapshot",
    "PlacementRing",
    "Residency",
    "Shard",
    "ShardState",
    "Tenant",
    "TenantState",
    "Tier",
    "mask_url",
    "validate_shard_name",
    "validate_tenant_id",
]
