"""The residency fence: the first statement of every routed transaction.

One statement sets the tenant for row-level security and reads the tenant's
residency row on this shard, and — when the tenant is frozen by a move — makes the
transaction read-only. No row lock: the mover waits out older transactions instead
(DESIGN.md, "hot-path facts"). psycopg prepares it on the server.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from tenantry.errors import StaleRoute, TenantFrozen
from tenantry.shardmap.residency import Residency

__all__ = [
    "FROZEN_KEY",
    "PG_FENCE",
    "SQLITE_FENCE",
    "TENANT_KEY",
    "frozen_error",
    "reset_connection",
    "run_fence",
]

#: Keys in ``Connection.info`` (the DBAPI connection's): the tenant of the current
#: routed transaction, and whether it is frozen. Cleared when the connection is
#: returned to the pool.
TENANT_KEY = "tenantry.tenant_id"
FROZEN_KEY = "tenantry.frozen"
_QUERY_ONLY_KEY = "tenantry.sqlite_query_only"

# One index lookup, no row lock; no row at all means "not resident here".
PG_FENCE = (
    "SELECT set_config('tenantry.tenant_id', %(t)s, true), r.state,"
    " CASE WHEN r.state = 'frozen'"
    " THEN set_config('transaction_read_only', 'on', true) END"
    " FROM tenantry_residency r WHERE r.tenant_id = %(t)s"
)
SQLITE_FENCE = "SELECT state FROM tenantry_residency WHERE tenant_id = ?"


def run_fence(conn: Connection, tenant_id: str, shard: str) -> Residency:
    """Run the fence for *tenant_id* as the transaction's first statement.

    Return the residency state (``active`` or ``frozen``); raise StaleRoute when the
    tenant does not live on this shard (no row, ``moved`` or ``incoming``).
    """
    info = conn.info
    if conn.dialect.is_async:
        value = _fence_generic(conn, tenant_id)
    elif conn.dialect.name == "postgresql":
        # Straight to psycopg: none of SQLAlchemy's per-statement work. Not prepare=True:
        # psycopg drops its prepared statements (DEALLOCATE ALL, one more round trip) at
        # every ROLLBACK, which is how most read-only sessions end.
        dbapi: Any = conn.connection.dbapi_connection
        row = dbapi.execute(PG_FENCE, {"t": tenant_id}).fetchone()
        value = row[1] if row is not None else None
    else:
        value = _fence_generic(conn, tenant_id)
    state = Residency(value) if value is not None else None
    if state is None or state in (Residency.MOVED, Residency.INCOMING):
        info.pop(TENANT_KEY, None)
        raise StaleRoute(
            f"tenant {tenant_id!r} does not live on shard {shard!r} "
            f"(residency: {state.value if state else 'none'}); the map was out of date",
            tenant_id=tenant_id,
            shard=shard,
        )
    info[TENANT_KEY] = tenant_id
    info[FROZEN_KEY] = state is Residency.FROZEN
    return state


def _fence_generic(conn: Connection, tenant_id: str) -> str | None:
    """The fence through SQLAlchemy (async drivers, SQLite)."""
    info = conn.info
    if conn.dialect.name == "postgresql":
        found = conn.exec_driver_sql(PG_FENCE, {"t": tenant_id}).first()
        state: str | None = found[1] if found is not None else None
        return state
    found = conn.exec_driver_sql(SQLITE_FENCE, (tenant_id,)).first()
    value = found[0] if found else None
    frozen = value == Residency.FROZEN.value
    if frozen != bool(info.get(_QUERY_ONLY_KEY)):
        # SQLite has no read-only transactions; query_only refuses every write.
        conn.exec_driver_sql(f"PRAGMA query_only = {int(frozen)}")
        info[_QUERY_ONLY_KEY] = frozen
    return value


def reset_connection(dbapi_connection: Any, info: dict[str, Any]) -> None:
    """Forget the routed tenant when a connection goes back to the pool."""
    info.pop(TENANT_KEY, None)
    info.pop(FROZEN_KEY, None)
    if info.pop(_QUERY_ONLY_KEY, False):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA query_only = 0")
        finally:
            cursor.close()


def frozen_error(tenant_id: str, shard: str | None, retry_after: float = 1.0) -> TenantFrozen:
    """The error a write to a frozen tenant raises."""
    return TenantFrozen(
        f"tenant {tenant_id!r} is frozen while a move copies it: reads work, retry the "
        f"write in about {retry_after:g}s",
        tenant_id=tenant_id,
        shard=shard,
        retry_after=retry_after,
    )
