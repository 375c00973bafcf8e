"""Bulk registration (``Catalog.add_tenants``): many tenants in batches, one map version
and one transaction per shard each, all or nothing per batch, the errors of
``add_tenant`` with the input's line number.

Runs on SQLite and PostgreSQL (catalog and shards of the same kind).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from tenantry import Catalog, Shard
from tenantry.errors import (
    PlacementError,
    ShardNotActive,
    ShardOccupied,
    ShardUnavailable,
    TenantExists,
    TenantryError,
    TierMismatch,
    UnknownShard,
)
from tenantry.shardmap.catalog import bulk
from tenantry.shardmap.catalog.bulk import BulkImportFailed, TenantRecord, read_records
from tenantry.shardmap.model import Tier

ShardUrl = Callable[[], str]
Residency = Callable[[Shard], dict[str, tuple[str, int]]]


@pytest.fixture
def fleet(catalog: Catalog, new_shard_url: ShardUrl) -> Catalog:
    """Shared s1, s2; dedicated d1 (holding ``reg``) and d2 (empty); ``acme`` on s1."""
    catalog.add_shard("s1", new_shard_url())
    catalog.add_shard("s2", new_shard_url())
    catalog.add_shard("d1", new_shard_url(), tier="dedicated")
    catalog.add_shard("d2", new_shard_url(), tier="dedicated")
    catalog.add_tenant("reg", tier="dedicated", shard="d1")
    catalog.add_tenant("acme", shard="s1")
    return catalog


def state(catalog: Catalog, read_residency: Residency) -> tuple[Any, ...]:
    snap = catalog.snapshot()
    rows = {name: read_residency(shard) for name, shard in snap.shards.items()}
    return snap.version, dict(snap.tenants), rows


def test_thousands_of_tenants_in_batches_are_routable_at_once(
    fleet: Catalog, read_residency: Residency
) -> None:
    before = fleet.map_version()
    records: list[TenantRecord | dict[str, Any]] = [
        TenantRecord(f"t{i:05d}", line=i + 1) for i in range(4_990)
    ]
    records += [{"id": f"on-s2-{i}", "shard": "s2", "pinned": i % 2 == 0} for i in range(9)]
    records.append({"id": "solo", "tier": "dedicated", "shard": "d2"})
    seen: list[int] = []
    summary = fleet.add_tenants(records, batch_size=1_000, on_batch=lambda p: seen.append(p.added))

    assert (
        summary.added == 5_000
        and summary.batches == 5
        and seen == [1000 * n for n in (1, 2, 3, 4, 5)]
    )
    assert (summary.first_version, summary.last_version) == (before + 1, before + 5)
    assert fleet.map_version() == before + 5  # one map version per batch
    snap = fleet.snapshot()
    assert len(snap.tenants) == 5_002
    assert snap.tenant("solo").shard == "d2" and snap.tenant("solo").tier is Tier.DEDICATED
    assert snap.tenant("on-s2-0").pinned and not snap.tenant("on-s2-1").pinned
    placed = {name: 0 for name in snap.shards}
    for tenant in snap.tenants.values():
        placed[tenant.shard] += 1
    assert placed["s1"] > 1_000 and placed["s2"] > 1_000  # the ring spread them
    assert sum(summary.per_shard.values()) == 5_000
    for name, shard in snap.shards.items():
        rows = read_residency(shard)
        living = {t.id for t in snap.tenants.values() if t.shard == name}
        assert set(rows) == living, name  # every tenant has its residency row, no other
        assert all(state == "active" for state, _version in rows.values())
    batch_of_solo = read_residency(snap.shard("d2"))["solo"][1]
    assert batch_of_solo == before + 5


def test_a_bad_line_leaves_its_batch_unwritten_and_says_where(
    fleet: Catalog, read_residency: Residency
) -> None:
    records = [{"id": f"t{i}"} for i in range(1, 26)]
    records[16] = {"id": "Not-Valid!"}  # line 17, in the second batch of ten
    with pytest.raises(BulkImportFailed) as caught:
        fleet.add_tenants(records, batch_size=10)
    error = caught.value
    assert error.line == 17 and error.added == 10
    message = str(error)
    assert "\n" not in message and message.startswith("line 17: invalid tenant id 'Not-Valid!'")
    assert message.endswith(
        "; nothing from line 11 on was added, the 10 tenant(s) before it were added: "
        "fix the line and import again from line 11"
    )
    tenants = fleet.snapshot().tenants
    assert {f"t{i}" for i in range(1, 11)} <= set(tenants)
    assert not {f"t{i}" for i in range(11, 26)} & set(tenants)
    for shard in fleet.snapshot().shards.values():
        assert not {f"t{i}" for i in range(11, 26)} & set(read_residency(shard))


def test_duplicates_in_the_input_and_in_the_map_are_refused(
    fleet: Catalog, read_residency: Residency
) -> None:
    before = state(fleet, read_residency)
    with pytest.raises(
        BulkImportFailed, match=r"^line 4: tenant 'b' is given twice \(first on line 2\)"
    ):
        fleet.add_tenants([{"id": t} for t in ("a", "b", "c", "b")])
    with pytest.raises(BulkImportFailed) as caught:
        fleet.add_tenants([{"id": t} for t in ("a", "b", "acme", "c")])
    assert caught.value.line == 3 and isinstance(caught.value.cause, TenantExists)
    assert str(caught.value).startswith("line 3: tenant 'acme' exists already (on shard 's1')")
    assert state(fleet, read_residency) == before  # nothing of either batch


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"id": "x", "shard": "nowhere"}, UnknownShard),
        ({"id": "x", "tier": "dedicated"}, PlacementError),
        ({"id": "x", "shard": "d2"}, TierMismatch),
        ({"id": "x", "tier": "dedicated", "shard": "s1"}, TierMismatch),
        ({"id": "x", "tier": "dedicated", "shard": "d1"}, ShardOccupied),
        ({"id": "x", "shard": "s2", "__drain": True}, ShardNotActive),
    ],
)
def test_the_same_refusals_as_tenant_add(
    fleet: Catalog, read_residency: Residency, record: dict[str, Any], expected: type[Exception]
) -> None:
    record = dict(record)  # the parameters are shared by the sqlite and postgresql runs
    if record.pop("__drain", False):
        fleet.set_shard_state("s2", "draining")
    before = state(fleet, read_residency)
    with pytest.raises(expected) as one:
        fleet.add_tenant(record["id"], tier=record.get("tier", "shared"), shard=record.get("shard"))
    with pytest.raises(BulkImportFailed) as bulk:
        fleet.add_tenants([{"id": "fine"}, record])
    assert isinstance(bulk.value.cause, expected) and bulk.value.line == 2
    if expected is PlacementError:  # says the shard column, not --shard
        assert str(bulk.value).startswith("line 2: a dedicated tenant needs its own shard")
    else:
        assert str(bulk.value).startswith(f"line 2: {one.value}")
    assert state(fleet, read_residency) == before


def test_a_shard_failing_mid_batch_takes_back_the_rows_written(
    fleet: Catalog, read_residency: Residency, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = bulk._write_residency
    calls: list[list[str]] = []

    def second_shard_down(engine: Any, ids: list[str], version: int) -> None:
        calls.append(ids)
        if len(calls) == 2:
            raise ShardUnavailable("cannot reach shard 's2' (test)", shard="s2")
        real(engine, ids, version)

    monkeypatch.setattr(bulk, "_write_residency", second_shard_down)
    before = state(fleet, read_residency)
    with pytest.raises(BulkImportFailed) as caught:
        fleet.add_tenants([{"id": f"t{i}"} for i in range(1, 51)])
    assert len(calls) == 2 and calls[0]  # one shard had its rows written, then taken back
    assert isinstance(caught.value.cause, ShardUnavailable) and caught.value.added == 0
    assert str(caught.value).startswith(
        "cannot reach shard 's2' (test); nothing from line 1 on was added, nothing was added"
    )
    assert state(fleet, read_residency) == before


def test_two_dedicated_tenants_for_one_shard_in_one_batch(fleet: Catalog) -> None:
    records = [
        {"id": "p", "tier": "dedicated", "shard": "d2"},
        {"id": "q", "tier": "dedicated", "shard": "d2"},
    ]
    with pytest.raises(
        BulkImportFailed, match=r"^line 2: dedicated shard 'd2' already holds tenant 'p'"
    ):
        fleet.add_tenants(records)
    assert "p" not in fleet.snapshot().tenants


def test_an_empty_input_adds_nothing(fleet: Catalog) -> None:
    version = fleet.map_version()
    summary = fleet.add_tenants([])
    assert summary.added == 0 and summary.batches == 0 and fleet.map_version() == version


# -- reading CSV and JSON Lines -------------------------------------------------------


def records_of(text: str, fmt: str | None = None) -> list[TenantRecord]:
    return list(read_records(io.StringIO(text), fmt))


def test_csv_and_jsonl_read_alike() -> None:
    csv_text = "id,shard,tier,pinned\nacme,,,\n\nglobex,s2,shared,yes\nreg,d1,dedicated,false\n"
    jsonl_text = (
        '{"id": "acme"}\n\n{"id": "globex", "shard": "s2", "pinned": true}\n'
        '{"id": "reg", "shard": "d1", "tier": "dedicated", "pinned": false}\n'
    )
    want = [
        ("acme", None, Tier.SHARED, False),
        ("globex", "s2", Tier.SHARED, True),
        ("reg", "d1", Tier.DEDICATED, False),
    ]
    for text, fmt in (
        (csv_text, "csv"),
        (csv_text, None),
        (jsonl_text, "jsonl"),
        (jsonl_text, None),
    ):
        got = records_of(text, fmt)
        assert [(r.id, r.shard, r.tier, r.pinned) for r in got] == want, fmt
    assert [r.line for r in records_of(csv_text)] == [2, 4, 5]
    assert [r.line for r in records_of(jsonl_text)] == [1, 3, 4]
    assert [r.id for r in records_of("id\nacme\nglobex\n")] == ["acme", "globex"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("acme,s1\n", "line 1: the CSV header must name its columns among id, shard, tier, pinned"),
        ("id,colour\nacme,red\n", "line 1: the CSV header must name"),
        ("id,shard\nacme\n", "line 2: 1 value(s) where the header names 2"),
        ("id,pinned\nacme,perhaps\n", "line 2: pinned must be true or false, not 'perhaps'"),
        ("id,tier\nacme,gold\n", "line 2: unknown tier 'gold': use shared or dedicated"),
        ("id,shard\n,s1\n", "line 2: no tenant id"),
        ('{"id": "acme"}\n{"id": "b",\n', "line 2: not valid JSON"),
        ('{"id": "acme"}\n["b"]\n', "line 2: not a JSON object"),
        ('{"id": "acme", "owner": "x"}\n', "line 1: unknown field(s) owner"),
        ('{"id": 7}\n', "line 1: the tenant id must be a string, not 7"),
    ],
)
def test_malformed_lines_are_named(text: str, expected: str) -> None:
    with pytest.raises(BulkImportFailed) as caught:
        records_of(text)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    assert isinstance(caught.value, TenantryError)
