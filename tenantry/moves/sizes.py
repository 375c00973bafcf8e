"""A moved tenant's stored size follows it: the one piece of size bookkeeping the mover
does itself. Measuring and reading sizes is rebalancing's (``tenantry.rebalance.sizes``);
this module stays on the moves floor so the mover never imports uphill."""

from __future__ import annotations

import sqlalchemy as sa

from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.schema import tenant_sizes

__all__ = ["follow_move"]


def follow_move(catalog: Catalog, tenant_id: str, shard: str, rows: int | None = None) -> None:
    """A move of *tenant_id* to *shard* has completed: its stored size names the new
    shard, with the *rows* the move copied (bytes scaled alike), so that sizes follow
    moves without a new measurement. Nothing is stored for a tenant never measured."""
    with catalog.journal_transaction() as conn:
        row = conn.execute(
            sa.select(tenant_sizes.c.rows, tenant_sizes.c.bytes).where(
                tenant_sizes.c.tenant_id == tenant_id
            )
        ).first()
        if row is None:
            return
        values: dict[str, object] = {"shard": shard}
        if rows is not None:
            values["rows"] = rows
            if row.rows:
                values["bytes"] = round(int(row.bytes) * rows / int(row.rows))
        conn.execute(
            tenant_sizes.update().where(tenant_sizes.c.tenant_id == tenant_id).values(**values)
        )
