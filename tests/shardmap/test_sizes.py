"""tenantry.shardmap.sizes: a moved tenant's stored size follows it to its new shard."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from tenantry import Catalog
from tenantry.shardmap.schema import tenant_sizes
from tenantry.shardmap.sizes import follow_move


def _store(catalog: Catalog, tenant_id: str, shard: str, rows: int, size: int) -> None:
    with catalog.journal_transaction() as conn:
        conn.execute(
            tenant_sizes.insert().values(
                tenant_id=tenant_id,
                shard=shard,
                rows=rows,
                bytes=size,
                measured_at=datetime.now(UTC),
            )
        )


def _stored(catalog: Catalog) -> dict[str, tuple[str, int, int]]:
    with catalog.read_transaction() as conn:
        rows = conn.execute(sa.select(tenant_sizes)).all()
    return {r.tenant_id: (r.shard, int(r.rows), int(r.bytes)) for r in rows}


def test_follow_move_names_the_new_shard_and_scales_bytes(catalog: Catalog) -> None:
    _store(catalog, "acme", "s1", rows=100, size=5000)
    _store(catalog, "zeta", "s1", rows=0, size=0)
    follow_move(catalog, "acme", "s2", rows=40)
    follow_move(catalog, "zeta", "s3", rows=7)
    assert _stored(catalog) == {"acme": ("s2", 40, 2000), "zeta": ("s3", 7, 0)}


def test_follow_move_without_rows_keeps_the_size(catalog: Catalog) -> None:
    _store(catalog, "acme", "s1", rows=100, size=5000)
    follow_move(catalog, "acme", "s2")
    assert _stored(catalog) == {"acme": ("s2", 100, 5000)}


def test_follow_move_stores_nothing_for_a_tenant_never_measured(catalog: Catalog) -> None:
    follow_move(catalog, "acme", "s2", rows=10)
    assert _stored(catalog) == {}
