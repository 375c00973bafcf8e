"""Placement: spread over weighted shards, and stability when the fleet grows."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantry import Catalog, PlacementRing, Shard, ShardState, Tier
from tenantry.shardmap.model import NAME_PATTERN

ShardUrl = Callable[[], str]

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_-"
FIRST = "abcdefghijklmnopqrstuvwxyz0123456789"

#: Tenant ids per example. The sampling error of one shard's share is then at most
#: 0.5 percentage points (one standard deviation, at a share of 1/2).
IDS = 10_000

#: How far a shard's share may stray from its weight, in share points. Measured: the
#: hash space of these fleets strays by at most 1.1 points from the weights (two equal
#: shards, 400 vnodes per weight unit); with the sampling error that leaves more than
#: five standard deviations of margin, so a failure means placement is broken.
TOLERANCE = 0.04

FLEETS = {
    "two-equal": {"shared-1": 1, "shared-2": 1},
    "one-two-three": {"shared-1": 1, "shared-2": 2, "shared-3": 3},
    "four-pools": {"pool-a": 1, "pool-b": 1, "pool-c": 2, "pool-d": 4},
}


@st.composite
def tenant_ids(draw: st.DrawFn) -> list[str]:
    """IDS distinct valid tenant ids, in one of the shapes real ids take."""
    rng = draw(st.randoms(use_true_random=False))
    shape = draw(st.sampled_from(["counter", "random", "slug-counter"]))
    prefix = draw(st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda s: len(s) < 40))
    if shape == "counter":
        return [f"{prefix}{i}" for i in range(IDS)]
    if shape == "slug-counter":
        return [f"{prefix}-{i:06d}-eu" for i in range(IDS)]
    ids: set[str] = set()
    while len(ids) < IDS:
        tail = "".join(rng.choices(ALPHABET, k=rng.randint(3, 20)))
        ids.add(rng.choice(FIRST) + tail)
    return sorted(ids)


@pytest.mark.parametrize("fleet", FLEETS.values(), ids=FLEETS.keys())
@settings(max_examples=8, deadline=None)
@given(ids=tenant_ids())
def test_each_shard_gets_its_weights_share(fleet: dict[str, int], ids: list[str]) -> None:
    ring = PlacementRing(fleet)
    counts = Counter(ring.place(tenant_id) for tenant_id in ids)
    total = sum(fleet.values())
    assert set(counts) == set(fleet)
    for name, weight in fleet.items():
        share = counts[name] / len(ids)
        assert abs(share - weight / total) <= TOLERANCE, (name, share, weight / total)


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.from_regex(NAME_PATTERN, fullmatch=True), min_size=1, max_size=300),
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    new_weight=st.integers(1, 4),
)
def test_a_new_shard_only_takes_tenants_to_itself(
    ids: list[str], weights: list[int], new_weight: int
) -> None:
    fleet = {f"shard-{i}": w for i, w in enumerate(weights)}
    before = PlacementRing(fleet)
    after = PlacementRing({**fleet, "newcomer": new_weight})
    for tenant_id in ids:
        old, new = before.place(tenant_id), after.place(tenant_id)
        assert new in (old, "newcomer")


def test_a_new_shard_takes_about_its_share() -> None:
    ids = [f"tenant-{i}" for i in range(IDS)]
    fleet = {"shared-1": 1, "shared-2": 1, "shared-3": 1}
    before = PlacementRing(fleet)
    after = PlacementRing({**fleet, "shared-4": 1})
    moved = sum(before.place(t) != after.place(t) for t in ids) / len(ids)
    # a quarter of the ring now belongs to the newcomer, and nothing else moves
    assert abs(moved - 0.25) <= TOLERANCE


def test_placement_is_deterministic_and_order_free() -> None:
    ids = [f"t{i}" for i in range(500)]
    one = PlacementRing({"a": 1, "b": 2, "c": 1})
    two = PlacementRing({"c": 1, "b": 2, "a": 1})
    assert [one.place(t) for t in ids] == [two.place(t) for t in ids]
    # the hash is md5, never the per-process randomised hash(): a pinned answer
    assert PlacementRing({"shared-1": 1, "shared-2": 1}).place("voltpark") == "shared-1"
    assert PlacementRing({"shared-1": 1, "shared-2": 1}).place("metro-charge") == "shared-2"


def test_distribution_follows_the_weights() -> None:
    ring = PlacementRing({"a": 1, "b": 3})
    assert ring.distribution() == {"a": 0.25, "b": 0.75}
    assert ring.nodes == {"a": 1, "b": 3}
    empty = PlacementRing({})
    assert (empty.place("acme"), empty.distribution(), empty.nodes) == (None, {}, {})
    assert repr(ring) == "PlacementRing({'a': 1, 'b': 3})"


def test_the_ring_holds_only_active_shared_shards_with_weight() -> None:
    shards = [
        Shard("active", "sqlite:///a.db", weight=2),
        Shard("draining", "sqlite:///b.db", state=ShardState.DRAINING),
        Shard("retired", "sqlite:///c.db", state=ShardState.RETIRED),
        Shard("dedicated", "sqlite:///d.db", tier=Tier.DEDICATED),
        Shard("weightless", "sqlite:///e.db", weight=0),
        Shard("also-active", "sqlite:///f.db"),
    ]
    ring = PlacementRing.for_shards(shards)
    assert ring.nodes == {"active": 2, "also-active": 1}
    assert {ring.place(f"t{i}") for i in range(300)} == {"active", "also-active"}


def test_adding_a_shard_moves_no_existing_tenant(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Callable[[Shard], dict[str, object]]
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    for i in range(12):
        catalog.add_tenant(f"early-{i}")
    before = {t.id: t.shard for t in catalog.list_tenants()}
    assert set(before.values()) == {"s1", "s2"}

    catalog.add_shard("s3", new_shard_url(), weight=2)
    # the directory is the truth: nothing moved, though the ring would now say otherwise
    assert {t.id: t.shard for t in catalog.list_tenants()} == before
    assert any(catalog.propose_shard(t) == "s3" for t in before)
    for name in ("s1", "s2"):
        expected = {t for t, s in before.items() if s == name}
        assert set(read_residency(catalog.get_shard(name))) == expected
    assert read_residency(catalog.get_shard("s3")) == {}

    # new tenants do use the new shard, in proportion
    late = [catalog.add_tenant(f"late-{i}").shard for i in range(12)]
    assert "s3" in late
    # and a draining shard gets none of them
    catalog.set_shard_state("s3", "draining")
    assert "s3" not in {catalog.add_tenant(f"later-{i}").shard for i in range(6)}
    assert {t.id: t.shard for t in catalog.list_tenants() if t.id.startswith("early")} == before


def test_random_ids_spread_across_catalog_shards(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    # The catalog places with the same ring as PlacementRing.for_shards.
    for name in ("s1", "s2", "s3"):
        catalog.add_shard(name, new_shard_url())
    rng = random.Random(7)
    ids = [f"t{rng.getrandbits(40):x}" for _ in range(60)]
    ring = PlacementRing.for_shards(catalog.list_shards())
    assert [catalog.propose_shard(t) for t in ids] == [ring.place(t) for t in ids]
