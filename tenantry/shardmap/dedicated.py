"""A dedicated database's tenant as a constant (shard revision s0007).

A dedicated database holds one tenant, so its row-level-security policies can compare
``tenant_id`` with that tenant as a constant: a routed connection there makes no stamp
and its fence verifies no signature, which halves the server's cost of a new
connection (DESIGN.md, "A dedicated database's tenant as a constant"). The database
itself keeps the constant true: it is installed only while tenantry has marked the
database dedicated (here, from the catalog's tier) and its residency rows name exactly
one tenant that has not moved away; a trigger on the residency table puts the stamp
back, in the same transaction, on any other change. Since shard revision s0008 the
tenant's residency state is installed in the fence the same way, so the fence reads
no table.

Everything here runs as the shard's operations role, in the caller's transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.shardmap.model import Tier

__all__ = ["constant_tenant", "mark_tier"]


def mark_tier(conn: Connection, tier: Tier, *, constant: bool = True) -> str | None:
    """Mark the shard database dedicated or not, as the catalog says (never, unless
    *constant*: the setting ``dedicated_constant``); return the tenant now installed
    as its constant (None: the stamp, or not PostgreSQL)."""
    if conn.dialect.name != "postgresql":
        return None
    value = conn.execute(
        sa.text("SELECT tenantry.mark_dedicated(:dedicated)"),
        {"dedicated": constant and Tier(tier) is Tier.DEDICATED},
    ).scalar_one()
    return None if value is None else str(value)


def constant_tenant(conn: Connection) -> str | None:
    """The tenant installed as this database's constant, or None (the stamp; a copy
    under another name; not PostgreSQL; a database before s0007)."""
    if conn.dialect.name != "postgresql":
        return None
    if conn.exec_driver_sql("SELECT to_regclass('tenantry.dedicated')").scalar() is None:
        return None
    value = conn.exec_driver_sql(
        "SELECT installed FROM tenantry.dedicated"
        " WHERE id = 1 AND installed_in = current_database()"
    ).scalar()
    return None if value is None else str(value)
