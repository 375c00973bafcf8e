"""rebalance.py's pools and plans: Zipf and long-tail tenant sizes on three shards, a
fourth joining, and what the planner, the old default, naive rehashing and a ring move.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tenantry.rebalance.planner import (
    CostFunction,
    Plan,
    TenantSize,
    base_cost,
    by_size,
    by_size_and_count,
    plan_rebalance,
    spread,
)
from tenantry.shardmap.model import MapSnapshot, Shard, Tenant
from tenantry.shardmap.ring import PlacementRing

NAME = "rebalance"
OLD = ("s1", "s2", "s3")
NEW = "s4"
ALL = (*OLD, NEW)
THRESHOLD = 0.10
#: Bytes of the Zipf pool's largest tenant; the rest fall off from it.
TOP_BYTES = 2 * 2**30
#: The long tail: the share of tenants under 100 rows, the rows of the largest of the
#: rest and of the smallest, and bytes per row (the end-to-end rows take about 200).
TAIL_SMALL = 0.95
TAIL_TOP_ROWS = 1_000_000
TAIL_LOW_ROWS = 3_000
BYTES_PER_ROW = 200
#: The default by_size's fixed base per tenant before the 1% base.
OLD_BASE_BYTES = 64 * 1024

PLANNER = "planner (by_size, 10%)"
OLD_DEFAULT = "old default (bytes + 64 KiB)"
BY_SIZE_AND_COUNT = "by_size_and_count (10%)"
NAIVE = "naive rehash (md5 % 4)"
RING = "consistent hash (ring)"


def old_by_size(tenant: Tenant, size: TenantSize) -> float:
    """The default strategy before the 1% base: bytes plus a fixed 64 KiB per tenant (a
    custom cost function, so the planner adds no base of its own)."""
    return float(size.bytes + OLD_BASE_BYTES)


# -- pools -----------------------------------------------------------------------------


def zipf_sizes(count: int, exponent: float, rng: random.Random) -> dict[str, TenantSize]:
    """Tenant id -> size: the k-th largest holds TOP_BYTES / k**exponent bytes."""
    sizes = [int(TOP_BYTES / k**exponent) for k in range(1, count + 1)]
    rng.shuffle(sizes)
    return {f"t{i:06d}": TenantSize(rows=b // BYTES_PER_ROW, bytes=b) for i, b in enumerate(sizes)}


def tail_exponent(large: int) -> float:
    """The Zipf exponent that takes the large tenants from TAIL_TOP_ROWS to TAIL_LOW_ROWS."""
    return math.log(TAIL_TOP_ROWS / TAIL_LOW_ROWS) / math.log(large) if large > 1 else 1.0


def long_tail_sizes(count: int, rng: random.Random) -> dict[str, TenantSize]:
    """Tenant id -> size: TAIL_SMALL of them with 1..99 rows (uniform), the rest with
    Zipf rows from TAIL_TOP_ROWS down to TAIL_LOW_ROWS; BYTES_PER_ROW bytes a row."""
    small = round(count * TAIL_SMALL)
    large = count - small
    exponent = tail_exponent(large)
    rows = [rng.randint(1, 99) for _ in range(small)]
    rows += [int(TAIL_TOP_ROWS / k**exponent) for k in range(1, large + 1)]
    rng.shuffle(rows)
    return {f"t{i:06d}": TenantSize(rows=r, bytes=r * BYTES_PER_ROW) for i, r in enumerate(rows)}


def snapshot(placement: Mapping[str, str], shards: Sequence[str]) -> MapSnapshot:
    return MapSnapshot(
        1,
        {s: Shard(s, f"sqlite:///{s}.db") for s in shards},
        {t: Tenant(t, home) for t, home in placement.items()},
    )


def loads(
    placement: Mapping[str, str],
    sizes: Mapping[str, TenantSize],
    strategy: CostFunction | None = by_size,
) -> dict[str, float]:
    """Every shard's load as the planner counts it for *strategy* (the cost function
    plus the base it adds, :func:`base_cost`), or the measured bytes (None)."""
    base = 0.0 if strategy is None else base_cost(strategy, sizes.values())
    found = dict.fromkeys(ALL, 0.0)
    for tenant, home in placement.items():
        size = sizes[tenant]
        cost = size.bytes if strategy is None else strategy(Tenant(tenant, home), size) + base
        found[home] += cost
    return found


def pool_spread(
    placement: Mapping[str, str],
    sizes: Mapping[str, TenantSize],
    shards: Sequence[str],
    strategy: CostFunction | None = by_size,
) -> float:
    return spread(loads(placement, sizes, strategy), {s: 1 / len(shards) for s in shards})


def md5_slot(tenant: str, slots: int) -> int:
    return int.from_bytes(hashlib.md5(tenant.encode()).digest()[:8], "big") % slots


def moved(
    before: Mapping[str, str], after: Mapping[str, str], sizes: Mapping[str, TenantSize]
) -> tuple[int, int]:
    tenants = [t for t in before if before[t] != after[t]]
    return len(tenants), sum(sizes[t].bytes for t in tenants)


def timed(action: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The result of *action* and its median wall time in seconds over *repeats*."""
    times: list[float] = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def applied(placement: Mapping[str, str], plan: Plan) -> dict[str, str]:
    found = dict(placement)
    for m in plan.moves:
        found[m.tenant_id] = m.target
    return found


def compare(
    sizes: Mapping[str, TenantSize],
    strategies: Sequence[tuple[str, CostFunction]],
    repeats: int,
) -> list[dict[str, Any]]:
    """Every placement's figures for one pool: one row per planner strategy (its own
    settled three-shard pool, then the plan once the fourth shard joins), then the
    naive rehash and the consistent hash."""
    total_bytes = sum(s.bytes for s in sizes.values())
    ideal_tenants, ideal_bytes = len(sizes) / 4, total_bytes / 4

    def row(
        name: str,
        before: Mapping[str, str],
        after: Mapping[str, str],
        strategy: CostFunction | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        tenants, size = moved(before, after, sizes)
        held = loads(after, sizes, None)
        return {
            "placement": name,
            "tenants_moved": tenants,
            "tenants_vs_ideal": tenants / ideal_tenants,
            "bytes_moved": size,
            "bytes_fraction": size / total_bytes,
            "bytes_vs_ideal": size / ideal_bytes,
            # The default planner's load (bytes + by_size's base), for every placement.
            "spread_before": pool_spread(before, sizes, OLD),
            "spread_after": pool_spread(after, sizes, ALL),
            # What the shards hold.
            "bytes_spread_before": pool_spread(before, sizes, OLD, None),
            "bytes_spread_after": pool_spread(after, sizes, ALL, None),
            # The strategy's own load (None for the hashes).
            "strategy_spread_after": (
                None if strategy is None else pool_spread(after, sizes, ALL, strategy)
            ),
            "new_shard_share": held[NEW] / total_bytes,
            "new_shard_tenants": sum(home == NEW for home in after.values()),
            **extra,
        }

    ring3, ring4 = PlacementRing(dict.fromkeys(OLD, 1)), PlacementRing(dict.fromkeys(ALL, 1))
    placed = {t: str(ring3.place(t)) for t in sizes}
    rows = []
    for name, strategy in strategies:
        settle = plan_rebalance(
            snapshot(placed, OLD), sizes, strategy=strategy, threshold=THRESHOLD
        )
        settled = applied(placed, settle)
        plan, seconds = timed(
            lambda strategy=strategy, settled=settled: plan_rebalance(
                snapshot(settled, ALL), sizes, strategy=strategy, threshold=THRESHOLD
            ),
            repeats,
        )
        planned = applied(settled, plan)
        # The benchmark counts loads and spreads as the planner does.
        assert plan.spread_after() == pool_spread(planned, sizes, ALL, strategy)
        assert plan.bytes_spread_after() == pool_spread(planned, sizes, ALL, None)
        assert settle.bytes_spread_after() == pool_spread(settled, sizes, OLD, None)
        rows.append(
            row(
                name,
                settled,
                planned,
                strategy,
                planning_s=seconds,
                reason=plan.reason,
                settling_moves=len(settle.moves),
                settling_bytes=settle.bytes,
            )
        )
    rows.append(
        row(
            NAIVE,
            {t: OLD[md5_slot(t, 3)] for t in sizes},
            {t: ALL[md5_slot(t, 4)] for t in sizes},
        )
    )
    rows.append(row(RING, placed, {t: str(ring4.place(t)) for t in sizes}))
    return rows


def pool_facts(seed: int, sizes: Mapping[str, TenantSize]) -> dict[str, Any]:
    total_bytes = sum(s.bytes for s in sizes.values())
    old_bases = len(sizes) * OLD_BASE_BYTES
    return {
        "seed": seed,
        "tenants": len(sizes),
        "total_bytes": total_bytes,
        "total_rows": sum(s.rows for s in sizes.values()),
        "mean_bytes": total_bytes / len(sizes),
        "largest_fraction": max(s.bytes for s in sizes.values()) / total_bytes,
        "base_cost": base_cost(by_size, sizes.values()),
        # What the old fixed base was of the old load.
        "old_base_fraction": old_bases / (total_bytes + old_bases),
        "ideal": {"tenants": len(sizes) / 4, "bytes": total_bytes / 4},
    }


def scenario(count: int, exponent: float, seed: int, repeats: int) -> dict[str, Any]:
    """The Zipf pool: every placement's figures for one random pool."""
    sizes = zipf_sizes(count, exponent, random.Random(seed))
    strategies = [(PLANNER, by_size), (OLD_DEFAULT, old_by_size)]
    return {**pool_facts(seed, sizes), "rows": compare(sizes, strategies, repeats)}


def long_tail(count: int, seed: int, repeats: int) -> dict[str, Any]:
    """The long-tail pool: every placement's figures for one random pool."""
    sizes = long_tail_sizes(count, random.Random(seed))
    small = [s for s in sizes.values() if s.rows < 100]
    strategies = [
        (PLANNER, by_size),
        (BY_SIZE_AND_COUNT, by_size_and_count),
        (OLD_DEFAULT, old_by_size),
    ]
    return {
        **pool_facts(seed, sizes),
        "small_tenants": len(small),
        "small_bytes_fraction": sum(s.bytes for s in small) / sum(s.bytes for s in sizes.values()),
        "exponent": tail_exponent(count - len(small)),
        "rows": compare(sizes, strategies, repeats),
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for i, name in enumerate(r["placement"] for r in runs[0]["rows"]):
        rows = [run["rows"][i] for run in runs]
        entry: dict[str, Any] = {"placement": name, "pools": len(rows)}
        for key in ("tenants_moved", "bytes_vs_ideal", "spread_after", "bytes_spread_after"):
            values = [r[key] for r in rows]
            entry[key] = {"median": statistics.median(values), "worst": max(values)}
        shares = [r["new_shard_share"] for r in rows]
        entry["new_shard_share"] = {
            "median": statistics.median(shares),
            "min": min(shares),
            "max": max(shares),
        }
        entry["within_threshold"] = sum(r["bytes_spread_after"] <= THRESHOLD for r in rows)
        found.append(entry)
    return found
