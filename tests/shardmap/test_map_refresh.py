"""A map refresh costs in proportion to the change, not to the map.

``MapSnapshot.apply`` updates a persistent mapping (a trie shared with the snapshot it
came from): applying one changed tenant to 100,000 allocates what applying it to 1,000
does, a few nodes, where copying the map would allocate megabytes. The catalog answers
a tenant-only change with one statement that reads neither the shards nor anything
but the changed rows. Applying deltas always gives what building the map whole gives.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantry import Catalog, MapSnapshot, Shard, Tenant, load_settings
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.model import MapDelta, TenantState

ShardUrl = Callable[[], str]

SHARDS = {f"s{i}": Shard(f"s{i}", f"postgresql://app@db/s{i}") for i in range(3)}


def snapshot_of(count: int, version: int = 1) -> MapSnapshot:
    tenants = {f"t{i}": Tenant(f"t{i}", f"s{i % 3}") for i in range(count)}
    return MapSnapshot(version, SHARDS, tenants)


def one_change(snapshot: MapSnapshot) -> MapDelta:
    changed = Tenant("t7", "s2", pinned=True)
    return MapDelta(snapshot.version + 1, snapshot.version, None, {"t7": changed}, frozenset())


def allocated_by(call: Callable[[], Any]) -> int:
    """The peak of memory newly allocated while *call* runs (bytes)."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - before


def test_applying_one_change_allocates_alike_at_1000_and_100000_tenants() -> None:
    small, large = snapshot_of(1_000), snapshot_of(100_000)
    small_cost = allocated_by(lambda: small.apply(one_change(small)))
    large_cost = allocated_by(lambda: large.apply(one_change(large)))
    # A copy of 100,000 entries allocates megabytes (a dict of them is ~5 MiB); a path
    # copy in the trie a few hundred bytes per level.
    assert large_cost < 64 * 1024, large_cost
    assert large_cost < 4 * small_cost + 16 * 1024, (small_cost, large_cost)


def test_the_old_snapshot_is_untouched_and_shares_the_rest() -> None:
    old = snapshot_of(10_000)
    new = old.apply(
        MapDelta(2, 1, None, {"t7": Tenant("t7", "s2", pinned=True)}, frozenset({"t8"}))
    )
    assert old.tenant("t7").pinned is False and "t8" in old.tenants and len(old.tenants) == 10_000
    assert new.tenant("t7").pinned is True and "t8" not in new.tenants
    assert len(new.tenants) == 9_999 and new.version == 2
    assert new.shards is old.shards  # the delta said the shards did not change
    assert new.tenants["t9"] is old.tenants["t9"]
    moved = new.apply(MapDelta(3, 2, {"s9": Shard("s9", "sqlite:///s9.db")}, {}, frozenset()))
    assert set(moved.shards) == {"s9"} and moved.tenants is new.tenants


def test_snapshots_are_read_only_mappings() -> None:
    given_tenants = {"a": Tenant("a", "s0")}
    snapshot = MapSnapshot(1, dict(SHARDS), given_tenants)
    given_tenants["b"] = Tenant("b", "s1")  # the caller's dict is not the snapshot's
    assert "b" not in snapshot.tenants and snapshot.tenants.get("b") is None
    with pytest.raises(TypeError):
        snapshot.tenants["c"] = Tenant("c", "s0")  # type: ignore[index]
    with pytest.raises(TypeError):
        del snapshot.shards["s0"]  # type: ignore[attr-defined]
    assert [t.id for t in snapshot.tenants_on("s0")] == ["a"]
    assert dict(snapshot.tenants.items()) == {"a": Tenant("a", "s0")}


tenant_ids = st.sampled_from([f"t{i}" for i in range(40)])
changes = st.lists(
    st.tuples(
        st.lists(st.tuples(tenant_ids, st.sampled_from(sorted(SHARDS)), st.booleans()), max_size=6),
        st.frozensets(tenant_ids, max_size=4),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(start=st.dictionaries(tenant_ids, st.sampled_from(sorted(SHARDS))), steps=changes)
def test_applying_deltas_equals_building_the_map_whole(
    start: dict[str, str], steps: list[tuple[list[tuple[str, str, bool]], frozenset[str], bool]]
) -> None:
    model = {t: Tenant(t, s) for t, s in start.items()}
    shard_model = dict(SHARDS)
    snapshot = MapSnapshot(1, shard_model, model)
    for number, (upserts, removed, new_shard) in enumerate(steps, start=2):
        changed = {t: Tenant(t, s, pinned=p) for t, s, p in upserts}
        gone = removed - changed.keys()
        for tenant_id in gone:
            model.pop(tenant_id, None)
        model.update(changed)
        shards_now = None
        if new_shard:
            shard_model[f"x{number}"] = Shard(f"x{number}", "sqlite:///x.db")
            shards_now = dict(shard_model)
        before = dict(snapshot.tenants)
        previous = snapshot
        snapshot = snapshot.apply(MapDelta(number, number - 1, shards_now, changed, gone))
        assert dict(previous.tenants) == before  # the old snapshot did not change
    whole = MapSnapshot(len(steps) + 1, shard_model, model)
    assert snapshot.version == whole.version
    assert dict(snapshot.tenants) == dict(whole.tenants)
    assert dict(snapshot.shards) == dict(whole.shards)
    assert snapshot.tenants_sorted() == whole.tenants_sorted()


# -- the catalog's side ---------------------------------------------------------------


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every statement any engine runs from now on (BEGINs left out)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


def test_a_tenant_change_costs_a_router_one_statement(
    catalog: Catalog, new_shard_url: ShardUrl, statements: list[str]
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    cache = MapCache(catalog, background=False)
    try:
        cache.refresh()
        catalog.set_pinned("acme", True)
        catalog.add_tenant("globex", shard="s2")
        statements.clear()
        fresh = cache.refresh()
        assert fresh.tenant("acme").pinned and fresh.tenant("globex").shard == "s2"
        assert len(statements) == 1, statements
        assert "tenantry_shards" not in statements[0]
        statements.clear()
        assert cache.refresh() is fresh  # nothing changed: the same one statement
        assert len(statements) == 1, statements
        before = fresh
        catalog.remove_tenant("globex")
        after = cache.refresh()
        assert "globex" not in after.tenants and after.shards is before.shards
    finally:
        cache.close()


def test_a_version_that_changed_no_tenant_brings_every_shard(
    catalog: Catalog, new_shard_url: ShardUrl
) -> None:
    catalog.add_shard("s1", new_shard_url())
    since = catalog.map_version()
    catalog.add_tenant("acme", shard="s1")
    delta = catalog.map_delta(since)
    assert delta is not None and delta.shards is None and set(delta.tenants) == {"acme"}

    catalog.add_shard("s2", new_shard_url())
    catalog.set_pinned("acme", True)
    delta = catalog.map_delta(since)  # two tenant changes and a shard's
    assert delta is not None and delta.shards is not None
    assert set(delta.shards) == {"s1", "s2"} and delta.tenants["acme"].pinned

    since = catalog.map_version()
    catalog.set_shard_state("s2", "draining")
    delta = catalog.map_delta(since)
    assert delta is not None and delta.shards is not None
    assert delta.shards["s2"].state.value == "draining" and not delta.tenants

    since = catalog.map_version()
    with catalog.transaction() as (conn, _version):  # a move's step: no tenant logged
        catalog.set_tenant_state(conn, "acme", TenantState.MOVING)
    with catalog.transaction():
        pass
    delta = catalog.map_delta(since)
    assert delta is not None and delta.shards is not None and delta.version == since + 2
    assert delta.tenants["acme"].state is TenantState.MOVING


@pytest.mark.postgres
def test_a_dead_map_connection_is_replaced_without_an_error(pg_url: str) -> None:
    with Catalog(pg_url, settings=load_settings(catalog_url=pg_url)) as catalog:
        catalog.init()
        version = catalog.map_version()
        reads = catalog._map_engine
        assert reads is not None and reads is not catalog.engine
        connects: list[object] = []
        sa.event.listen(reads, "connect", lambda *_: connects.append(1))
        with catalog.engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
        assert killed and all(ok for (ok,) in killed)
        assert catalog.map_version() == version  # the dead one failed, a new one answered
        assert connects == [1]
        delta = catalog.map_delta(version)
        assert delta is not None and delta.version == version and connects == [1]
