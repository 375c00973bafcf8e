"""The shard map's value objects: tiers, shards, tenants, and the naming rule.

The URL helpers (:mod:`tenantry.urls`) are re-exported here, where the shard map's
users have always found them."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from immutables import Map
from sqlalchemy.engine import make_url

from tenantry.errors import (
    InvalidShardName,
    InvalidTenantId,
    ShardNotActive,
    UnknownShard,
    UnknownTenant,
)
from tenantry.urls import absolute_sqlite_path, mask_url, normalize_url, parse_url

__all__ = [
    "NAME_PATTERN",
    "MapDelta",
    "MapSnapshot",
    "Shard",
    "ShardState",
    "Tenant",
    "TenantState",
    "Tier",
    "absolute_sqlite_path",
    "as_utc",
    "mask_url",
    "normalize_url",
    "parse_url",
    "require_active",
    "validate_shard_name",
    "validate_tenant_id",
]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class Tier(enum.StrEnum):
    """Isolation tier of a shard, and so of the tenants it holds."""

    SHARED = "shared"
    DEDICATED = "dedicated"


class ShardState(enum.StrEnum):
    """Lifecycle of a shard: only ``active`` shards receive new tenants."""

    ACTIVE = "active"
    DRAINING = "draining"
    RETIRED = "retired"


class TenantState(enum.StrEnum):
    """``moving`` while a move of the tenant is under way."""

    ACTIVE = "active"
    MOVING = "moving"


def validate_tenant_id(tenant_id: object) -> str:
    """Return *tenant_id* if it follows the naming rule, else raise InvalidTenantId."""
    if not isinstance(tenant_id, str) or not NAME_PATTERN.fullmatch(tenant_id):
        raise InvalidTenantId(str(tenant_id))
    return tenant_id


def validate_shard_name(name: object) -> str:
    """Return *name* if it follows the naming rule, else raise InvalidShardName."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidShardName(str(name))
    return name


@dataclass(frozen=True, slots=True)
class Shard:
    """One database of the fleet.

    ``url`` is the routing role (what applications connect as); ``admin_url`` the
    operations role that owns the schema and bypasses row-level security. ``pooled``:
    ``url`` reaches the server through a connection pooler in transaction mode (the
    operations URL never may).
    """

    name: str
    url: str
    tier: Tier = Tier.SHARED
    state: ShardState = ShardState.ACTIVE
    weight: int = 1
    admin_url: str | None = None
    pooled: bool = False
    created_at: datetime | None = field(default=None, compare=False)

    @property
    def operations_url(self) -> str:
        """The URL of the operations role: ``admin_url``, or ``url`` when unset."""
        return self.admin_url or self.url

    @property
    def backend(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return make_url(self.url).get_backend_name()

    def to_record(self, tenant_count: int | None = None) -> dict[str, Any]:
        """The shard as JSON-ready fields, passwords masked (``tenants`` when given)."""
        record: dict[str, Any] = {
            "name": self.name,
            "tier": self.tier.value,
            "state": self.state.value,
            "weight": self.weight,
            "url": mask_url(self.url),
            "admin_url": mask_url(self.admin_url) if self.admin_url else None,
            "pooled": self.pooled,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }
        if tenant_count is not None:
            record["tenants"] = tenant_count
        return record

    def __repr__(self) -> str:
        return (
            f"Shard(name={self.name!r}, url={mask_url(self.url)!r}, tier={self.tier.value!r}, "
            f"state={self.state.value!r}, weight={self.weight}"
            f"{', pooled=True' if self.pooled else ''})"
        )


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant and its placement: the shard it lives on now."""

    id: str
    shard: str
    tier: Tier = Tier.SHARED
    pinned: bool = False
    state: TenantState = TenantState.ACTIVE
    created_at: datetime | None = field(default=None, compare=False)

    def to_record(self) -> dict[str, Any]:
        """The tenant as JSON-ready fields."""
        return {
            "id": self.id,
            "shard": self.shard,
            "tier": self.tier.value,
            "pinned": self.pinned,
            "state": self.state.value,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


@dataclass(frozen=True, slots=True)
class MapSnapshot:
    """An immutable view of the whole shard map at one map version.

    Routers keep one and look tenants up in its mappings; a newer version replaces it
    (built from the changes since, :meth:`apply`, or read whole).

    ``shards`` and ``tenants`` are read-only mappings (:class:`immutables.Map`, a hash
    array mapped trie): any mapping given is copied into one once, and :meth:`apply`
    builds the next snapshot's from this one's by path copying, so a change costs in
    proportion to the tenants it changes, not to the map, and the two snapshots share
    everything else.
    """

    version: int
    shards: Mapping[str, Shard]
    tenants: Mapping[str, Tenant]

    def __post_init__(self) -> None:
        # A Map is immutable, so it is shared as it is; anything else is copied (a
        # caller's dict changed later must not change the snapshot).
        if not isinstance(self.shards, Map):
            object.__setattr__(self, "shards", Map(self.shards))
        if not isinstance(self.tenants, Map):
            object.__setattr__(self, "tenants", Map(self.tenants))

    def tenant(self, tenant_id: str) -> Tenant:
        """The tenant's record, or raise UnknownTenant."""
        try:
            return self.tenants[tenant_id]
        except KeyError:
            raise UnknownTenant(tenant_id) from None

    def shard(self, name: str) -> Shard:
        """The shard's record, or raise UnknownShard."""
        try:
            return self.shards[name]
        except KeyError:
            raise UnknownShard(name) from None

    def shard_of(self, tenant_id: str) -> Shard:
        """The shard the tenant lives on (its placement)."""
        return self.shards[self.tenant(tenant_id).shard]

    def tenants_sorted(self) -> list[Tenant]:
        """Every tenant, by id."""
        return sorted(self.tenants.values(), key=lambda t: t.id)

    def tenants_on(self, shard: str) -> list[Tenant]:
        """The tenants placed on *shard*, by id."""
        return sorted((t for t in self.tenants.values() if t.shard == shard), key=lambda t: t.id)

    def apply(self, delta: MapDelta) -> MapSnapshot:
        """The snapshot at *delta*'s version: this one with the delta's changes.

        Costs in proportion to the delta: the tenants' trie is updated by path copying
        (this snapshot is left as it was and shares the rest), and the shards are this
        snapshot's own when the delta says they did not change.
        """
        if delta.since != self.version:
            raise ValueError(
                f"a delta since version {delta.since} does not apply to version {self.version}"
            )
        tenants = self.tenants
        if delta.tenants or delta.removed:
            assert isinstance(tenants, Map)  # __post_init__ made it one
            with tenants.mutate() as changing:
                for tenant_id in delta.removed:
                    changing.pop(tenant_id, None)
                for tenant_id, tenant in delta.tenants.items():
                    changing[tenant_id] = tenant
                tenants = changing.finish()
        shards = self.shards if delta.shards is None else delta.shards
        return MapSnapshot(version=delta.version, shards=shards, tenants=tenants)

    def __repr__(self) -> str:
        counts = f"shards={len(self.shards)}, tenants={len(self.tenants)}"
        return f"MapSnapshot(version={self.version}, {counts})"


@dataclass(frozen=True, slots=True)
class MapDelta:
    """What changed in the map from version ``since`` to ``version``: the tenants added
    or changed, the ids of those removed, and every shard (there are few) when any
    shard may have changed, else ``shards`` is None (the shards are those at ``since``).
    """

    version: int
    since: int
    shards: Mapping[str, Shard] | None
    tenants: Mapping[str, Tenant]
    removed: frozenset[str]


def as_utc(value: datetime | None) -> datetime | None:
    """*value* as an aware UTC time: SQLite hands back naive datetimes, and everything
    tenantry stores is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def require_active(shard: Shard, tenant_id: str | None = None) -> None:
    """Refuse a draining or retired shard as a tenant's new home (:class:`ShardNotActive`,
    naming *tenant_id*)."""
    if shard.state is not ShardState.ACTIVE:
        raise ShardNotActive(
            f"shard {shard.name!r} is {shard.state.value} and takes no tenants: "
            "choose an active shard",
            tenant_id=tenant_id,
            shard=shard.name,
        )
