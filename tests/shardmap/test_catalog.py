"""The catalog: one suite, run on SQLite and on PostgreSQL (``db_url``)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from tenantry import (
    Catalog,
    CatalogNotInitialized,
    InvalidShardName,
    InvalidShardUrl,
    InvalidTenantId,
    MapSnapshot,
    NoSharedShard,
    PlacementError,
    Shard,
    ShardExists,
    ShardNotActive,
    ShardOccupied,
    ShardState,
    ShardUnavailable,
    Tenant,
    TenantExists,
    TenantState,
    Tier,
    TierMismatch,
    UnknownShard,
    UnknownTenant,
    load_settings,
)
from tenantry.shardmap import NOTIFY_CHANNEL
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.scripts import CATALOG, SHARD

ShardUrl = Callable[[], str]
Residency = Callable[[Shard], dict[str, tuple[str, int]]]

UNREACHABLE_PG = "postgresql://u:pw@127.0.0.1:1/x"

INVALID_IDS = [
    "",
    "a" * 64,
    "Acme",
    "ACME",
    "ac me",
    " acme",
    "acme ",
    "acme'",
    'ac"me',
    "'; drop table x; --",
    "-acme",
    "_acme",
    "acme\n",
    "ac.me",
    "ac/me",
    "acmé",
]


def state_of(catalog: Catalog) -> tuple[MapSnapshot, list[dict[str, object]]]:
    """The snapshot, plus every field of every record (created_at included)."""
    snap = catalog.snapshot()
    records = [dataclasses.asdict(s) for s in snap.shards.values()]
    records += [dataclasses.asdict(t) for t in snap.tenants.values()]
    return snap, sorted(records, key=repr)


# -- schema -------------------------------------------------------------------------


def test_init_creates_schema_at_version_one_and_is_idempotent(catalog: Catalog) -> None:
    assert catalog.revision() == CATALOG.head
    assert catalog.init() == CATALOG.head  # again: nothing to do, no error
    assert catalog.map_version() == 1
    snap = catalog.snapshot()
    assert (snap.version, dict(snap.shards), dict(snap.tenants)) == (1, {}, {})
    tables = set(sa.inspect(catalog.engine).get_table_names())
    # its own version table, never the application's alembic_version
    assert {"tenantry_map", "tenantry_shards", "tenantry_tenants", CATALOG.version_table} <= (
        tables
    )
    assert "alembic_version" not in tables


def test_uninitialised_catalog_says_run_init(db_url: str) -> None:
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as cat:
        assert cat.revision() is None
        for call in (cat.map_version, cat.snapshot, cat.list_shards, cat.list_tenants):
            with pytest.raises(CatalogNotInitialized, match="run `tenantry init` first"):
                call()
        with pytest.raises(CatalogNotInitialized):
            cat.add_shard("s1", "sqlite:///never-created.db", prepare=False)
        assert cat.revision() is None


# -- shards -------------------------------------------------------------------------


def test_add_shard_registers_and_prepares_it(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    url = new_shard_url()
    before = datetime.now(UTC) - timedelta(seconds=1)
    shard = catalog.add_shard("s1", url, weight=3)

    assert shard == catalog.get_shard("s1") == catalog.list_shards()[0]
    assert (shard.name, shard.tier, shard.state, shard.weight) == (
        "s1",
        Tier.SHARED,
        ShardState.ACTIVE,
        3,
    )
    assert shard.admin_url is None and shard.operations_url == shard.url
    stored = catalog.get_shard("s1").created_at
    assert stored is not None and stored.tzinfo is not None and stored >= before
    assert catalog.map_version() == 2
    # prepared: tenantry's per-shard tables exist on the shard, at the shipped head
    with operator_transaction(shard) as conn:
        assert "tenantry_residency" in sa.inspect(conn).get_table_names()
        assert SHARD.current(conn) == SHARD.head


def test_postgres_urls_are_pinned_to_psycopg(catalog: Catalog) -> None:
    shard = catalog.add_shard("s1", "postgres://app@127.0.0.1:1/app", prepare=False)
    assert shard.url == "postgresql+psycopg://app@127.0.0.1:1/app"
    assert catalog.get_shard("s1").url == shard.url


def test_prepare_uses_the_operations_role(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    # Two distinct databases stand in for the two roles, to see which one is used.
    routing, operations = new_shard_url(), new_shard_url()
    shard = catalog.add_shard("s1", routing, admin_url=operations)
    assert shard.admin_url is not None and shard.operations_url == shard.admin_url
    assert catalog.get_shard("s1").admin_url == shard.admin_url
    with operator_transaction(shard) as conn:
        assert "tenantry_residency" in sa.inspect(conn).get_table_names()
    engine = sa.create_engine(shard.url)
    try:
        assert "tenantry_residency" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_duplicate_shard_is_refused(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    before = state_of(catalog)
    with pytest.raises(ShardExists, match="exists already") as info:
        catalog.add_shard("s1", new_shard_url())
    assert info.value.shard == "s1"
    assert state_of(catalog) == before


INVALID_SHARD_NAMES = ["", "S1", "s 1", "s'1", "-s1", "x" * 64, "s;1", "s1\n"]

UNUSABLE_URLS = [
    ("not a url", "not a database URL"),
    ("mysql://u@h/db", "not supported"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("postgresql://u@127.0.0.1:5432", "names no database"),
]


def test_invalid_shard_name_is_refused(catalog: Catalog) -> None:
    for name in INVALID_SHARD_NAMES:
        with pytest.raises(InvalidShardName) as info:
            catalog.add_shard(name, "sqlite:///x.db", prepare=False)
        assert info.value.shard == name
    assert catalog.map_version() == 1 and catalog.list_shards() == []


def test_unusable_shard_url_is_refused(catalog: Catalog) -> None:
    for url, reason in UNUSABLE_URLS:
        with pytest.raises(InvalidShardUrl, match=reason) as info:
            catalog.add_shard("s1", url)
        assert info.value.shard == "s1"
        with pytest.raises(InvalidShardUrl, match=reason):
            catalog.add_shard("s2", "sqlite:///fine.db", admin_url=url, prepare=False)
    assert catalog.map_version() == 1 and catalog.list_shards() == []


def test_unreachable_shard_is_not_registered(catalog: Catalog) -> None:
    with pytest.raises(ShardUnavailable, match="cannot reach shard 's1'") as info:
        catalog.add_shard("s1", UNREACHABLE_PG)
    assert info.value.shard == "s1"
    assert catalog.map_version() == 1 and catalog.list_shards() == []


def test_invalid_weight_is_refused(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s2", new_shard_url())
    before = state_of(catalog)
    for weight in (-1, 10_001, True, 1.5, "3"):
        with pytest.raises(PlacementError, match="invalid weight") as info:
            catalog.add_shard("s1", new_shard_url(), weight=weight)  # type: ignore[arg-type]
        assert info.value.shard == "s1"
        with pytest.raises(PlacementError, match="invalid weight"):
            catalog.set_shard_weight("s2", weight)  # type: ignore[arg-type]
    assert state_of(catalog) == before


def test_list_shards_filters_by_tier_and_state(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("b-shared", new_shard_url())
    catalog.add_shard("a-shared", new_shard_url())
    catalog.add_shard("c-dedicated", new_shard_url(), tier="dedicated")
    catalog.set_shard_state("b-shared", "draining")
    assert [s.name for s in catalog.list_shards()] == ["a-shared", "b-shared", "c-dedicated"]
    assert [s.name for s in catalog.list_shards(tier=Tier.SHARED)] == ["a-shared", "b-shared"]
    assert [s.name for s in catalog.list_shards(tier="dedicated")] == ["c-dedicated"]
    assert [s.name for s in catalog.list_shards(state="draining")] == ["b-shared"]
    assert [s.name for s in catalog.list_shards(tier="shared", state=ShardState.ACTIVE)] == [
        "a-shared"
    ]


def test_set_shard_state_and_retire_rule(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    version = catalog.map_version()

    drained = catalog.set_shard_state("s1", ShardState.DRAINING)
    assert drained.state is ShardState.DRAINING == catalog.get_shard("s1").state
    assert catalog.map_version() == version + 1

    before = state_of(catalog)
    with pytest.raises(PlacementError, match="still holds 1 tenant") as info:
        catalog.set_shard_state("s1", "retired")
    assert info.value.shard == "s1"
    assert state_of(catalog) == before

    catalog.remove_tenant("acme")
    assert catalog.set_shard_state("s1", "retired").state is ShardState.RETIRED
    assert catalog.set_shard_state("s1", "active").state is ShardState.ACTIVE
    assert catalog.map_version() == version + 4
    with pytest.raises(UnknownShard):
        catalog.set_shard_state("nope", "draining")


def test_set_shard_weight(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    assert catalog.set_shard_weight("s1", 7).weight == 7 == catalog.get_shard("s1").weight
    assert catalog.map_version() == 3
    with pytest.raises(UnknownShard) as info:
        catalog.set_shard_weight("nope", 2)
    assert info.value.shard == "nope"
    assert catalog.map_version() == 3


def test_update_shard_changes_state_and_weight_together_or_not_at_all(
    catalog: Catalog, new_shard_url: ShardUrl
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    version = catalog.map_version()
    with pytest.raises(PlacementError, match="still holds 1 tenant"):
        catalog.update_shard("s1", state="retired", weight=5)
    shard = catalog.get_shard("s1")
    assert (shard.state.value, shard.weight) == ("active", 1)  # the weight did not change
    assert catalog.map_version() == version
    both = catalog.update_shard("s1", state="draining", weight=5)
    assert (both.state.value, both.weight) == ("draining", 5)
    assert catalog.map_version() == version + 1  # one change, one version


# -- tenants --------------------------------------------------------------------------


def test_add_shared_tenant_follows_the_ring_and_writes_residency(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    proposed = catalog.propose_shard("acme")
    assert catalog.map_version() == 3  # proposing writes nothing

    tenant = catalog.add_tenant("acme")
    assert tenant == Tenant("acme", proposed, Tier.SHARED, False, TenantState.ACTIVE)
    assert catalog.get_tenant("acme") == tenant
    assert catalog.map_version() == 4
    assert tenant.created_at is not None and tenant.created_at.tzinfo is not None
    stored = catalog.get_tenant("acme").created_at
    assert stored is not None and abs(stored - tenant.created_at) < timedelta(seconds=1)

    home = catalog.get_shard(proposed)
    other = catalog.get_shard(({"s1", "s2"} - {proposed}).pop())
    # the residency row on the home shard names the version of the change
    assert read_residency(home) == {"acme": ("active", 4)}
    assert read_residency(other) == {}


def test_add_tenant_on_a_named_shard_and_pinned(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    for tenant_id in ("t1", "t2", "t3"):
        catalog.add_tenant(tenant_id, shard="s2", pinned=tenant_id == "t2")
    assert [t.id for t in catalog.list_tenants(shard="s2")] == ["t1", "t2", "t3"]
    assert catalog.list_tenants(shard="s1") == []
    assert [t.pinned for t in catalog.list_tenants()] == [False, True, False]
    assert set(read_residency(catalog.get_shard("s2"))) == {"t1", "t2", "t3"}


def test_duplicate_tenant_is_refused_and_writes_nothing(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    before = state_of(catalog)
    for shard in (None, "s1", "s2"):
        with pytest.raises(TenantExists, match="exists already") as info:
            catalog.add_tenant("acme", shard=shard)
        assert (info.value.tenant_id, info.value.shard) == ("acme", "s1")
    assert state_of(catalog) == before
    assert read_residency(catalog.get_shard("s1")) == {"acme": ("active", 4)}
    assert read_residency(catalog.get_shard("s2")) == {}


def test_invalid_tenant_id_is_refused_everywhere(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    before = state_of(catalog)
    calls: list[tuple[Callable[..., object], dict[str, object]]] = [
        (catalog.add_tenant, {}),
        (catalog.add_tenant, {"shard": "s1"}),
        (catalog.get_tenant, {}),
        (catalog.remove_tenant, {}),
        (catalog.set_pinned, {"pinned": True}),
        (catalog.propose_shard, {}),
    ]
    for tenant_id in INVALID_IDS:
        for call, kwargs in calls:
            with pytest.raises(InvalidTenantId, match="invalid tenant id") as info:
                call(tenant_id, **kwargs)
            assert info.value.tenant_id == tenant_id
            assert "\n" not in str(info.value)
    assert state_of(catalog) == before


def test_valid_tenant_id_edges(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    for tenant_id in ("a", "0", "a" * 63, "9-to_5", "acme--eu_1"):
        assert catalog.add_tenant(tenant_id).id == tenant_id
    assert len(catalog.list_tenants()) == 5


def test_unknown_names_raise_with_context(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    before = state_of(catalog)
    with pytest.raises(UnknownShard, match="tenantry shard list") as shard_info:
        catalog.add_tenant("acme", shard="nope")
    assert shard_info.value.shard == "nope"
    with pytest.raises(UnknownShard):
        catalog.get_shard("nope")
    with pytest.raises(UnknownShard):
        catalog.list_tenants(shard="nope")
    for call in (
        lambda: catalog.get_tenant("ghost"),
        lambda: catalog.remove_tenant("ghost"),
        lambda: catalog.set_pinned("ghost", True),
        lambda: catalog.set_placement("ghost", "s1"),
    ):
        with pytest.raises(UnknownTenant, match="unknown tenant 'ghost'") as info:
            call()
        assert info.value.tenant_id == "ghost"
    assert isinstance(shard_info.value, LookupError)
    assert state_of(catalog) == before


def test_dedicated_tier_rules(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("d1", new_shard_url(), tier=Tier.DEDICATED)
    catalog.add_shard("d2", new_shard_url(), tier="dedicated")
    reg = catalog.add_tenant("regulated", tier=Tier.DEDICATED, shard="d1")
    assert (reg.tier, reg.shard) == (Tier.DEDICATED, "d1")
    before = state_of(catalog)

    refusals: list[tuple[type[PlacementError], Callable[[], object], str | None]] = [
        # dedicated tenant on a shared shard
        (TierMismatch, lambda: catalog.add_tenant("x", tier="dedicated", shard="s1"), "s1"),
        # shared tenant on a dedicated shard
        (TierMismatch, lambda: catalog.add_tenant("x", shard="d2"), "d2"),
        # a second tenant on a dedicated shard
        (ShardOccupied, lambda: catalog.add_tenant("x", tier="dedicated", shard="d1"), "d1"),
        # a dedicated tenant needs a shard of its own
        (PlacementError, lambda: catalog.add_tenant("x", tier="dedicated"), None),
    ]
    for error, call, shard in refusals:
        with pytest.raises(error) as info:
            call()
        assert (info.value.tenant_id, info.value.shard) == ("x", shard)
    assert state_of(catalog) == before
    assert read_residency(catalog.get_shard("d1")) == {"regulated": ("active", 5)}
    for name in ("s1", "d2"):
        assert read_residency(catalog.get_shard(name)) == {}

    # the ring never puts a shared tenant on a dedicated shard
    placed = {catalog.add_tenant(f"t{i}").shard for i in range(20)}
    assert placed == {"s1"}


def test_no_shared_shard_to_place_on(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    with pytest.raises(NoSharedShard, match="tenantry shard add") as info:
        catalog.add_tenant("acme")
    assert info.value.tenant_id == "acme"
    catalog.add_shard("d1", new_shard_url(), tier="dedicated")
    catalog.add_shard("s1", new_shard_url(), weight=0)
    with pytest.raises(NoSharedShard):
        catalog.add_tenant("acme")
    assert catalog.list_tenants() == []


def test_draining_shard_takes_no_new_tenants(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.set_shard_state("s2", "draining")
    assert {catalog.add_tenant(f"t{i}").shard for i in range(20)} == {"s1"}
    before = state_of(catalog)
    with pytest.raises(ShardNotActive, match="draining") as info:
        catalog.add_tenant("x", shard="s2")
    assert (info.value.tenant_id, info.value.shard) == ("x", "s2")
    assert state_of(catalog) == before


def test_unreachable_shard_refuses_the_tenant(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("gone", UNREACHABLE_PG, prepare=False)
    before = state_of(catalog)
    with pytest.raises(ShardUnavailable, match="cannot reach shard 'gone'") as info:
        catalog.add_tenant("acme", shard="gone")
    assert info.value.shard == "gone"
    assert state_of(catalog) == before


def test_remove_tenant_deletes_the_residency_row(
    catalog: Catalog, new_shard_url: ShardUrl, read_residency: Residency
) -> None:
    shard = catalog.add_shard("s1", new_shard_url())
    catalog.add_tenant("acme")
    catalog.add_tenant("globex")
    version = catalog.map_version()

    removed = catalog.remove_tenant("acme")
    assert (removed.id, removed.shard) == ("acme", "s1")
    assert catalog.map_version() == version + 1
    assert [t.id for t in catalog.list_tenants()] == ["globex"]
    assert set(read_residency(shard)) == {"globex"}
    with pytest.raises(UnknownTenant):
        catalog.get_tenant("acme")
    # the id is free again
    assert catalog.add_tenant("acme").shard == "s1"
    assert read_residency(shard)["acme"] == ("active", version + 2)


def test_set_pinned(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_tenant("acme")
    assert catalog.set_pinned("acme", True).pinned is True
    assert catalog.get_tenant("acme").pinned is True
    assert catalog.set_pinned("acme", False).pinned is False
    assert catalog.map_version() == 5


def test_set_placement_moves_the_directory_entry(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_shard("d1", new_shard_url(), tier="dedicated")
    catalog.add_shard("d2", new_shard_url(), tier="dedicated")
    catalog.add_tenant("acme", shard="s1")
    catalog.add_tenant("reg", tier="dedicated", shard="d2")

    tenant, version = catalog.set_placement("acme", "s2")
    assert (tenant.shard, tenant.tier) == ("s2", Tier.SHARED)
    assert version == catalog.map_version() == 8
    assert catalog.snapshot().shard_of("acme").name == "s2"

    # the tier follows the new shard (a promotion)
    tenant, _ = catalog.set_placement("acme", "d1")
    assert (tenant.shard, tenant.tier) == ("d1", Tier.DEDICATED)

    catalog.set_shard_state("s1", "draining")
    before = state_of(catalog)
    with pytest.raises(ShardOccupied):
        catalog.set_placement("acme", "d2")
    with pytest.raises(ShardNotActive):
        catalog.set_placement("acme", "s1")
    with pytest.raises(UnknownShard):
        catalog.set_placement("acme", "nope")
    assert state_of(catalog) == before

    # inside a caller's transaction: the mover's switch step
    with catalog.transaction() as (conn, bumped):
        tenant, version = catalog.set_placement("acme", "s2", conn=conn)
        assert version == bumped
    assert catalog.get_tenant("acme").shard == "s2" and catalog.map_version() == bumped


# -- map version and snapshot -------------------------------------------------------------


def test_every_change_bumps_the_version_once_and_refusals_never(
    catalog: Catalog, new_shard_url: ShardUrl
) -> None:
    changes: list[Callable[[], object]] = [
        lambda: catalog.add_shard("s1", new_shard_url()),
        lambda: catalog.add_shard("d1", new_shard_url(), tier="dedicated"),
        lambda: catalog.add_tenant("acme"),
        lambda: catalog.add_tenant("reg", tier="dedicated", shard="d1"),
        lambda: catalog.set_pinned("acme", True),
        lambda: catalog.set_shard_weight("s1", 2),
        lambda: catalog.set_shard_state("s1", "draining"),
        lambda: catalog.set_shard_state("s1", "active"),
        lambda: catalog.remove_tenant("acme"),
    ]
    refusals: list[Callable[[], object]] = [
        lambda: catalog.add_shard("s1", new_shard_url()),
        lambda: catalog.add_tenant("reg"),
        lambda: catalog.add_tenant("x", shard="d1"),
        lambda: catalog.remove_tenant("acme"),
        lambda: catalog.set_shard_state("s1", "retired"),  # holds "filler"
        lambda: catalog.set_shard_weight("s1", -1),
    ]
    start = catalog.map_version()
    for number, change in enumerate(changes, start=1):
        change()
        assert catalog.map_version() == start + number
    catalog.add_tenant("filler", shard="s1")
    version = catalog.map_version()
    for refusal in refusals:
        with pytest.raises((PlacementError, LookupError, TenantExists, ShardExists)):
            refusal()
        assert catalog.map_version() == version


def test_snapshot_is_immutable_and_complete(catalog: Catalog, new_shard_url: ShardUrl) -> None:
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("d1", new_shard_url(), tier="dedicated")
    catalog.add_tenant("acme")
    catalog.add_tenant("reg", tier="dedicated", shard="d1")
    snap = catalog.snapshot()

    assert snap.version == catalog.map_version() == 5
    assert set(snap.shards) == {"s1", "d1"} and set(snap.tenants) == {"acme", "reg"}
    assert snap.shards["s1"] == catalog.get_shard("s1")
    assert snap.tenant("reg") == catalog.get_tenant("reg")
    assert snap.shard_of("reg").name == "d1"
    assert [t.id for t in snap.tenants_sorted()] == ["acme", "reg"]
    assert [t.id for t in snap.tenants_on("s1")] == ["acme"]
    with pytest.raises(UnknownTenant):
        snap.tenant("ghost")
    with pytest.raises(UnknownShard):
        snap.shard("nope")
    with pytest.raises(TypeError):
        snap.tenants["x"] = snap.tenants["acme"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del snap.shards["s1"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.tenants["acme"].shard = "d1"  # type: ignore[misc]
    # later changes do not leak into a snapshot already taken
    catalog.add_tenant("late")
    assert "late" not in snap.tenants and snap.version == 5
    assert repr(snap) == "MapSnapshot(version=5, shards=2, tenants=2)"


def test_snapshots_are_consistent_while_a_writer_runs(
    catalog: Catalog, new_shard_url: ShardUrl
) -> None:
    catalog.add_shard("s1", new_shard_url())  # version 2
    done = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(20):
                catalog.add_tenant(f"t{i:02d}")
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    def check(snap: MapSnapshot) -> None:
        # one consistent read: the version counts exactly the tenants it shows
        assert len(snap.tenants) == snap.version - 2, snap
        assert all(t.shard in snap.shards for t in snap.tenants.values())
        seen.add(snap.version)

    seen: set[int] = set()
    check(catalog.snapshot())
    thread = threading.Thread(target=writer)
    thread.start()
    while True:
        finished = done.is_set()
        check(catalog.snapshot())
        if finished:
            break
    thread.join()
    assert not failures
    assert 2 in seen and 22 in seen and catalog.snapshot().version == 22


def test_postgresql_catalog_notifies_every_change(pg_url: str, tmp_path: Path) -> None:
    # PostgreSQL only: SQLite has no NOTIFY, routers poll it.
    dsn = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    with (
        Catalog(pg_url, settings=load_settings(catalog_url=pg_url)) as catalog,
        psycopg.connect(dsn, autocommit=True) as listener,
    ):
        catalog.init()
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        catalog.add_shard("s1", f"sqlite:///{tmp_path / 's1.db'}")
        catalog.add_tenant("acme")
        with pytest.raises(TenantExists):
            catalog.add_tenant("acme")  # refused: no notification
        payloads = [n.payload for n in listener.notifies(timeout=5.0, stop_after=2)]
        assert payloads == ["2", "3"]
        assert list(listener.notifies(timeout=0.2)) == []
    assert NOTIFY_CHANNEL == "tenantry_map"


def test_catalog_repr_hides_the_password(db_url: str) -> None:
    url = sa.make_url(db_url).set(password="S3cretPw").render_as_string(hide_password=False)
    with Catalog(url, settings=load_settings(catalog_url=url)) as cat:
        assert "S3cretPw" not in repr(cat)
        assert "S3cretPw" not in repr(cat.settings) and "S3cretPw" not in str(cat.settings)
        assert cat.settings.catalog_url == url  # the value itself is intact


def test_each_schema_names_the_head_of_its_scripts() -> None:
    # the head is declared (every command compares the catalog with it, and loading
    # Alembic's scripts to find it took a tenth of a second): a new revision updates it
    assert CATALOG.head == CATALOG.scripts_head()
    assert SHARD.head == SHARD.scripts_head()
