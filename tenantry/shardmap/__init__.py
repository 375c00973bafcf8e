"""What lives where: the shard map's model, its catalog and placement ring."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantry.lazy import exports, lazy_module
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

if TYPE_CHECKING:
    from tenantry.shardmap.catalog import NOTIFY_CHANNEL, Catalog
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

#: Imported on first use (see tenantry.lazy): the model alone loads no catalog.
__getattr__, __dir__ = lazy_module(
    __name__,
    exports(
        ("tenantry.shardmap.catalog", ("NOTIFY_CHANNEL", "Catalog")),
        ("tenantry.shardmap.residency", ("Residency",)),
        ("tenantry.shardmap.ring", ("PlacementRing",)),
    ),
)
