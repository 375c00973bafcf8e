"""Rebalancing plans for the shared pool: pure functions, map + sizes + strategy → plan.

Each active shared shard should carry its weighted share of the pool's load, within a
threshold (default 10%). The planner is greedy: while a shard is outside the threshold
(or is being drained), it moves one tenant from the most loaded shard (relative to its
share) to the least loaded one, choosing the largest tenant that fits in the gap, so
that the bytes moved stay close to the minimum needed. A move must lower the pool's
imbalance by at least an improvement threshold and must not widen the spread, so any
prefix of a plan leaves the pool no worse than before. Pinned and dedicated tenants
never move; draining and retired shards never receive tenants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tenantry.errors import ConfigurationError
from tenantry.shardmap.model import MapSnapshot, ShardState, Tenant, Tier

__all__ = [
    "BY_COUNT",
    "BY_SIZE",
    "CostFunction",
    "Plan",
    "PlannedMove",
    "TenantSize",
    "by_count",
    "by_size",
    "plan_rebalance",
    "spread",
]


@dataclass(frozen=True, slots=True)
class TenantSize:
    """A tenant's measured size: rows and bytes over its tenant tables."""

    rows: int = 0
    bytes: int = 0


class CostFunction(Protocol):
    """How much load a tenant puts on a shard (any non-negative number)."""

    def __call__(self, tenant: Tenant, size: TenantSize) -> float: ...


#: A small cost every tenant has, so that empty tenants are not piled onto one shard.
BASE_COST_BYTES = 64 * 1024


def by_size(tenant: Tenant, size: TenantSize) -> float:
    """Load = bytes, plus a small base cost per tenant (the default strategy)."""
    return float(size.bytes + BASE_COST_BYTES)


def by_count(tenant: Tenant, size: TenantSize) -> float:
    """Load = number of tenants."""
    return 1.0


BY_SIZE = by_size
BY_COUNT = by_count
STRATEGIES: Mapping[str, CostFunction] = {"by_size": by_size, "by_count": by_count}


@dataclass(frozen=True, slots=True)
class PlannedMove:
    """One move of a plan."""

    tenant_id: str
    source: str
    target: str
    cost: float
    bytes: int


@dataclass(frozen=True)
class Plan:
    """A rebalancing plan and the pool's load before and after it."""

    moves: list[PlannedMove]
    before: dict[str, float]
    after: dict[str, float]
    shares: dict[str, float]
    threshold: float
    draining: tuple[str, ...] = ()
    reason: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(m.bytes for m in self.moves)

    def spread_before(self) -> float:
        return spread(self.before, self.shares)

    def spread_after(self) -> float:
        return spread(self.after, self.shares)


def _ratios(load: Mapping[str, float], shares: Mapping[str, float]) -> dict[str, float]:
    total = sum(load.get(s, 0.0) for s in shares) or 1.0
    return {s: load.get(s, 0.0) / (total * share) for s, share in shares.items() if share > 0}


def spread(load: Mapping[str, float], shares: Mapping[str, float]) -> float:
    """Largest relative distance of an active shard's load from its weighted share
    (0.1 = some shard is 10% above or below its share)."""
    ratios = _ratios(load, shares)
    return max((abs(r - 1.0) for r in ratios.values()), default=0.0)


def _imbalance(load: Mapping[str, float], shares: Mapping[str, float], total: float) -> float:
    # Sum of squared relative deviations: strictly smaller after every useful move.
    return sum(
        ((load.get(s, 0.0) - total * share) / (total * share)) ** 2
        for s, share in shares.items()
        if share > 0
    )


def plan_rebalance(
    snapshot: MapSnapshot,
    sizes: Mapping[str, TenantSize],
    *,
    strategy: CostFunction | str = "by_size",
    threshold: float = 0.10,
    min_improvement: float = 0.001,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    drain: tuple[str, ...] = (),
) -> Plan:
    """Plan moves that bring every active shared shard within *threshold* of its share.

    *drain* names shards (typically ``draining`` ones; draining shards of the snapshot
    are drained too) whose every movable tenant must go to the rest of the pool.
    """
    if not 0 < threshold < 1:
        raise ConfigurationError(f"threshold must be between 0 and 1, got {threshold!r}")
    if isinstance(strategy, str):
        try:
            cost_of = STRATEGIES[strategy]
        except KeyError:
            raise ConfigurationError(
                f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}"
            ) from None
    else:
        cost_of = strategy
    shared = {name: shard for name, shard in snapshot.shards.items() if shard.tier is Tier.SHARED}
    draining = tuple(
        sorted(
            {*drain, *(n for n, s in shared.items() if s.state is ShardState.DRAINING)}
            & set(shared)
        )
    )
    active = {
        n: s
        for n, s in shared.items()
        if s.state is ShardState.ACTIVE and s.weight > 0 and n not in draining
    }
    weight_total = sum(s.weight for s in active.values())
    shares = {n: s.weight / weight_total for n, s in active.items()} if weight_total else {}

    load: dict[str, float] = {n: 0.0 for n in shared}
    costs: dict[str, float] = {}
    placed: dict[str, list[str]] = {n: [] for n in shared}
    movable: set[str] = set()
    for record in snapshot.tenants.values():
        if record.shard not in shared:
            continue
        size = sizes.get(record.id, TenantSize())
        cost = max(0.0, float(cost_of(record, size)))
        costs[record.id] = cost
        load[record.shard] += cost
        placed[record.shard].append(record.id)
        if not record.pinned and record.tier is Tier.SHARED:
            movable.add(record.id)
    before = dict(load)
    bytes_of = {t: sizes.get(t, TenantSize()).bytes for t in costs}
    moves: list[PlannedMove] = []
    if not shares:
        return Plan(
            moves, before, dict(load), shares, threshold, draining, "no active shared shard"
        )

    def room() -> bool:
        if max_moves is not None and len(moves) >= max_moves:
            return False
        return max_bytes is None or sum(m.bytes for m in moves) < max_bytes

    def fits_budget(tenant: str) -> bool:
        return max_bytes is None or sum(m.bytes for m in moves) + bytes_of[tenant] <= max_bytes

    def relocate(tenant: str, source: str, target: str) -> None:
        placed[source].remove(tenant)
        placed[target].append(tenant)
        load[source] -= costs[tenant]
        load[target] += costs[tenant]
        moves.append(PlannedMove(tenant, source, target, costs[tenant], bytes_of[tenant]))

    # 1. Drain: every movable tenant leaves, the biggest first, to the least loaded share.
    for source in draining:
        for tenant in sorted(placed[source], key=lambda t: (-costs[t], t)):
            if tenant not in movable or not room() or not fits_budget(tenant):
                continue
            total = sum(load[s] for s in shares) + sum(load[d] for d in draining)
            target = min(shares, key=lambda s: ((load[s] + costs[tenant]) / (total * shares[s]), s))
            relocate(tenant, source, target)

    # 2. Balance the active shards.
    total = sum(load[s] for s in shares)
    reason = "balanced"
    while room() and total > 0:
        ratios = {s: load[s] / (total * shares[s]) for s in shares}
        if max(abs(r - 1.0) for r in ratios.values()) <= threshold:
            reason = f"every active shard within {threshold:.0%} of its share"
            break
        source = max(ratios, key=lambda s: (ratios[s], s))
        target = min(ratios, key=lambda s: (ratios[s], s))
        if source == target:
            break
        # The most a move may carry without overshooting: the smaller of the source's
        # excess and the target's deficit (in absolute load).
        gap = min(load[source] - total * shares[source], total * shares[target] - load[target])
        # Never widen the spread: the target must stay at or below the source's old ratio.
        limit = (ratios[source] - ratios[target]) * total * shares[target]
        current = _imbalance(load, shares, total)
        best: str | None = None
        best_key: tuple[float, ...] | None = None
        for tenant in placed[source]:
            cost = costs[tenant]
            if tenant not in movable or cost <= 0 or cost > limit or not fits_budget(tenant):
                continue
            load[source] -= cost
            load[target] += cost
            after = _imbalance(load, shares, total)
            load[source] += cost
            load[target] -= cost
            if current - after < min_improvement * max(current, 1e-12):
                continue
            # Prefer the largest tenant that fits the gap; past the gap, the smallest.
            key = (0.0, -cost) if cost <= gap else (1.0, cost)
            if best_key is None or key < best_key:
                best, best_key = tenant, key
        if best is None:
            reason = "no move improves the balance enough (the rest are too big or pinned)"
            break
        relocate(best, source, target)
    else:
        if total > 0:
            reason = "stopped at the move or byte budget"
    return Plan(moves, before, dict(load), shares, threshold, draining, reason)
