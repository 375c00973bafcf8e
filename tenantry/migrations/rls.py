"""Row-level security on PostgreSQL shards.

Every tenant table (a table with the tenant column, in any schema, partitions
included) gets ``ENABLE`` and ``FORCE ROW LEVEL SECURITY`` and policies that compare
the tenant column with the tenant the fence of the transaction signed:

- reads: ``USING (tenant_id = (SELECT tenantry.tenant()))``;
- writes (INSERT, UPDATE, DELETE): ``tenantry.writable_tenant()``, which also refuses
  (SQLSTATE 25006) unless the tenant's residency row on the shard is ``active``, so a
  frozen or moved tenant's rows cannot change whatever SQL reaches the shard.

``tenantry.tenant()`` returns NULL unless the signature the fence stored verifies for
this server connection (shard revision s0004), and NULL matches no row: fail closed.
The ``(SELECT ...)`` makes it an InitPlan, evaluated once per statement.

Views over tenant tables are made ``security_invoker`` (PostgreSQL 15), so that they
apply the querying role's policies, not their owner's. Tenant tables are found in the
system catalogs, so no application code needs importing. Everything here is idempotent.

Whether a routing role is safe (the check) is :mod:`tenantry.shardmap.roles`'s; here
are the policies and setting up a role that passes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.shardmap.scripts import SHARD

__all__ = [
    "DEFAULT_ROUTING_ROLE",
    "LEGACY_POLICY_NAME",
    "POLICY_NAMES",
    "RlsTable",
    "RoleState",
    "find_tenant_tables",
    "grant_routing_role",
    "install_rls",
    "policy_statements",
    "role_state",
    "scram_sha_256",
    "setup_routing_role",
]

#: The single policy of tenantry before the signed fence (dropped on upgrade).
LEGACY_POLICY_NAME = "tenantry_tenant_isolation"
_READ, _WRITE = "(SELECT tenantry.tenant())", "(SELECT tenantry.writable_tenant())"
#: Policy name -> (command, USING, WITH CHECK); {c} is the quoted tenant column.
POLICY_NAMES: dict[str, tuple[str, str | None, str | None]] = {
    "tenantry_read": ("SELECT", f"{{c}} = {_READ}", None),
    "tenantry_insert": ("INSERT", None, f"{{c}} = {_WRITE}"),
    "tenantry_update": ("UPDATE", f"{{c}} = {_WRITE}", f"{{c}} = {_WRITE}"),
    "tenantry_delete": ("DELETE", f"{{c}} = {_WRITE}", None),
}

#: Schemas that never hold application tables.
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "tenantry")


@dataclass(frozen=True, slots=True)
class RlsTable:
    """A table with the tenant column: its schema, its name, and its kind."""

    schema: str
    name: str
    partitioned: bool = False

    def quoted(self, conn: Connection) -> str:
        """The table's name, schema-qualified and quoted for SQL."""
        q = conn.dialect.identifier_preparer
        return f"{q.quote(self.schema)}.{q.quote(self.name)}"


def find_tenant_tables(conn: Connection, *, column: str = "tenant_id") -> list[RlsTable]:
    """Every table with the tenant column, in every schema (tenantry's own excluded).

    Plain, partitioned and partition tables: a partition queried by its own name is
    checked against its own policies, not its parent's.
    """
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname, c.relkind = 'p'"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :column"
            "  AND NOT a.attisdropped AND a.attnum > 0"
            " WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'"
            "  AND n.nspname NOT IN :system AND n.nspname NOT LIKE 'pg_temp%'"
            "  AND n.nspname NOT LIKE 'pg_toast_temp%'"
            "  AND c.relname NOT LIKE 'tenantry\\_%'"
            " ORDER BY 1, 2"
        ).bindparams(sa.bindparam("system", expanding=True)),
        {"column": column, "system": list(_SYSTEM_SCHEMAS)},
    )
    return [RlsTable(r[0], r[1], bool(r[2])) for r in rows]


def policy_statements(conn: Connection, table: RlsTable, *, column: str = "tenant_id") -> list[str]:
    """The DDL that installs (or refreshes) the isolation policies on *table*."""
    q = conn.dialect.identifier_preparer
    target = table.quoted(conn)
    col = q.quote(column)
    statements = [
        f"ALTER TABLE {target} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {target} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS {LEGACY_POLICY_NAME} ON {target}",
    ]
    for name, (command, using, check) in POLICY_NAMES.items():
        statements.append(f"DROP POLICY IF EXISTS {name} ON {target}")
        clauses = f" USING ({using.format(c=col)})" if using else ""
        clauses += f" WITH CHECK ({check.format(c=col)})" if check else ""
        statements.append(f"CREATE POLICY {name} ON {target} FOR {command}{clauses}")
    return statements


def install_rls(
    conn: Connection,
    tables: list[RlsTable] | None = None,
    *,
    column: str = "tenant_id",
) -> list[RlsTable]:
    """Install the policies on *tables* (default: every tenant table); return them.

    Also makes every view that reads a tenant table ``security_invoker``. Runs in the
    caller's transaction, as a role that owns the tables.
    """
    if conn.dialect.name != "postgresql":
        raise ValueError("row-level security needs PostgreSQL")
    if conn.exec_driver_sql("SELECT to_regprocedure('tenantry.tenant()')").scalar() is None:
        # The policies call the fence's functions: tenantry's shard schema comes first.
        SHARD.upgrade(conn)
    if tables is None:
        tables = find_tenant_tables(conn, column=column)
    for table in tables:
        for statement in policy_statements(conn, table, column=column):
            conn.exec_driver_sql(statement)
    _invoker_views(conn, tables)
    return tables


def _invoker_views(conn: Connection, tables: list[RlsTable]) -> None:
    """Views over tenant tables check the querying role's policies, not their owner's."""
    if not tables:
        return
    names = [table.quoted(conn) for table in tables]
    views = conn.execute(
        sa.text(
            "SELECT DISTINCT quote_ident(vn.nspname) || '.' || quote_ident(v.relname)"
            " FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid"
            " JOIN pg_class v ON v.oid = w.ev_class AND v.relkind = 'v'"
            " JOIN pg_namespace vn ON vn.oid = v.relnamespace"
            " WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass"
            "  AND d.refobjid = ANY (CAST(:tables AS regclass[]))"
            "  AND NOT coalesce('security_invoker=true' = ANY (v.reloptions), false)"
        ),
        {"tables": names},
    ).scalars()
    for view in views:
        conn.exec_driver_sql(f"ALTER VIEW {view} SET (security_invoker = true)")


def grant_routing_role(
    conn: Connection,
    role: str,
    tables: list[RlsTable] | None = None,
    *,
    column: str = "tenant_id",
) -> None:
    """Give the routing role what routed sessions need, and nothing to bypass RLS.

    Data rights on the tenant tables and their sequences; no right on tenantry's own
    tables (the residency is read through the fence function, the fence keys never).
    TEMPORARY on the database is taken from PUBLIC (and given to the operations role):
    a temporary table outlives the transaction on a pooled connection and, named like a
    tenant table, would stand in for it in the next tenant's transactions, and the
    fence's stamp is a temporary object that only tenantry may make
    (``tenantry.open_session()`` refuses a routing role that may), on every
    PostgreSQL shard alike.
    """
    q = conn.dialect.identifier_preparer
    if tables is None:
        tables = find_tenant_tables(conn, column=column)
    grantee = q.quote(role)
    for schema in sorted({table.schema for table in tables} | {"tenantry"}):
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {q.quote(schema)} TO {grantee}")
    for table in tables:
        conn.exec_driver_sql(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table.quoted(conn)} TO {grantee}"
        )
    for schema in sorted({table.schema for table in tables}):
        conn.exec_driver_sql(
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {q.quote(schema)} TO {grantee}"
        )
    residency = conn.exec_driver_sql("SELECT to_regclass('tenantry_residency')::text").scalar()
    if residency is not None:
        conn.exec_driver_sql(f"REVOKE ALL ON {residency} FROM {grantee}")
    database = q.quote(str(conn.exec_driver_sql("SELECT current_database()").scalar()))
    conn.exec_driver_sql(f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC, {grantee}")
    conn.exec_driver_sql(f"GRANT TEMPORARY ON DATABASE {database} TO CURRENT_USER")


# -- routing roles: setting one up (the check is in tenantry.shardmap.roles) -----------

#: The routing role ``tenantry shard secure`` creates unless told another name.
DEFAULT_ROUTING_ROLE = "tenantry_router"
#: The comment on roles ``tenantry shard secure`` created.
ROLE_COMMENT = "tenantry routing role"
#: Role names ``tenantry shard secure`` accepts (they need no quoting anywhere).
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def scram_sha_256(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of *password* (RFC 5802, 7677): what ``CREATE
    ROLE ... PASSWORD`` is given, so the password itself never reaches the server (or
    its logs). A random salt unless one is given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True, slots=True)
class RoleState:
    """A role as ``tenantry shard secure`` finds it."""

    exists: bool
    ours: bool  # created by tenantry shard secure (its comment says so)


def role_state(conn: Connection, role: str) -> RoleState:
    """Whether *role* exists on the server and whether tenantry created it."""
    row = conn.execute(
        sa.text(
            "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles"
            " WHERE rolname = :role"
        ),
        {"role": role},
    ).first()
    if row is None:
        return RoleState(exists=False, ours=False)
    return RoleState(exists=True, ours=row[0] == ROLE_COMMENT)


def setup_routing_role(
    conn: Connection,
    role: str,
    *,
    password: str | None,
    column: str = "tenant_id",
) -> bool:
    """Create *role* (or bring an existing one back to) ``LOGIN NOSUPERUSER NOBYPASSRLS
    NOCREATEDB NOCREATEROLE NOINHERIT``, set its *password* if given (as a SCRAM
    verifier), and grant it what routing needs: CONNECT on the database, USAGE on the
    schemas, data rights on the tenant tables and their sequences
    (:func:`grant_routing_role`). Runs in the caller's transaction, as the operations
    role; returns whether the role was created. Idempotent."""
    if not ROLE_NAME.fullmatch(role):
        raise ValueError(f"invalid role name {role!r}")
    q = conn.dialect.identifier_preparer
    attributes = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION"
    if password is not None:
        verifier = scram_sha_256(password)
        assert "'" not in verifier
        attributes += f" PASSWORD '{verifier}'"
    created = not role_state(conn, role).exists
    if created:
        conn.exec_driver_sql(f"CREATE ROLE {q.quote(role)} {attributes}")
        conn.exec_driver_sql(f"COMMENT ON ROLE {q.quote(role)} IS '{ROLE_COMMENT}'")
    else:
        conn.exec_driver_sql(f"ALTER ROLE {q.quote(role)} {attributes}")
    database = str(conn.exec_driver_sql("SELECT current_database()").scalar())
    conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {q.quote(database)} TO {q.quote(role)}")
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    if schema:
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {q.quote(str(schema))} TO {q.quote(role)}")
    grant_routing_role(conn, role, column=column)
    return created
