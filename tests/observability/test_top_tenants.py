"""The busiest tenants: bounded series whatever the number of tenants; decayed scores."""

from __future__ import annotations

import random
from typing import Any

import sqlalchemy as sa
from obshelpers import ObsFleet, parse, series, value
from prometheus_client import CollectorRegistry

from tenantry.observability import TopTenants, metrics_text
from tenantry.observability.metrics import Metrics

PER_TENANT = (
    "tenantry_tenant_transactions_total",
    "tenantry_tenant_transaction_seconds_total",
    "tenantry_tenant_score",
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_100000_tenants_stay_within_the_bound_and_the_hot_ones_are_found() -> None:
    metrics = Metrics(CollectorRegistry(), top_tenants=100)
    sketch = metrics.tenants
    hot = [f"hot-{i}" for i in range(10)]
    rng = random.Random(20)
    cold = 0
    for n in range(300_000):
        if n % 3 == 0:  # a third of all transactions: ten tenants
            sketch.record(rng.choice(hot), "s1", 0.002)
        else:  # the rest: 100,000 distinct tenants, each seen twice
            sketch.record(f"tenant-{cold % 100_000}", "s2", 0.001)
            cold += 1
    assert len(sketch) <= sketch.slots == 300
    got = parse(metrics_text(metrics))
    for name in PER_TENANT:
        assert len(series(got, name)) == 100
    top = sketch.busiest(10)
    assert {load.tenant for load in top} == set(hot)
    for load in top:
        # each hot tenant: about 10,000 transactions, counted since it was admitted
        assert 9_000 < load.transactions <= 10_500
        # decayed over the test's few seconds (half-life 60 s); an overestimate of the
        # tenant's decayed count by at most its error, never of the count since admission
        assert load.score > 0.9 * load.transactions
        assert load.score - load.error <= load.transactions + 1e-6
    assert sum(value(got, PER_TENANT[0], tenant=t, shard="s1") for t in hot) == sum(
        load.transactions for load in top
    )


def test_scores_decay_with_the_half_life() -> None:
    clock = Clock()
    sketch = TopTenants(2, slots=4, half_life=60.0, clock=clock)
    for _ in range(100):
        sketch.record("old", "s1", 0.01)
    clock.now = 60.0
    [old] = sketch.busiest()
    assert abs(old.score - 50.0) < 1e-9
    assert old.transactions == 100
    assert abs(old.seconds - 1.0) < 1e-9
    clock.now = 600.0  # ten half-lives on: 100 -> 0.098
    for _ in range(10):
        sketch.record("new", "s1", 0.01)
    first, second = sketch.busiest()
    assert (first.tenant, second.tenant) == ("new", "old")
    assert abs(first.score - 10.0) < 1e-9
    assert abs(second.score - 100 / 1024) < 1e-9


def test_weights_are_rescaled_before_they_overflow() -> None:
    clock = Clock()
    sketch = TopTenants(1, slots=2, half_life=1.0, clock=clock)
    for step in range(5000):  # 5,000 half-lives: 2**5000 would overflow a float
        clock.now = float(step)
        sketch.record("a", "s1", 0.0)
    [a] = sketch.busiest()
    assert abs(a.score - 2.0) < 1e-9  # 1 + 1/2 + 1/4 + ...
    assert a.transactions == 5000


def test_space_saving_replaces_the_least_and_inherits_its_count() -> None:
    clock = Clock()
    sketch = TopTenants(2, slots=2, half_life=1e9, clock=clock)
    for _ in range(5):
        sketch.record("a", "s1", 0.0)
    for _ in range(3):
        sketch.record("b", "s1", 0.0)
    sketch.record("c", "s1", 0.0)  # replaces b (3), and inherits 3 as its error
    loads = {load.tenant: load for load in sketch.busiest()}
    assert set(loads) == {"a", "c"}
    assert loads["c"].transactions == 1
    assert abs(loads["c"].score - 4.0) < 1e-6
    assert abs(loads["c"].error - 3.0) < 1e-6
    assert loads["a"].error == 0


def test_routed_tenants_labelled_by_tenant_and_shard(fleet: ObsFleet, scrape: Any) -> None:
    metrics = Metrics(CollectorRegistry(), top_tenants=3)
    tenants = [f"t{i}" for i in range(8)]
    for i, tenant in enumerate(tenants):
        fleet.add_tenant(tenant, "s1" if i % 2 else "s2")
    router = fleet.router(metrics=metrics)
    for i, tenant in enumerate(tenants):
        for _ in range(i + 1):  # t7 the busiest
            with router.connection(tenant) as conn:
                conn.execute(sa.text("SELECT 1"))
    got = scrape(metrics)
    for name in PER_TENANT:
        assert sorted(series(got, name), key=lambda s: s["tenant"]) == [
            {"tenant": "t5", "shard": "s1"},
            {"tenant": "t6", "shard": "s2"},
            {"tenant": "t7", "shard": "s1"},
        ]
    assert value(got, PER_TENANT[0], tenant="t7", shard="s1") == 8
    assert value(got, PER_TENANT[0], tenant="t6", shard="s2") == 7
