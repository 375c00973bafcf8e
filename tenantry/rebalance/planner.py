"""Rebalancing plans for the shared pool: pure functions, map + sizes + strategy → plan.

Each active shared shard should carry its weighted share of the pool's load, within a
threshold (default 10%). A plan has two phases:

1. **Drain**: every movable tenant of a draining shard leaves, the biggest first, for
   the active shard whose ratio (load ÷ its share of the load) is lowest after taking it.
2. **Balance**: while a shard is outside the threshold, move one tenant from a shard
   above its share to one below it, the largest tenant that fits the gap between them,
   so that the load moved (and so the bytes) stays close to the minimum needed.

Any prefix of a plan, and so a plan stopped half-way, leaves the pool no worse than
before, as measured by :func:`spread`: a balancing move keeps both shards' ratios
within the old lowest and highest ratio and must lower the sum of squared deviations by
at least *min_improvement* of it; a drain move never raises a shard above the deviation
the draining shard's load counted for (see :func:`spread`).

A tenant moves at most once per plan: moving it twice would copy its bytes twice, and
it bounds a plan at one move per movable tenant. Pinned, dedicated and moving tenants
never move; draining, retired, dedicated and weight-0 shards never receive tenants (a
weight-0 active shard keeps what it holds: drain it to empty it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenantry.errors import ConfigurationError, UnknownShard
from tenantry.shardmap.model import MapSnapshot, ShardState, Tenant, TenantState, Tier

__all__ = [
    "BASE_FRACTION",
    "BY_COUNT",
    "BY_SIZE",
    "STRATEGIES",
    "CostFunction",
    "Plan",
    "PlannedMove",
    "TenantSize",
    "base_cost",
    "by_count",
    "by_size",
    "by_size_and_count",
    "plan_rebalance",
    "spread",
]


@dataclass(frozen=True, slots=True)
class TenantSize:
    """A tenant's measured size: rows and bytes over its tenant tables."""

    rows: int = 0
    bytes: int = 0


class CostFunction(Protocol):
    """How much load a tenant puts on a shard (a finite, non-negative number)."""

    def __call__(self, tenant: Tenant, size: TenantSize) -> float: ...


#: ``by_size``'s base cost per tenant, as a fraction of the pool's mean tenant size: so
#: that empty tenants spread over the pool instead of piling onto one shard, while the
#: base of every tenant together is this fraction of the pool's bytes and can never
#: outweigh the real data.
BASE_FRACTION = 0.01


def by_size(tenant: Tenant, size: TenantSize) -> float:
    """Load = the bytes the tenant occupies (the default strategy). The planner adds a
    base of :data:`BASE_FRACTION` of the pool's mean tenant size (:func:`base_cost`)."""
    return float(size.bytes)


def by_size_and_count(tenant: Tenant, size: TenantSize) -> float:
    """Load = bytes, and tenant count as much: the planner adds the pool's mean tenant
    size per tenant (:func:`base_cost`), so a shard with many small tenants counts as
    loaded as one with few large ones of the same bytes twice over. Not the default."""
    return float(size.bytes)


def by_count(tenant: Tenant, size: TenantSize) -> float:
    """Load = number of tenants."""
    return 1.0


BY_SIZE = by_size
BY_COUNT = by_count
STRATEGIES: Mapping[str, CostFunction] = {
    "by_size": by_size,
    "by_size_and_count": by_size_and_count,
    "by_count": by_count,
}
#: Strategies whose per-tenant base is a fraction of the pool's mean tenant size.
_BASE_OF_MEAN: Mapping[CostFunction, float] = {by_size: BASE_FRACTION, by_size_and_count: 1.0}


def base_cost(strategy: CostFunction | str, sizes: Iterable[TenantSize]) -> float:
    """The cost the planner adds to every tenant's for *strategy*, derived from the
    pool's tenant *sizes*: a fraction of their mean bytes for ``by_size`` (1%) and
    ``by_size_and_count`` (100%), in whole bytes and at least one (so that empty
    tenants still spread), nothing for other strategies."""
    fraction = _BASE_OF_MEAN.get(_cost_function(strategy))
    measured = [size.bytes for size in sizes]
    if fraction is None or not measured:
        return 0.0
    mean = sum(measured) / len(measured)
    # Whole bytes: loads stay exact sums however many tenants move.
    return float(max(1, round(fraction * mean)))


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
    """A rebalancing plan and the pool's load before and after it.

    ``before`` and ``after`` give every shared shard's load; ``shares`` every active
    shard's share of it (by weight). ``left_behind`` names the tenants of draining
    shards that the plan does not move, and why (pinned, being moved, over budget).
    """

    moves: list[PlannedMove]
    before: dict[str, float]
    after: dict[str, float]
    shares: dict[str, float]
    threshold: float
    draining: tuple[str, ...] = ()
    reason: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    left_behind: dict[str, str] = field(default_factory=dict)
    #: Every shared shard's measured bytes before and after the plan (the strategy's
    #: cost may weigh more than bytes: see :meth:`bytes_spread_before`).
    bytes_before: dict[str, float] = field(default_factory=dict)
    bytes_after: dict[str, float] = field(default_factory=dict)
    #: Why the sizes the plan used may mislead it (stale, moved, never measured).
    warnings: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """The bytes the plan's moves copy, in all."""
        return sum(m.bytes for m in self.moves)

    def to_record(self) -> dict[str, Any]:
        """The plan as JSON-ready fields (``tenantry rebalance --json``)."""
        return {
            "moves": [
                {
                    "tenant": m.tenant_id,
                    "from": m.source,
                    "to": m.target,
                    "bytes": m.bytes,
                    "cost": m.cost,
                }
                for m in self.moves
            ],
            "bytes": self.bytes,
            "spread_before": round(self.spread_before(), 4),
            "spread_after": round(self.spread_after(), 4),
            "bytes_spread_before": round(self.bytes_spread_before(), 4),
            "bytes_spread_after": round(self.bytes_spread_after(), 4),
            "threshold": self.threshold,
            "warnings": list(self.warnings),
            "draining": list(self.draining),
            "left_behind": dict(sorted(self.left_behind.items())),
            "reason": self.reason,
            "shards": [
                {
                    "shard": s,
                    "share": round(self.shares.get(s, 0.0), 4),
                    "before": self.before[s],
                    "after": self.after[s],
                    "bytes_before": self.bytes_before.get(s, 0.0),
                    "bytes_after": self.bytes_after.get(s, 0.0),
                }
                for s in sorted(self.before)
            ],
        }

    def bytes_spread_before(self) -> float:
        """:func:`spread` of the measured bytes, before the plan."""
        return spread(self.bytes_before, self.shares, self.draining)

    def bytes_spread_after(self) -> float:
        """:func:`spread` of the measured bytes, after the plan."""
        return spread(self.bytes_after, self.shares, self.draining)

    def spread_before(self) -> float:
        """:func:`spread` of the strategy's load, before the plan."""
        return spread(self.before, self.shares, self.draining)

    def spread_after(self) -> float:
        """:func:`spread` of the strategy's load, after the plan."""
        return spread(self.after, self.shares, self.draining)


def spread(
    load: Mapping[str, float], shares: Mapping[str, float], draining: Iterable[str] = ()
) -> float:
    """The pool's imbalance: the largest relative distance of a shard from its target.

    An active shard's target is its share of the load of the active and draining shards
    together (all of it belongs on the active shards): its distance is
    ``abs(load / (total * share) - 1)`` (0.1: 10% above or below). A draining shard's
    target is nothing; its load counts as the distance it would add to the smallest
    share, ``load / (total * smallest share)``. So moving a tenant off a draining shard
    onto the active shard it fills least never reads as worse, and without draining
    shards this is just the largest deviation of an active shard.
    """
    active = {s: share for s, share in shares.items() if share > 0}
    if not active:
        return 0.0
    draining = [d for d in draining if d not in active]
    total = sum(load.get(s, 0.0) for s in active) + sum(load.get(d, 0.0) for d in draining)
    if total <= 0:
        return 0.0
    smallest = min(active.values())
    worst = max(abs(load.get(s, 0.0) / (total * share) - 1.0) for s, share in active.items())
    return max([worst, *(load.get(d, 0.0) / (total * smallest) for d in draining)])


def _cost_function(strategy: CostFunction | str) -> CostFunction:
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]
        except KeyError:
            raise ConfigurationError(
                f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)} "
                "or pass a cost function",
                field="strategy",
            ) from None
    if not callable(strategy):
        raise ConfigurationError(
            f"strategy must be a name or a cost function, not {type(strategy).__name__}",
            field="strategy",
        )
    return strategy


def _check_options(
    threshold: float, min_improvement: float, max_moves: int | None, max_bytes: int | None
) -> None:
    if not 0 < threshold < 1:
        raise ConfigurationError(
            f"threshold must be between 0 and 1, got {threshold!r}", field="threshold"
        )
    if not 0 <= min_improvement < 1:
        raise ConfigurationError(
            f"min_improvement must be at least 0 and below 1, got {min_improvement!r}",
            field="min_improvement",
        )
    for name, value in (("max_moves", max_moves), ("max_bytes", max_bytes)):
        if value is not None and value < 0:
            raise ConfigurationError(f"{name} must not be negative, got {value!r}", field=name)


def plan_rebalance(
    snapshot: MapSnapshot,
    sizes: Mapping[str, TenantSize],
    *,
    strategy: CostFunction | str = "by_size",
    threshold: float = 0.10,
    min_improvement: float = 0.001,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    drain: Iterable[str] = (),
) -> Plan:
    """Plan moves that bring every active shared shard within *threshold* of its share.

    *drain* names shared shards (draining shards of the snapshot are drained anyway)
    whose every movable tenant must go to the rest of the pool. Tenants without a size
    count as empty. Budgets: at most *max_moves* moves and *max_bytes* bytes.
    """
    started = time.perf_counter()
    _check_options(threshold, min_improvement, max_moves, max_bytes)
    cost_of = _cost_function(strategy)
    drain = tuple(drain)
    _check_drain(snapshot, drain)
    pool = _Pool.of(snapshot, sizes, cost_of, drain, max_moves, max_bytes)
    if not pool.shares:
        for name in pool.draining:
            for tenant in pool.placed[name]:
                pool.left_behind.setdefault(tenant, "nowhere to go")
        reason = "no active shared shard"
    else:
        pool.drain()
        reason = _balance(pool, threshold, min_improvement)
    return pool.plan(threshold, reason, time.perf_counter() - started)


def _check_drain(snapshot: MapSnapshot, drain: tuple[str, ...]) -> None:
    """Every shard to drain exists and is shared."""
    for name in drain:
        named = snapshot.shards.get(name)
        if named is None:
            raise UnknownShard(name)
        if named.tier is not Tier.SHARED:
            raise ConfigurationError(
                f"only shared shards can be drained: {name!r} is {named.tier.value} "
                "(demote or move its tenant instead)",
                field="drain",
            )


def _checked_cost(cost_of: CostFunction, tenant: Tenant, size: TenantSize) -> float:
    """The strategy's cost of *tenant*, refused unless finite and not negative."""
    cost = float(cost_of(tenant, size))
    if not math.isfinite(cost) or cost < 0:
        raise ConfigurationError(
            f"the cost function gave {cost!r} for tenant {tenant.id!r}: a cost must be "
            "a finite number, zero or more",
            field="strategy",
        )
    return cost


def _why_unmovable(tenant: Tenant) -> str | None:
    """Why the planner may not move *tenant* (None: it may)."""
    if tenant.pinned:
        return "pinned"
    if tenant.tier is not Tier.SHARED:
        return "dedicated"
    if tenant.state is not TenantState.ACTIVE:
        return "being moved"
    return None


@dataclass
class _Pool:
    """The shared pool while a plan is made: where each tenant is, each shard's load,
    the moves so far and the budgets they spend."""

    draining: tuple[str, ...]
    shares: dict[str, float]
    load: dict[str, float]
    placed: dict[str, list[str]]
    max_moves: int | None
    max_bytes: int | None
    costs: dict[str, float] = field(default_factory=dict)
    bytes_of: dict[str, int] = field(default_factory=dict)
    movable: set[str] = field(default_factory=set)
    left_behind: dict[str, str] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    bytes_before: dict[str, float] = field(default_factory=dict)
    moves: list[PlannedMove] = field(default_factory=list)
    moved: set[str] = field(default_factory=set)
    spent: int = 0

    @classmethod
    def of(
        cls,
        snapshot: MapSnapshot,
        sizes: Mapping[str, TenantSize],
        cost_of: CostFunction,
        drain: tuple[str, ...],
        max_moves: int | None,
        max_bytes: int | None,
    ) -> _Pool:
        """The pool of *snapshot*'s shared shards, each tenant costed by *cost_of*."""
        shared = {n: shard for n, shard in snapshot.shards.items() if shard.tier is Tier.SHARED}
        draining = tuple(
            sorted({*drain, *(n for n, s in shared.items() if s.state is ShardState.DRAINING)})
        )
        active = {
            n: s
            for n, s in shared.items()
            if s.state is ShardState.ACTIVE and s.weight > 0 and n not in draining
        }
        weight_total = sum(s.weight for s in active.values())
        shares = {n: s.weight / weight_total for n, s in sorted(active.items())}
        base = base_cost(
            cost_of,
            [sizes.get(t.id, TenantSize()) for t in snapshot.tenants.values() if t.shard in shared],
        )
        load = {n: 0.0 for n in shared}
        pool = cls(draining, shares, load, {n: [] for n in shared}, max_moves, max_bytes)
        for record in sorted(snapshot.tenants.values(), key=lambda t: t.id):
            if record.shard in shared:
                pool.place(
                    record,
                    _checked_cost(cost_of, record, sizes.get(record.id, TenantSize())) + base,
                )
        pool.before = dict(pool.load)
        pool.bytes_of = {t: sizes.get(t, TenantSize()).bytes for t in pool.costs}
        pool.bytes_before = pool.shard_bytes()
        return pool

    def place(self, tenant: Tenant, cost: float) -> None:
        """Count *tenant*, of *cost*, where it lives."""
        self.costs[tenant.id] = cost
        self.load[tenant.shard] += cost
        self.placed[tenant.shard].append(tenant.id)
        why = _why_unmovable(tenant)
        if why is None:
            self.movable.add(tenant.id)
        elif tenant.shard in self.draining:
            self.left_behind[tenant.id] = why

    def shard_bytes(self) -> dict[str, float]:
        """Every shared shard's measured bytes, as the tenants are placed now."""
        return {n: float(sum(self.bytes_of[t] for t in ts)) for n, ts in self.placed.items()}

    def budget_left(self) -> bool:
        """Whether another move fits the move and byte budgets."""
        return (self.max_moves is None or len(self.moves) < self.max_moves) and (
            self.max_bytes is None or self.spent < self.max_bytes
        )

    def fits_budget(self, tenant: str) -> bool:
        """Whether moving *tenant* stays within the byte budget."""
        return self.max_bytes is None or self.spent + self.bytes_of[tenant] <= self.max_bytes

    def may_move(self, tenant: str) -> bool:
        """Whether *tenant* may still move: movable and not moved in this plan."""
        return tenant in self.movable and tenant not in self.moved

    def relocate(self, tenant: str, source: str, target: str) -> None:
        """Plan the move of *tenant* from *source* to *target*."""
        self.placed[source].remove(tenant)
        self.placed[target].append(tenant)
        self.load[source] -= self.costs[tenant]
        self.load[target] += self.costs[tenant]
        self.moved.add(tenant)
        self.spent += self.bytes_of[tenant]
        self.moves.append(
            PlannedMove(tenant, source, target, self.costs[tenant], self.bytes_of[tenant])
        )

    def drain(self) -> None:
        """Phase 1: every movable tenant of a draining shard leaves, the biggest first,
        for the shard it fills least. Some shard is at or below its target, so the one
        chosen ends at most the tenant's cost (in units of the smallest share) above its
        target: never worse than the draining shard's load counted for in spread()."""
        costs, load, shares = self.costs, self.load, self.shares
        for source in self.draining:
            for tenant in sorted(self.placed[source], key=lambda t: (-costs[t], t)):
                if tenant not in self.movable:
                    continue
                if not self.budget_left() or not self.fits_budget(tenant):
                    self.left_behind[tenant] = "over the move or byte budget"
                    continue
                target = min(shares, key=lambda s: ((load[s] + costs[tenant]) / shares[s], s))
                self.relocate(tenant, source, target)

    def plan(self, threshold: float, reason: str, seconds: float) -> Plan:
        """The plan made so far, stopped for *reason*."""
        notes = _drain_notes(self.draining, self.placed, self.left_behind)
        return Plan(
            self.moves,
            self.before,
            dict(self.load),
            self.shares,
            threshold,
            self.draining,
            "; ".join([*notes, reason]),
            {"seconds": seconds, "moves": float(len(self.moves))},
            {t: why for t, why in self.left_behind.items() if t not in self.moved},
            self.bytes_before,
            self.shard_bytes(),
        )


def _balance(pool: _Pool, threshold: float, min_improvement: float) -> str:
    """Phase 2: balance the active shards, their own load against their shares (what
    stays on a draining shard is reported, not balanced); return why it stopped."""
    total = sum(pool.load[s] for s in pool.shares)
    if total <= 0:
        return "balanced (no load)"
    while True:
        ratios = {s: pool.load[s] / (total * pool.shares[s]) for s in pool.shares}
        if max(abs(r - 1.0) for r in ratios.values()) <= threshold:
            return f"every active shard within {threshold:.0%} of its share"
        if not pool.budget_left():
            return "stopped at the move or byte budget"
        choice = _next_move(pool, ratios, total, threshold, min_improvement)
        if choice is None:
            blocked = pool.max_bytes is not None and any(
                pool.may_move(t) and not pool.fits_budget(t)
                for s in pool.shares
                for t in pool.placed[s]
            )
            if blocked:
                return "stopped at the byte budget"
            return (
                "no move improves the balance enough (the rest are too big, pinned or "
                "moved already)"
            )
        pool.relocate(*choice)


def _next_move(
    pool: _Pool,
    ratios: Mapping[str, float],
    total: float,
    threshold: float,
    min_improvement: float,
) -> tuple[str, str, str] | None:
    """The next balancing move (tenant, source, target), or None.

    Pairs are tried from the most extreme down: sources from the highest ratio,
    targets from the lowest; a pair must involve a shard outside the threshold.
    """
    current = sum((ratios[s] - 1.0) ** 2 for s in pool.shares)
    by_ratio = sorted(pool.shares, key=lambda s: (ratios[s], s))
    for source in reversed(by_ratio):
        for target in by_ratio:
            if ratios[source] <= ratios[target]:
                break
            if ratios[source] <= 1 + threshold and ratios[target] >= 1 - threshold:
                continue
            best = _best_tenant(pool, ratios, total, source, target, min_improvement * current)
            if best is not None:
                return best, source, target
    return None


def _best_tenant(
    pool: _Pool, ratios: Mapping[str, float], total: float, source: str, target: str, gain: float
) -> str | None:
    """The tenant of *source* best moved to *target*: it lowers the sum of squared
    deviations by at least *gain*, widens no range of ratios, and is the largest
    that fits the gap between them (past the gap, the smallest)."""
    load, shares = pool.load, pool.shares
    want_s, want_t = total * shares[source], total * shares[target]
    # The most a move may carry without overshooting: the smaller of the source's
    # excess and the target's deficit.
    gap = min(load[source] - want_s, want_t - load[target])
    # Never widen the range of ratios: the target must not rise above the
    # source's old ratio, nor the source fall below the target's.
    limit = (ratios[source] - ratios[target]) * total * min(shares[source], shares[target])
    best: str | None = None
    best_key: tuple[float, float, str] | None = None
    for tenant in pool.placed[source]:
        cost = pool.costs[tenant]
        if not pool.may_move(tenant) or cost <= 0 or cost > limit or not pool.fits_budget(tenant):
            continue
        change = (
            ((load[source] - cost - want_s) / want_s) ** 2
            - ((load[source] - want_s) / want_s) ** 2
            + ((load[target] + cost - want_t) / want_t) ** 2
            - ((load[target] - want_t) / want_t) ** 2
        )
        if change >= 0 or -change < gain:
            continue
        key = (0.0, -cost, tenant) if cost <= gap else (1.0, cost, tenant)
        if best_key is None or key < best_key:
            best, best_key = tenant, key
    return best


#: Why a tenant stays on a draining shard: how to say it, and what to do about it.
_STAYS = {
    "pinned": ("pinned tenant(s)", "unpin them or move them by hand"),
    "dedicated": ("dedicated tenant(s)", "move them by hand"),
    "being moved": ("tenant(s) being moved", "finish or abort those moves, then plan again"),
    "over the move or byte budget": ("tenant(s) over the move or byte budget", "plan again"),
    "nowhere to go": ("tenant(s) with nowhere to go", "add or activate a shared shard"),
}


def _drain_notes(
    draining: tuple[str, ...], placed: Mapping[str, list[str]], left_behind: Mapping[str, str]
) -> list[str]:
    notes = []
    for shard in draining:
        if not placed[shard]:
            notes.append(f"shard {shard} drained")
            continue
        reasons: dict[str, list[str]] = {}
        for tenant in sorted(placed[shard]):
            reasons.setdefault(left_behind.get(tenant, "pinned"), []).append(tenant)
        parts = []
        for why, tenants in sorted(reasons.items()):
            what, hint = _STAYS[why]
            shown = ", ".join(tenants[:5]) + (f" +{len(tenants) - 5}" if len(tenants) > 5 else "")
            parts.append(f"{len(tenants)} {what} ({shown}): {hint}")
        notes.append(f"shard {shard} keeps " + "; ".join(parts))
    return notes
