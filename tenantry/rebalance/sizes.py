"""Tenant sizes: rows and bytes over the tenant tables, measured on the shards and kept
in the catalog with the time they were measured. (A move updates the stored size
itself: :func:`tenantry.shardmap.sizes.follow_move`.)"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.moves.tables import TenantTable, quoted_name, tenant_tables
from tenantry.rebalance.planner import TenantSize
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.operations import operator_engine
from tenantry.shardmap.schema import tenant_sizes

__all__ = ["measure_shard", "measure_sizes", "stale_sizes", "stored_sizes"]


def _measure_table(conn: Connection, table: TenantTable, column: str) -> list[tuple[str, int, int]]:
    q = conn.dialect.identifier_preparer.quote
    name, col = quoted_name(conn, table), q(column)
    if conn.dialect.name == "postgresql":
        # pg_column_size of the whole row: what the tenant's rows take on disk, roughly.
        query = f"SELECT {col}, count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {name} t GROUP BY {col}"  # noqa: E501
    else:
        cols = (
            " + ".join(f"coalesce(length(CAST({q(c)} AS BLOB)), 0)" for c in table.columns) or "0"
        )
        query = f"SELECT {col}, count(*), coalesce(sum({cols}), 0) FROM {name} GROUP BY {col}"
    return [(str(r[0]), int(r[1]), int(r[2])) for r in conn.exec_driver_sql(query)]


def measure_shard(
    shard: Shard,
    *,
    column: str = "tenant_id",
    connect_timeout: float = 5.0,
    schemas: Sequence[str] = (),
) -> dict[str, TenantSize]:
    """Every tenant's size on one shard, counted with one aggregate query per table."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with (
        operator_engine(shard, connect_timeout=connect_timeout) as engine,
        engine.connect() as conn,
    ):
        for table in tenant_tables(conn, column=column, schemas=schemas):
            for tenant, rows, size in _measure_table(conn, table, column):
                totals[tenant][0] += rows
                totals[tenant][1] += size
    return {t: TenantSize(rows=r, bytes=b) for t, (r, b) in totals.items()}


def measure_sizes(
    catalog: Catalog,
    *,
    shards: Sequence[str] | None = None,
    tier: Tier | None = Tier.SHARED,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> dict[str, TenantSize]:
    """Measure the tenants of the shared shards (or the named ones) and store the sizes.

    *on_shard* is called with (shard, shards measured, shards to measure) as each shard
    is done (the CLI's progress)."""
    snapshot = catalog.snapshot()
    chosen = [
        s
        for s in snapshot.shards.values()
        if (shards is None or s.name in shards) and (tier is None or s.tier is tier or shards)
    ]
    found: dict[str, TenantSize] = {}
    now = datetime.now(UTC)
    rows = []
    for done, shard in enumerate(chosen, 1):
        measured = measure_shard(
            shard,
            column=catalog.settings.tenant_column,
            connect_timeout=catalog.settings.connect_timeout,
            schemas=catalog.settings.move_schemas,
        )
        for tenant in snapshot.tenants_on(shard.name):
            size = measured.get(tenant.id, TenantSize())
            found[tenant.id] = size
            rows.append(
                {
                    "tenant_id": tenant.id,
                    "shard": shard.name,
                    "rows": size.rows,
                    "bytes": size.bytes,
                    "measured_at": now,
                }
            )
        if on_shard is not None:
            on_shard(shard.name, done, len(chosen))
    with catalog.journal_transaction() as conn:
        if rows:
            conn.execute(
                tenant_sizes.delete().where(
                    tenant_sizes.c.tenant_id.in_([r["tenant_id"] for r in rows])
                )
            )
            conn.execute(tenant_sizes.insert(), rows)
    return found


def stored_sizes(catalog: Catalog) -> dict[str, tuple[TenantSize, str, datetime | None]]:
    """Sizes kept in the catalog: tenant -> (size, shard measured on, when)."""
    with catalog.read_transaction() as conn:
        result = conn.execute(sa.select(tenant_sizes)).all()
    found = {}
    for row in result:
        when = row.measured_at
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        found[row.tenant_id] = (TenantSize(int(row.rows), int(row.bytes)), row.shard, when)
    return found


def stale_sizes(catalog: Catalog, *, max_age: float | None = None) -> list[str]:
    """Why the stored sizes of the shared pool may mislead a plan (empty: they do not):
    measured longer than *max_age* seconds ago (default: the ``sizes_max_age``
    setting), tenants living elsewhere than where they were measured (moved by a
    tenantry that did not update sizes, or by hand), tenants never measured."""
    limit = catalog.settings.sizes_max_age if max_age is None else max_age
    snapshot = catalog.snapshot()
    shared = {n for n, s in snapshot.shards.items() if s.tier is Tier.SHARED}
    stored = stored_sizes(catalog)
    notes = []
    now = datetime.now(UTC)
    times = [when for _size, _shard, when in stored.values() if when is not None]
    if times and (now - min(times)).total_seconds() > limit:
        hours = (now - min(times)).total_seconds() / 3600
        notes.append(f"tenant sizes were measured {hours:.1f} h ago")
    tenants = [t for t in snapshot.tenants.values() if t.shard in shared]
    elsewhere = sorted(t.id for t in tenants if t.id in stored and stored[t.id][1] != t.shard)
    missing = sorted(t.id for t in tenants if t.id not in stored)
    if elsewhere:
        notes.append(f"{len(elsewhere)} tenant(s) moved since measured ({_some(elsewhere)})")
    if missing and stored:
        notes.append(f"{len(missing)} tenant(s) never measured ({_some(missing)})")
    return notes


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
