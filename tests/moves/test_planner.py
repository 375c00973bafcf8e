"""The rebalancing planner: properties over random pools, data movement, drains, options.

The planner is pure (map snapshot + sizes + strategy -> plan), so these tests need no
database. ``pool_spread`` below restates the measure the planner promises not to
worsen, independently of ``tenantry.rebalance.planner.spread``:

- an active shard (shared, active, weight > 0, not drained) is measured against its
  weighted share of the load of the active *and* draining shards together, since all
  of that load belongs on the active shards: ``abs(load / (total * share) - 1)``;
- a draining shard's target is zero: its load counts as ``load / (total * smallest
  share)``, the deviation it would add to the smallest active shard. Moving a tenant
  off a draining shard onto the active shard it fills least therefore never reads as
  worse, while an active-only measure would call every drain of a big tenant a loss;
- without draining shards it is the largest deviation of an active shard.

"No worse" is then: every prefix of a plan (a plan stopped half-way) has a spread at
most the spread before it. A plan without draining shards promises more: no prefix
takes an active shard's ratio (load / share) outside the old lowest and highest.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tenantry.errors import ConfigurationError, UnknownShard
from tenantry.rebalance import CostFunction, Plan, TenantSize, plan_rebalance, spread
from tenantry.rebalance.planner import base_cost, by_count, by_size, by_size_and_count
from tenantry.shardmap.model import MapSnapshot, Shard, ShardState, Tenant, TenantState, Tier

EPS = 1e-9
PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- pools -----------------------------------------------------------------------------


@dataclass
class Pool:
    snapshot: MapSnapshot
    sizes: dict[str, TenantSize]

    def shard(self, name: str) -> Shard:
        return self.snapshot.shards[name]

    def tenant(self, tenant_id: str) -> Tenant:
        return self.snapshot.tenants[tenant_id]


def make_pool(
    shards: Sequence[tuple[str, int] | tuple[str, int, str] | tuple[str, int, str, str]],
    tenants: Sequence[tuple[str, str, int] | tuple[str, str, int, bool]],
    *,
    dedicated: Sequence[tuple[str, str, int]] = (),
) -> Pool:
    """*shards*: (name, weight[, state[, tier]]); *tenants*: (id, shard, bytes[, pinned]);
    *dedicated*: (tenant, its dedicated shard, bytes)."""
    records = {}
    for spec in shards:
        name, weight = spec[0], spec[1]
        state = ShardState(spec[2]) if len(spec) > 2 else ShardState.ACTIVE
        tier = Tier(spec[3]) if len(spec) > 3 else Tier.SHARED
        records[name] = Shard(name, f"sqlite:///{name}.db", tier, state, weight)
    people, sizes = {}, {}
    for spec in tenants:
        tid, shard, size = spec[0], spec[1], spec[2]
        pinned = bool(spec[3]) if len(spec) > 3 else False
        people[tid] = Tenant(tid, shard, Tier.SHARED, pinned)
        sizes[tid] = TenantSize(rows=size // 100, bytes=size)
    for tid, shard, size in dedicated:
        records.setdefault(shard, Shard(shard, f"sqlite:///{shard}.db", Tier.DEDICATED))
        people[tid] = Tenant(tid, shard, Tier.DEDICATED)
        sizes[tid] = TenantSize(rows=size // 100, bytes=size)
    return Pool(MapSnapshot(1, records, people), sizes)


def zipf_sizes(rng: random.Random, count: int, *, top: int, exponent: float = 1.1) -> list[int]:
    """*count* sizes falling off like a Zipf law from *top*, in random order."""
    sizes = [int(top / rank**exponent) for rank in range(1, count + 1)]
    rng.shuffle(sizes)
    return sizes


@st.composite
def pools(draw: st.DrawFn, *, pinned: bool = True, draining: bool = True) -> Pool:
    """2-8 shared shards with weights 1-5 (now and then 0), some draining or retired,
    0-3 dedicated shards with their tenant; 0-200 shared tenants with sizes drawn from
    one of several shapes (zeros, uniform, Zipf, a few giants), some pinned, a few
    being moved, some with no size measured."""
    count = draw(st.integers(2, 8))
    states = ["active"] * 5 + (["draining", "retired"] if draining else [])
    shards = []
    for i in range(count):
        state = draw(st.sampled_from(states))
        weight = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 0] if state == "active" else [1, 3]))
        shards.append((f"s{i}", weight, state))
    holders = [name for name, _weight, state in shards if state != "retired"]
    assume(holders)
    people = {}
    measured = {}
    # Small pools are drawn tenant by tenant (hypothesis explores and shrinks them
    # well); large ones from a seed, in one of several shapes of size distribution.
    n = draw(st.one_of(st.integers(0, 12), st.integers(13, 200)))
    if n <= 12:
        for i in range(n):
            tid = f"t{i:03d}"
            size = draw(
                st.one_of(
                    st.sampled_from([0, 1, 90, 150, 400, 2**16, 10**6, 10**9]),
                    st.integers(1, 50),
                    st.integers(0, 10**7),
                )
            )
            home = draw(st.sampled_from(holders))
            pin = pinned and draw(st.integers(0, 5)) == 0
            state = TenantState.ACTIVE
            if pinned and draw(st.integers(0, 20)) == 0:
                state = TenantState.MOVING
            people[tid] = Tenant(tid, home, Tier.SHARED, pin, state)
            if draw(st.integers(0, 10)):
                measured[tid] = TenantSize(rows=size // 120, bytes=size)
        rng = random.Random(n)
    else:
        shape = draw(st.sampled_from(["zipf", "uniform", "zeros", "giants", "mixed"]))
        rng = random.Random(draw(st.integers(0, 2**32)))
        if shape == "zipf":
            sizes = zipf_sizes(rng, n, top=rng.choice([10**6, 10**8, 10**10]))
        elif shape == "uniform":
            sizes = [rng.randint(0, 5 * 10**6) for _ in range(n)]
        elif shape == "zeros":
            sizes = [0] * n
        elif shape == "giants":
            sizes = [rng.choice([10**9, 10**4, 0]) for _ in range(n)]
        else:
            sizes = [0 if rng.random() < 0.3 else int(rng.lognormvariate(12, 3)) for _ in range(n)]
        p_pinned = draw(st.sampled_from([0.0, 0.1, 0.5])) if pinned else 0.0
        # Skew the placement: a pool worth rebalancing is rarely even.
        skew = [rng.random() ** 3 for _ in holders]
        for i, size in enumerate(sizes):
            tid = f"t{i:03d}"
            state = TenantState.MOVING if pinned and rng.random() < 0.03 else TenantState.ACTIVE
            home = rng.choices(holders, weights=skew)[0]
            people[tid] = Tenant(tid, home, Tier.SHARED, rng.random() < p_pinned, state)
            if rng.random() < 0.95:
                measured[tid] = TenantSize(rows=size // 120, bytes=size)
    records = {
        name: Shard(name, f"sqlite:///{name}.db", Tier.SHARED, ShardState(state), weight)
        for name, weight, state in shards
    }
    for i in range(draw(st.integers(0, 3))):
        records[f"d{i}"] = Shard(f"d{i}", f"sqlite:///d{i}.db", Tier.DEDICATED)
        people[f"dedicated-{i}"] = Tenant(f"dedicated-{i}", f"d{i}", Tier.DEDICATED)
        measured[f"dedicated-{i}"] = TenantSize(rows=1, bytes=rng.randint(0, 10**9))
    return Pool(MapSnapshot(7, records, people), measured)


@st.composite
def options(draw: st.DrawFn, pool: Pool) -> dict[str, object]:
    chosen: dict[str, object] = {
        "strategy": draw(
            st.sampled_from(["by_size", "by_size_and_count", "by_count", by_rows, by_bytes])
        ),
        "threshold": draw(st.sampled_from([0.02, 0.05, 0.10, 0.25, 0.5])),
    }
    if draw(st.booleans()):
        chosen["max_moves"] = draw(st.integers(0, 40))
    if draw(st.booleans()):
        total = sum(s.bytes for s in pool.sizes.values())
        chosen["max_bytes"] = draw(st.integers(0, max(total // 2, 1)))
    shared_active = sorted(
        n
        for n, s in pool.snapshot.shards.items()
        if s.tier is Tier.SHARED and s.state is ShardState.ACTIVE
    )
    if shared_active and draw(st.integers(0, 4)) == 0:
        chosen["drain"] = (draw(st.sampled_from(shared_active)),)
    return chosen


def by_rows(tenant: Tenant, size: TenantSize) -> float:
    """A user-supplied cost: rows, plus one per tenant."""
    return float(size.rows + 1)


def by_bytes(tenant: Tenant, size: TenantSize) -> float:
    """A user-supplied cost: bytes alone (empty tenants cost nothing)."""
    return float(size.bytes)


# -- the measure, restated -------------------------------------------------------------


def active_shares(plan: Plan, pool: Pool, drain: Sequence[str] = ()) -> dict[str, float]:
    """Active shards and their shares, worked out from the snapshot (not the plan)."""
    active = {
        n: s.weight
        for n, s in pool.snapshot.shards.items()
        if s.tier is Tier.SHARED
        and s.state is ShardState.ACTIVE
        and s.weight > 0
        and n not in drain
    }
    total = sum(active.values())
    return {n: w / total for n, w in active.items()}


def pool_spread(
    load: Mapping[str, float], shares: Mapping[str, float], draining: Sequence[str]
) -> float:
    if not shares:
        return 0.0
    total = sum(load[s] for s in shares) + sum(load[d] for d in draining)
    if total <= 0:
        return 0.0
    worst = max(abs(load[s] / (total * share) - 1) for s, share in shares.items())
    smallest = min(shares.values())
    return max([worst, *(load[d] / (total * smallest) for d in draining)])


def loads(pool: Pool, cost: CostFunction, placement: Mapping[str, str]) -> dict[str, float]:
    shared = [n for n, s in pool.snapshot.shards.items() if s.tier is Tier.SHARED]
    found = dict.fromkeys(shared, 0.0)
    pooled = [pool.sizes.get(t, TenantSize()) for t, s in placement.items() if s in found]
    base = base_cost(cost, pooled)
    for tid, shard in placement.items():
        if shard in found:
            found[shard] += cost(pool.tenant(tid), pool.sizes.get(tid, TenantSize())) + base
    return found


def cost_function(strategy: object) -> CostFunction:
    if strategy == "by_size":
        return by_size
    if strategy == "by_count":
        return by_count
    if strategy == "by_size_and_count":
        return by_size_and_count
    assert callable(strategy)
    return strategy  # type: ignore[return-value]


# -- properties ------------------------------------------------------------------------


@PROPERTIES
@given(data=st.data())
def test_plan_properties(data: st.DataObject) -> None:
    pool = data.draw(pools())
    chosen = data.draw(options(pool))
    plan = plan_rebalance(pool.snapshot, pool.sizes, **chosen)  # type: ignore[arg-type]
    cost = cost_function(chosen["strategy"])
    drain = tuple(chosen.get("drain", ()))
    shares = active_shares(plan, pool, drain)
    draining = sorted(
        {
            *drain,
            *(
                n
                for n, s in pool.snapshot.shards.items()
                if s.tier is Tier.SHARED and s.state is ShardState.DRAINING
            ),
        }
    )
    assert plan.shares == pytest.approx(shares)
    assert list(plan.draining) == draining

    # Every tenant's cost is the strategy's plus the base derived from the pool.
    pooled = [
        pool.sizes.get(t.id, TenantSize())
        for t in pool.snapshot.tenants.values()
        if pool.snapshot.shards[t.shard].tier is Tier.SHARED
    ]
    base = base_cost(cost, pooled)
    if pooled and cost in (by_size, by_size_and_count):
        mean = sum(s.bytes for s in pooled) / len(pooled)
        fraction = 0.01 if cost is by_size else 1.0
        assert base == max(1, round(fraction * mean))  # never more than 1% of the bytes
    else:
        assert base == 0

    # Only movable tenants move, each at most once, from its home to an active shard.
    counts = Counter(m.tenant_id for m in plan.moves)
    assert not [t for t, c in counts.items() if c > 1], "a tenant moves twice"
    for move in plan.moves:
        tenant = pool.tenant(move.tenant_id)
        assert not tenant.pinned, f"pinned {tenant.id} moved"
        assert tenant.tier is Tier.SHARED, f"dedicated {tenant.id} moved"
        assert tenant.state is TenantState.ACTIVE, f"{tenant.id} is being moved already"
        assert move.source == tenant.shard
        assert move.target != move.source
        target = pool.shard(move.target)
        assert target.tier is Tier.SHARED and target.state is ShardState.ACTIVE
        assert target.weight > 0 and move.target not in draining
        assert move.bytes == pool.sizes.get(tenant.id, TenantSize()).bytes
        size = pool.sizes.get(tenant.id, TenantSize())
        assert move.cost == pytest.approx(cost(tenant, size) + base)

    # Bounded, within budgets.
    movable = [
        t
        for t in pool.snapshot.tenants.values()
        if not t.pinned and t.tier is Tier.SHARED and t.state is TenantState.ACTIVE
    ]
    assert len(plan.moves) <= len(movable)
    if "max_moves" in chosen:
        assert len(plan.moves) <= chosen["max_moves"]  # type: ignore[operator]
    if "max_bytes" in chosen:
        assert plan.bytes <= chosen["max_bytes"]  # type: ignore[operator]

    # Every prefix, the whole plan included, is no worse than before.
    placement = {t.id: t.shard for t in pool.snapshot.tenants.values()}
    load = loads(pool, cost, placement)
    assert plan.before == pytest.approx(load)
    start = pool_spread(load, shares, draining)
    assert plan.spread_before() == pytest.approx(start)
    low = min((load[s] / w for s, w in shares.items()), default=0.0)
    high = max((load[s] / w for s, w in shares.items()), default=0.0)
    for i, move in enumerate(plan.moves, 1):
        placement[move.tenant_id] = move.target
        now = loads(pool, cost, placement)
        assert pool_spread(now, shares, draining) <= start + EPS, f"prefix of {i} moves is worse"
        if not draining:
            for s, share in shares.items():
                assert low - EPS <= now[s] / share <= high + EPS, f"{s} left the range"
    assert plan.after == pytest.approx(loads(pool, cost, placement))
    assert plan.spread_after() <= plan.spread_before() + EPS

    # Drains: every movable tenant leaves unless a budget stops it; the rest are named.
    budgeted = "max_moves" in chosen or "max_bytes" in chosen
    for shard in draining:
        staying = [t for t, home in placement.items() if home == shard]
        for tid in staying:
            tenant = pool.tenant(tid)
            why = plan.left_behind.get(tid)
            if tenant.pinned:
                assert why == "pinned"
            elif tenant.state is TenantState.MOVING:
                assert why == "being moved"
            elif not shares:
                assert why == "nowhere to go"
            else:
                assert budgeted and why == "over the move or byte budget", tid
        if staying and shares:
            assert f"shard {shard} keeps" in plan.reason
        elif shares:
            assert f"shard {shard} drained" in plan.reason


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=2, max_size=8),
    seed=st.integers(0, 2**32),
    threshold=st.sampled_from([0.05, 0.10, 0.2]),
    extra=st.integers(0, 100),
)
def test_by_count_balances_counts(
    weights: list[int], seed: int, threshold: float, extra: int
) -> None:
    """With enough movable tenants that one tenant is within the threshold of the
    smallest share, by_count brings every shard's count within the threshold of its
    share, whatever the tenants' sizes."""
    rng = random.Random(seed)
    total_weight = sum(weights)
    # n * smallest share >= 1 / threshold: a single tenant is a step inside the band.
    n = math.ceil(total_weight / (min(weights) * threshold)) + extra
    names = [f"s{i}" for i in range(len(weights))]
    crowded = rng.sample(names, k=rng.randint(1, len(names)))
    pool = make_pool(
        list(zip(names, weights, strict=True)),
        [(f"t{i}", rng.choice(crowded), rng.choice([0, 10, 10**9])) for i in range(n)],
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes, strategy="by_count", threshold=threshold)
    after = Counter(pool.tenant(t).shard for t in pool.snapshot.tenants)
    for move in plan.moves:
        after[move.source] -= 1
        after[move.target] += 1
    for name, weight in zip(names, weights, strict=True):
        share = n * weight / total_weight
        assert abs(after[name] - share) <= threshold * share + EPS, (name, after, plan.reason)
    assert plan.after == {s: float(after[s]) for s in names}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(10, 150))
def test_user_cost_function_is_honoured(seed: int, n: int) -> None:
    """The cost function decides the load: called once per shared tenant with its
    record and size, its values make up the loads and the moves' costs, and the plan
    balances that load even where bytes say otherwise."""
    rng = random.Random(seed)
    pool = make_pool(
        [("a", 1), ("b", 1), ("c", 2)],
        [(f"t{i:03d}", rng.choice("ab"), rng.randint(0, 10**6)) for i in range(n)],
        dedicated=[("big", "d1", 10**9)],
    )
    calls: list[str] = []

    class Requests:
        """Load = requests a tenant sends: here read off its id, not its size."""

        def __call__(self, tenant: Tenant, size: TenantSize) -> float:
            assert isinstance(size, TenantSize)
            calls.append(tenant.id)
            return float(int(tenant.id[1:]) % 7 + 1)

    cost = Requests()
    plan = plan_rebalance(pool.snapshot, pool.sizes, strategy=cost, threshold=0.10)
    assert sorted(calls) == sorted(t for t in pool.snapshot.tenants if t != "big")
    expected = {s: 0.0 for s in "abc"}
    for t in pool.snapshot.tenants.values():
        if t.tier is Tier.SHARED:
            expected[t.shard] += int(t.id[1:]) % 7 + 1
    assert plan.before == pytest.approx(expected)
    for move in plan.moves:
        assert move.cost == int(move.tenant_id[1:]) % 7 + 1
    total = sum(expected.values())
    if total * 0.25 * 0.10 >= 7:  # the smallest share can absorb the biggest tenant's step
        assert plan.spread_after() <= 0.10 + EPS, plan.reason
    # The same pool by bytes is another plan: the function was not ignored.
    assert plan.before != plan_rebalance(pool.snapshot, pool.sizes).before


def test_a_cost_function_must_give_a_finite_non_negative_number() -> None:
    pool = make_pool([("a", 1), ("b", 1)], [("t1", "a", 5)])
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigurationError, match="'t1': a cost must be a finite number"):
            plan_rebalance(pool.snapshot, pool.sizes, strategy=lambda t, s, bad=bad: bad)


# -- data moved when a shard is added ---------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_adding_an_empty_shard_moves_little_more_than_needed(n: int) -> None:
    """N shards holding equal bytes in many small tenants, then an empty one: the plan
    moves at most 1.1x the bytes the new shard needs to come within the threshold of its
    share, and ends with every shard within the threshold."""
    rng = random.Random(n)
    threshold = 0.10
    # The same sizes on every shard (so equal totals), 1-16 MiB each: small beside a
    # shard, large beside the planner's per-tenant base cost.
    sizes = [rng.randint(1, 16) * 2**20 for _ in range(120)]
    tenants = []
    for s in range(n):
        order = sizes[:]
        rng.shuffle(order)
        tenants += [(f"t{s}-{i:03d}", f"s{s}", size) for i, size in enumerate(order)]
    pool = make_pool([(f"s{s}", 1) for s in range(n + 1)], tenants)
    plan = plan_rebalance(pool.snapshot, pool.sizes, threshold=threshold)

    total_bytes = n * sum(sizes)
    needed = (1 - threshold) * total_bytes / (n + 1)
    assert {m.target for m in plan.moves} == {f"s{n}"}, "only the new shard receives"
    assert needed <= plan.bytes <= 1.1 * needed, (plan.bytes / needed, plan.reason)
    assert plan.spread_after() <= threshold
    assert plan.spread_before() == pytest.approx(1.0)  # the new shard is 100% below


def test_adding_an_empty_shard_by_count() -> None:
    pool = make_pool(
        [("a", 1), ("b", 1), ("c", 1), ("new", 1)],
        [(f"t{s}{i:02d}", s, 10**6 * (i % 5)) for s in "abc" for i in range(40)],
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes, strategy="by_count")
    # 120 tenants, 30 a shard: the new one needs 27 to be within 10%.
    assert 27 <= len(plan.moves) <= 30
    assert plan.after["new"] == len(plan.moves)
    assert plan.spread_after() <= 0.10


# -- drains ----------------------------------------------------------------------------


def test_drain_empties_the_shard_by_the_remaining_weights() -> None:
    rng = random.Random(3)
    tenants = [(f"t{i:03d}", "old", rng.randint(1, 64) * 2**16) for i in range(200)]
    pool = make_pool(
        [("old", 1, "draining"), ("a", 1), ("b", 2), ("c", 5), ("gone", 1, "retired")], tenants
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes)
    assert plan.draining == ("old",)
    assert plan.after["old"] == 0 and len(plan.moves) == 200
    assert {m.target for m in plan.moves} == {"a", "b", "c"}
    total = sum(plan.before.values())
    for shard, weight in (("a", 1), ("b", 2), ("c", 5)):
        assert plan.after[shard] / total == pytest.approx(weight / 8, rel=0.10)
    assert plan.spread_before() == pytest.approx(1 / (1 / 8))  # all of it on "old"
    assert plan.spread_after() <= 0.10
    assert plan.reason.startswith("shard old drained")
    assert plan.left_behind == {}


def test_drain_leaves_pinned_tenants_and_says_so() -> None:
    tenants = [(f"t{i}", "s3", 1000 * (i + 1), i in (2, 5)) for i in range(8)]
    tenants += [("x", "s1", 4000), ("y", "s2", 4000)]
    pool = make_pool([("s1", 1), ("s2", 1), ("s3", 1)], tenants)
    # Named in drain=: the snapshot still calls it active.
    plan = plan_rebalance(pool.snapshot, pool.sizes, drain=("s3",))
    assert plan.draining == ("s3",)
    assert sorted(m.tenant_id for m in plan.moves) == ["t0", "t1", "t3", "t4", "t6", "t7"]
    assert plan.left_behind == {"t2": "pinned", "t5": "pinned"}
    assert "shard s3 keeps 2 pinned tenant(s) (t2, t5): unpin them" in plan.reason
    base = base_cost("by_size", pool.sizes.values())
    assert 0 < base <= 0.01 * max(s.bytes for s in pool.sizes.values())
    assert plan.after["s3"] == pytest.approx(3000 + 6000 + 2 * base)
    assert plan.spread_after() < plan.spread_before()


def test_drain_within_a_budget_names_the_rest() -> None:
    pool = make_pool([("s1", 1), ("s2", 1, "draining")], [(f"t{i}", "s2", 10**6) for i in range(5)])
    plan = plan_rebalance(pool.snapshot, pool.sizes, max_moves=2)
    assert len(plan.moves) == 2
    assert sorted(plan.left_behind.values()) == ["over the move or byte budget"] * 3
    assert "plan again" in plan.reason


def test_nowhere_to_drain_to() -> None:
    pool = make_pool([("s1", 1, "draining"), ("s2", 1, "retired")], [("t", "s1", 10)])
    plan = plan_rebalance(pool.snapshot, pool.sizes)
    assert plan.moves == [] and plan.left_behind == {"t": "nowhere to go"}
    assert plan.reason == (
        "shard s1 keeps 1 tenant(s) with nowhere to go (t): add or activate a shared shard; "
        "no active shared shard"
    )


# -- stopping rules and options --------------------------------------------------------


def test_a_move_never_widens_the_range_even_when_it_lowers_the_squares() -> None:
    """Found while writing these tests: moving t1 (90) from z to b lowered the sum of
    squared deviations but took z from +20% to -25% of its share."""
    pool = make_pool(
        [("z", 2), ("b", 5), ("c", 3)],
        [("t1", "z", 90), ("t2", "z", 150), ("t3", "b", 400), ("t4", "c", 360)],
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes, strategy=lambda t, s: float(s.bytes))
    assert plan.spread_after() <= plan.spread_before()
    assert "no move improves" in plan.reason


def test_no_cycles_without_an_improvement_threshold() -> None:
    """Found while writing these tests: with min_improvement=0 a tenant went back and
    forth between two shards until the move budget ran out (forever without one)."""
    pool = make_pool([("a", 1), ("b", 1)], [("x", "a", 10), ("y", "a", 45), ("z", "b", 45)])
    plan = plan_rebalance(
        pool.snapshot,
        pool.sizes,
        strategy=lambda t, s: float(s.bytes),
        min_improvement=0.0,
        threshold=0.05,
    )
    assert len(plan.moves) <= 1


def test_a_tenant_moves_at_most_once() -> None:
    """Found while writing these tests: t0 went s3 -> s0 -> s2, copying its bytes twice
    where s3 -> s2 once would have done."""
    pool = make_pool(
        [("s0", 2), ("s1", 3), ("s2", 3), ("s3", 1)], [("t0", "s3", 2), ("t1", "s1", 3)]
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes, strategy=by_bytes)
    assert [m.tenant_id for m in plan.moves] == ["t0"]


def test_balanced_pool_needs_no_moves() -> None:
    pool = make_pool(
        [("a", 1), ("b", 3)], [("t1", "a", 10**6), ("t2", "b", 10**6), ("t3", "b", 2 * 10**6)]
    )
    plan = plan_rebalance(pool.snapshot, pool.sizes)
    assert plan.moves == [] and "within 10%" in plan.reason


def test_empty_and_tenantless_pools() -> None:
    pool = make_pool([("a", 1), ("b", 1)], [])
    plan = plan_rebalance(pool.snapshot, pool.sizes)
    assert plan.moves == [] and plan.spread_before() == 0.0
    assert spread({}, {}) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"threshold": 0}, "threshold must be between 0 and 1"),
        ({"threshold": 1.5}, "threshold must be between 0 and 1"),
        (
            {"strategy": "by_mood"},
            "unknown strategy 'by_mood': use one of by_size, by_size_and_count, by_count",
        ),
        ({"strategy": 42}, "strategy must be a name or a cost function"),
        ({"min_improvement": -0.1}, "min_improvement must be at least 0"),
        ({"max_moves": -1}, "max_moves must not be negative"),
        ({"max_bytes": -1}, "max_bytes must not be negative"),
        ({"drain": ("d1",)}, "only shared shards can be drained: 'd1' is dedicated"),
    ],
)
def test_bad_options(kwargs: dict[str, object], words: str) -> None:
    pool = make_pool([("a", 1), ("b", 1)], [("t", "a", 1)], dedicated=[("big", "d1", 1)])
    with pytest.raises(ConfigurationError, match=words):
        plan_rebalance(pool.snapshot, pool.sizes, **kwargs)  # type: ignore[arg-type]


def test_unknown_drain_shard() -> None:
    pool = make_pool([("a", 1), ("b", 1)], [("t", "a", 1)])
    with pytest.raises(UnknownShard, match="nowhere"):
        plan_rebalance(pool.snapshot, pool.sizes, drain=("nowhere",))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shards=st.integers(2, 6),
    empty=st.integers(500, 3000),
    real=st.integers(20, 200),
    new_shard=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_thousands_of_near_empty_tenants_do_not_skew_the_balance(
    shards: int, empty: int, real: int, new_shard: bool, seed: int
) -> None:
    """The default strategy balances the bytes tenants occupy: thousands of near-empty
    tenants (under 8 KiB) add a base that cannot outweigh the real data (a fixed
    64 KiB per tenant, before, was half the modelled load and the planner balanced it)."""
    rng = random.Random(seed)
    homes = shards - 1 if new_shard else shards  # a new, empty shard joins
    tenants = [(f"e{i}", f"s{rng.randrange(homes)}", rng.randint(0, 8192)) for i in range(empty)]
    tenants += [
        (f"r{i}", f"s{rng.randrange(homes)}", rng.randint(10_000, 2_000_000)) for i in range(real)
    ]
    pool = make_pool([(f"s{i}", 1) for i in range(shards)], tenants)
    plan = plan_rebalance(pool.snapshot, pool.sizes)
    total = sum(plan.bytes_before.values())
    base = base_cost("by_size", pool.sizes.values())
    assert base * len(tenants) <= 0.01 * total + len(tenants)  # rounding to whole bytes
    target = total / shards
    needed = sum(max(0.0, b - target) for b in plan.bytes_before.values())
    largest = max(pool.sizes[m.tenant_id].bytes for m in plan.moves) if plan.moves else 0
    assert plan.bytes <= 1.1 * needed + largest  # at most one tenant past the minimum
    assert plan.bytes_spread_after() <= plan.bytes_spread_before() + EPS
    assert sum(plan.bytes_after.values()) == total
    if max(s.bytes for s in pool.sizes.values()) <= 0.05 * target:
        # fine-grained: every shard's bytes within the threshold (and the 1% base)
        assert plan.bytes_spread_after() <= plan.threshold + 0.01
