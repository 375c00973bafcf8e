"""Refreshing the map by what changed: the catalog's change log and MapSnapshot.apply.

Runs on SQLite and PostgreSQL. After any sequence of catalog changes, a cache that
refreshed by deltas holds exactly the snapshot a whole reload would give, without
reading the whole map; a cache further behind than the log reaches reloads it whole.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tenantry import Catalog, MapSnapshot, load_settings
from tenantry.errors import TenantryError
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.catalog import store as catalog_store
from tenantry.shardmap.model import TenantState
from tenantry.shardmap.scripts import CATALOG

ShardUrl = Callable[[], str]


@pytest.fixture
def full_loads(catalog: Catalog, count_loads: Callable[[Catalog], list[int]]) -> list[int]:
    """The version of every whole-map read (``catalog.snapshot()``) from now on."""
    return count_loads(catalog)


@pytest.fixture
def cache(catalog: Catalog) -> Iterator[MapCache]:
    made = MapCache(catalog, background=False)
    yield made
    made.close()


def same_map(left: MapSnapshot, right: MapSnapshot) -> None:
    assert left.version == right.version
    assert dict(left.shards) == dict(right.shards)
    assert dict(left.tenants) == dict(right.tenants)


def whole(catalog: Catalog) -> MapSnapshot:
    # Not catalog.snapshot: the fixture above counts those.
    return type(catalog).snapshot(catalog)


def test_every_kind_of_change_reaches_the_cache_as_a_delta(
    catalog: Catalog, new_shard_url: ShardUrl, cache: MapCache, full_loads: list[int]
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_shard("d1", new_shard_url(), tier="dedicated")
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("add", lambda: catalog.add_tenant("acme", shard="s1")),
        ("add more", lambda: [catalog.add_tenant(t, shard="s2") for t in ("b", "c", "d")]),
        ("pin", lambda: catalog.set_pinned("b", True)),
        ("place", lambda: catalog.set_placement("acme", "s2")),
        ("promote", lambda: catalog.set_placement("c", "d1")),
        ("remove", lambda: catalog.remove_tenant("d")),
        ("shard only", lambda: catalog.add_shard("s3", new_shard_url())),
    ]
    for name, change in steps:
        before = cache.version
        change()
        fresh = cache.refresh()
        assert fresh.version > before, name
        same_map(fresh, whole(catalog))
    with catalog.transaction() as (conn, _version):
        catalog.set_tenant_state(conn, "acme", TenantState.MOVING)
    assert cache.refresh().tenant("acme").state is TenantState.MOVING
    assert "d" not in cache.snapshot.tenants
    assert full_loads == []  # never the whole map


def test_random_changes_then_one_refresh_equals_a_whole_reload(
    catalog: Catalog, new_shard_url: ShardUrl, cache: MapCache, full_loads: list[int]
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    rng = random.Random(20261129)
    names = [f"t{i}" for i in range(12)]
    for round_ in range(4):
        for _ in range(15):
            tenant = rng.choice(names)
            action = rng.choice(["add", "remove", "pin", "place"])
            try:
                if action == "add":
                    catalog.add_tenant(tenant, shard=rng.choice(["s1", "s2"]))
                elif action == "remove":
                    catalog.remove_tenant(tenant)
                elif action == "pin":
                    catalog.set_pinned(tenant, rng.random() < 0.5)
                else:
                    catalog.set_placement(tenant, rng.choice(["s1", "s2"]))
            except TenantryError:
                pass  # a tenant that exists already, or does not: nothing changed
        same_map(cache.refresh(), whole(catalog))
        assert full_loads == [], round_


def test_a_cache_behind_the_kept_changes_reloads_the_whole_map(
    catalog: Catalog,
    new_shard_url: ShardUrl,
    cache: MapCache,
    full_loads: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_store, "CHANGES_KEPT", 3)
    monkeypatch.setattr(catalog_store, "_PRUNE_EVERY", 1)
    catalog.add_shard("s1", new_shard_url())
    behind = cache.version
    for i in range(6):
        catalog.add_tenant(f"t{i}", shard="s1")
    assert catalog.map_delta(behind) is None  # pruned
    fresh = cache.refresh()
    assert full_loads == [fresh.version]
    same_map(fresh, whole(catalog))
    # Within the kept versions a delta still serves.
    catalog.remove_tenant("t0")
    same_map(cache.refresh(), whole(catalog))
    assert full_loads == [fresh.version]
    with catalog.engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT min(version) FROM tenantry_map_changes")).scalar()
        since = conn.execute(sa.text("SELECT changes_since FROM tenantry_map")).scalar()
    assert kept is not None and since is not None and kept > since


def test_delta_from_the_future_or_to_the_wrong_snapshot(catalog: Catalog) -> None:
    now = catalog.map_version()
    assert catalog.map_delta(now + 1) is None
    delta = catalog.map_delta(now)
    assert delta is not None and delta.version == now and not delta.tenants and not delta.removed
    old = MapSnapshot(version=now - 1, shards={}, tenants={})
    with pytest.raises(ValueError, match="does not apply"):
        old.apply(delta)


def test_upgrading_a_catalog_starts_the_log_at_its_version(db_url: str) -> None:
    """A catalog made by an older tenantry (revision c0003) keeps its map; routers older
    than the upgrade reload it whole once."""
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        CATALOG.upgrade(conn, "c0003")
        conn.execute(sa.text("UPDATE tenantry_map SET version = 41"))
    engine.dispose()
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as catalog:
        assert catalog.init() == CATALOG.head
        assert catalog.map_version() == 41
        assert catalog.map_delta(40) is None
        assert catalog.map_delta(41) is not None
