"""The residency table on each shard: which tenants live here, and in what state.

The catalog says where a tenant lives; the residency row on the shard lets the shard
itself refuse a router whose map is out of date (DESIGN.md, invariant 3).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.schema import residency

__all__ = ["Residency", "clear_residency", "commit_residency", "read_residency", "write_residency"]


class Residency(enum.StrEnum):
    """State of a tenant's residency row on one shard."""

    ACTIVE = "active"  # lives here; reads and writes
    FROZEN = "frozen"  # lives here, a move is copying it: read-only
    MOVED = "moved"  # lived here, moved away: routers must go elsewhere
    INCOMING = "incoming"  # a move is copying it here: not yet routable


def write_residency(conn: Connection, tenant_id: str, state: Residency, map_version: int) -> None:
    """Insert or update the tenant's residency row (in the caller's transaction)."""
    now = datetime.now(UTC)
    updated = conn.execute(
        residency.update()
        .where(residency.c.tenant_id == tenant_id)
        .values(state=state.value, map_version=map_version, updated_at=now)
    )
    if updated.rowcount == 0:
        conn.execute(
            residency.insert().values(
                tenant_id=tenant_id, state=state.value, map_version=map_version, updated_at=now
            )
        )


def commit_residency(
    bind: Engine | Connection, tenant_id: str, state: Residency, map_version: int
) -> None:
    """Write the tenant's residency row in a transaction of its own, and commit it.

    *bind* is a connection outside a transaction, or an engine (one connection of it
    is opened for writing, and closed).
    """
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            commit_residency(conn.execution_options(**WRITE), tenant_id, state, map_version)
        return
    with bind.begin():
        write_residency(bind, tenant_id, state, map_version)


def read_residency(conn: Connection, tenant_id: str) -> Residency | None:
    """The tenant's residency state on this shard, or None when it has no row."""
    value = conn.execute(
        sa.select(residency.c.state).where(residency.c.tenant_id == tenant_id)
    ).scalar_one_or_none()
    return None if value is None else Residency(value)


def clear_residency(conn: Connection, tenant_id: str) -> None:
    """Delete the tenant's residency row."""
    conn.execute(residency.delete().where(residency.c.tenant_id == tenant_id))
