"""The listings at 100,000 tenants: streamed in batches with bounded memory, on SQLite
and PostgreSQL catalogs (the catalog filled by bulk SQL, not tenant by tenant)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from tenantry import Catalog, load_settings
from tenantry.shardmap.catalog.listing import DEFAULT_BATCH

if TYPE_CHECKING:
    from tests.cli.conftest import Run

TENANTS = 100_000
SHARDS = 10


def tenant_id(i: int) -> str:
    return f"t{i:06d}"


#: One INSERT ... SELECT of generated rows: 100,000 tenants in well under a second.
BULK_INSERT = {
    "postgresql": """
        INSERT INTO tenantry_tenants (id, shard, tier, pinned, state, created_at)
        SELECT 't' || lpad(i::text, 6, '0'), 's' || (i % :shards), 'shared',
               i % 1000 = 0, 'active', :now
        FROM generate_series(0, :count - 1) AS i
    """,
    "sqlite": """
        INSERT INTO tenantry_tenants (id, shard, tier, pinned, state, created_at)
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :count - 1)
        SELECT printf('t%06d', i), 's' || (i % :shards), 'shared',
               i % 1000 = 0, 'active', :now
        FROM n
    """,
}


def bulk_catalog(url: str, directory: Path, count: int = TENANTS) -> Catalog:
    """A catalog of *count* tenants on shared shards s0..s9 (tenant i on shard i % 10,
    every 1,000th pinned), written by one bulk insert."""
    catalog = Catalog(url, settings=load_settings(catalog_url=url))
    catalog.init()
    for n in range(SHARDS):
        catalog.add_shard(f"s{n}", f"sqlite:///{directory / f's{n}.db'}", prepare=False)
    insert = sa.text(BULK_INSERT[catalog.dialect]).bindparams(
        sa.bindparam("now", type_=sa.DateTime(timezone=True))
    )
    with catalog.engine.begin() as conn:
        conn.execute(insert, {"count": count, "shards": SHARDS, "now": datetime.now(UTC)})
    return catalog


@pytest.fixture
def big(db_url: str, tmp_path: Path) -> Iterator[Catalog]:
    with bulk_catalog(db_url, tmp_path) as catalog:
        yield catalog


class TenantQueries:
    """Counts the statements that read tenants, on every engine (the command's own)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM tenantry_tenants" in statement and "ORDER BY" in statement:
            self.count += 1


@pytest.fixture
def tenant_queries() -> Iterator[TenantQueries]:
    counter = TenantQueries()
    sa.event.listen(sa.Engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", counter)


def test_a_100k_listing_streams_in_batches_with_bounded_memory(
    big: Catalog, make_run: type[Run], tenant_queries: TenantQueries
) -> None:
    run = make_run(big.url)
    tracemalloc.start()
    try:
        out = run("tenant", "list")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    lines = out.splitlines()
    assert len(lines) == TENANTS
    assert lines[0] == "t000000\ts0\tshared\tyes\tactive"
    assert lines[-1] == f"{tenant_id(TENANTS - 1)}\ts9\tshared\tno\tactive"
    # read a batch at a time (the last one finds nothing more), never the whole map
    assert tenant_queries.count == TENANTS // DEFAULT_BATCH + 1
    # the captured output itself is ~3 MiB; the whole map as objects is far more
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    del out, lines

    # one shard's tenants, a page deep in the list, JSON that parses
    on_s3 = run("tenant", "list", "--shard", "s3", "--jsonl").splitlines()
    assert len(on_s3) == TENANTS // SHARDS
    assert json.loads(on_s3[-1])["id"] == tenant_id(TENANTS - 7)
    page = run.json("tenant", "list", "--after", "t050000", "--limit", "3")
    assert [t["id"] for t in page] == ["t050001", "t050002", "t050003"]
    assert len(run.json("tenant", "list", "--pinned")) == TENANTS // 1000

    # look-ups and counts answer for one tenant or shard
    assert run.json("route", "t099999")["shard"] == "s9"
    listed = run.json("shard", "list")
    assert [s["tenants"] for s in listed] == [TENANTS // SHARDS] * SHARDS
    shown = run.json("shard", "show", "s4", "--limit", "2")
    assert (shown["tenants"], shown["tenant_ids"]) == (TENANTS // SHARDS, ["t000004", "t000014"])
