"""Row-level security on PostgreSQL shared shards.

Every tenant table gets ``ENABLE`` and ``FORCE ROW LEVEL SECURITY`` and one policy
whose ``USING`` and ``WITH CHECK`` compare the tenant column to
``current_setting('tenantry.tenant_id', true)``: the setting the router's fence sets,
transaction-local, in every routed transaction. No setting means NULL, and NULL
matches no row: fail closed.

Tenant tables are found by reflection (every table with the tenant column), so no
application code needs importing. Everything here is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection

__all__ = [
    "POLICY_NAME",
    "RoleCheck",
    "check_role",
    "grant_routing_role",
    "install_rls",
    "policy_statements",
    "tenant_tables",
]

POLICY_NAME = "tenantry_tenant_isolation"
SETTING = "tenantry.tenant_id"


def tenant_tables(
    conn: Connection, *, column: str = "tenant_id", schema: str | None = None
) -> list[str]:
    """Names of the tables that have the tenant column (tenantry's own excluded)."""
    inspector = sa.inspect(conn)
    found = []
    for table in inspector.get_table_names(schema=schema):
        if table.startswith("tenantry_"):
            continue
        if any(c["name"] == column for c in inspector.get_columns(table, schema=schema)):
            found.append(table)
    return sorted(found)


def policy_statements(
    conn: Connection, table: str, *, column: str = "tenant_id", schema: str | None = None
) -> list[str]:
    """The DDL that installs (or refreshes) the isolation policy on *table*."""
    q = conn.dialect.identifier_preparer
    target = f"{q.quote(schema)}.{q.quote(table)}" if schema else q.quote(table)
    check = f"{q.quote(column)} = current_setting('{SETTING}', true)"
    return [
        f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS {POLICY_NAME} ON {target}",
        f"CREATE POLICY {POLICY_NAME} ON {target} USING ({check}) WITH CHECK ({check})",
    ]


def install_rls(
    conn: Connection,
    tables: list[str] | None = None,
    *,
    column: str = "tenant_id",
    schema: str | None = None,
) -> list[str]:
    """Install the policy on *tables* (default: every tenant table); return their names.

    Runs in the caller's transaction, as a role that owns the tables.
    """
    if conn.dialect.name != "postgresql":
        raise ValueError("row-level security needs PostgreSQL")
    if tables is None:
        tables = tenant_tables(conn, column=column, schema=schema)
    for table in tables:
        for statement in policy_statements(conn, table, column=column, schema=schema):
            conn.exec_driver_sql(statement)
    return tables


def grant_routing_role(
    conn: Connection, role: str, tables: list[str] | None = None, *, column: str = "tenant_id"
) -> None:
    """Give the routing role what routed sessions need, and nothing to bypass RLS."""
    q = conn.dialect.identifier_preparer
    if tables is None:
        tables = tenant_tables(conn, column=column)
    grantee = q.quote(role)
    for table in tables:
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {q.quote(table)} TO {grantee}"
        )
    conn.exec_driver_sql(f"GRANT SELECT ON tenantry_residency TO {grantee}")
    conn.exec_driver_sql(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {grantee}")


@dataclass(frozen=True, slots=True)
class RoleCheck:
    """What a role can do to row-level security."""

    role: str
    superuser: bool
    bypassrls: bool

    @property
    def bypasses_rls(self) -> bool:
        """True when policies do nothing for this role."""
        return self.superuser or self.bypassrls

    def warning(self, shard: str) -> str | None:
        """A sentence for operators, or None when the role is fine for routing."""
        if not self.bypasses_rls:
            return None
        why = "a superuser" if self.superuser else "BYPASSRLS"
        return (
            f"shard {shard!r}: the routing role {self.role!r} is {why}, so row-level "
            "security does nothing for it; route as a role with NOSUPERUSER NOBYPASSRLS"
        )


def check_role(conn: Connection) -> RoleCheck:
    """Whether the connected role bypasses row-level security."""
    row = conn.execute(
        sa.text("SELECT rolname, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
    ).one()
    return RoleCheck(role=row[0], superuser=bool(row[1]), bypassrls=bool(row[2]))
