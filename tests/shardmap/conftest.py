"""Fixtures of the shard-map suite: an initialised catalog and shard databases.

The catalog suite runs once on SQLite and once on PostgreSQL (``db_url``); its shards
are databases of the same kind as the catalog, so the PostgreSQL run also writes
residency rows on PostgreSQL shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantry import Catalog, MapSnapshot, Shard, load_settings
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import residency

ShardUrl = Callable[[], str]


@pytest.fixture
def catalog(db_url: str) -> Iterator[Catalog]:
    """An initialised, empty catalog at ``db_url``."""
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as cat:
        cat.init()
        yield cat


@pytest.fixture
def new_shard_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> ShardUrl:
    """Factory of fresh, empty shard databases of the catalog's kind."""
    numbers = count(1)
    if db_url.startswith("sqlite"):
        return lambda: f"sqlite:///{tmp_path / f'shard-{next(numbers)}.db'}"
    make = request.getfixturevalue("make_pg_database")
    # Alternate the two servers: a fleet spans hosts.
    return lambda: str(make(next(numbers) % 2))


def residency_rows(shard: Shard) -> dict[str, tuple[str, int]]:
    """Every residency row on *shard*: tenant id -> (state, map version)."""
    with operator_transaction(shard) as conn:
        rows = conn.execute(sa.select(residency)).all()
    return {row.tenant_id: (row.state, int(row.map_version)) for row in rows}


@pytest.fixture
def read_residency() -> Callable[[Shard], dict[str, tuple[str, int]]]:
    """``read_residency(shard)``: the residency rows on a shard."""
    return residency_rows


@pytest.fixture
def count_loads(monkeypatch: pytest.MonkeyPatch) -> Callable[[Catalog], list[int]]:
    """``loads = count_loads(catalog)``: each whole-map read (``catalog.snapshot()``)
    appends its version."""

    def install(catalog: Catalog) -> list[int]:
        loads: list[int] = []
        original = catalog.snapshot

        def snapshot() -> MapSnapshot:
            result = original()
            loads.append(result.version)
            return result

        monkeypatch.setattr(catalog, "snapshot", snapshot)
        return loads

    return install
