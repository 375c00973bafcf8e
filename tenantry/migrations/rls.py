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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry.errors import ShardUnavailable, UnsafeRoutingRole
from tenantry.settings import TenantrySettings
from tenantry.shardmap.connect import make_engine, translate_errors
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.scripts import SHARD

__all__ = [
    "DEFAULT_ROUTING_ROLE",
    "LEGACY_POLICY_NAME",
    "OVERRIDE_NAME",
    "POLICY_NAMES",
    "ROLE_CHECK_SQL",
    "RlsTable",
    "RoleCheck",
    "RoleState",
    "check_dbapi_role",
    "check_role",
    "enforce_routing_role",
    "find_tenant_tables",
    "grant_routing_role",
    "inspect_routing_role",
    "install_rls",
    "operations_role",
    "policy_statements",
    "role_state",
    "same_role_refusal",
    "scram_sha_256",
    "secure_fix",
    "setup_routing_role",
    "shard_role_check",
    "verify_routing_role",
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


@dataclass(frozen=True, slots=True)
class RoleCheck:
    """What a routing role can do to row-level security (see :func:`check_role`).

    ``problems`` make it unsafe for a shared shard (the policies would not bind it);
    ``cautions`` are warnings only.
    """

    role: str
    superuser: bool
    bypassrls: bool
    #: CREATEROLE: it can grant itself (or create) roles that bypass the policies.
    createrole: bool = False
    #: Roles it is a member of (directly or not) that are superuser or BYPASSRLS.
    bypassing_roles: tuple[str, ...] = ()
    #: Tenant tables and tenantry's own objects that it, or a role it is a member of, owns.
    owned: tuple[str, ...] = ()
    #: The owners of those objects other than itself (roles it is a member of).
    owner_roles: tuple[str, ...] = ()
    #: "same": it is the operations role; "member": a member of it; None: neither.
    operations: str | None = None
    #: Schemas in which it may CREATE (a table there could stand in for a tenant table).
    create_schemas: tuple[str, ...] = ()
    #: Whether it may create TEMPORARY tables (they outlive a pooled transaction).
    temporary: bool = False

    @property
    def bypasses_rls(self) -> bool:
        """True when policies do nothing for this role itself."""
        return self.superuser or self.bypassrls

    @property
    def problems(self) -> list[str]:
        """Why row-level security would not bind this role; empty when it would."""
        if self.superuser:
            return ["is a superuser"]
        found = []
        if self.bypassrls:
            found.append("has BYPASSRLS")
        if self.operations == "same":
            found.append("is the operations role")
        elif self.operations == "member":
            found.append("is a member of the operations role")
        if self.bypassing_roles:
            roles = _names(self.bypassing_roles)
            found.append(f"is a member of superuser or BYPASSRLS role(s) {roles}")
        if self.owned:
            owners = f" (through role(s) {_names(self.owner_roles)})" if self.owner_roles else ""
            found.append(f"owns {_names(self.owned, quote=False)}{owners}")
        if self.createrole:
            found.append("has CREATEROLE")
        return found

    @property
    def cautions(self) -> list[str]:
        """What is not a bypass but lets it shadow tables in other tenants' transactions."""
        found = []
        if self.create_schemas:
            found.append(f"may CREATE in schema(s) {_names(self.create_schemas)}")
        if self.temporary:
            found.append("may create TEMPORARY tables")
        return found

    @property
    def safe(self) -> bool:
        """True when row-level security binds this role."""
        return not self.problems

    def refusal(self, shard: str, fix: str | None = None) -> str | None:
        """One line naming the shard, the role, what is wrong and the fix; None if safe."""
        problems = self.problems
        if not problems:
            return None
        fix = fix or secure_fix(shard)
        return (
            f"shard {shard!r}: the routing role {self.role!r} {', '.join(problems)}, so "
            f"row-level security does nothing for it: {fix}"
        )

    def override_warning(self, shard: str) -> str | None:
        """The warning logged each time the override lets this role through."""
        problems = self.problems
        if not problems:
            return None
        return (
            f"shard {shard!r}: the routing role {self.role!r} {', '.join(problems)}; allowed "
            f"by the {OVERRIDE_NAME} override (local development only): row-level security "
            f"does not isolate this shard's tenants; `tenantry shard secure {shard}` fixes it"
        )

    def caution(self, shard: str) -> str | None:
        """One line of cautions, or None."""
        cautions = self.cautions
        if not cautions:
            return None
        fixes = []
        if self.create_schemas:
            fixes.append("revoke CREATE on those schemas from it and from PUBLIC")
        if self.temporary:
            fixes.append(f"`tenantry shard secure {shard}` or `migrate upgrade` revokes TEMPORARY")
        return (
            f"shard {shard!r}: the routing role {self.role!r} {' and '.join(cautions)}, so a "
            f"table it makes could stand in for a tenant table: {'; '.join(fixes)}"
        )

    def warning(self, shard: str) -> str | None:
        """A sentence for operators (the refusal, else the cautions), or None."""
        return self.refusal(shard) or self.caution(shard)


def check_role(
    conn: Connection, *, column: str = "tenant_id", operations_role: str | None = None
) -> RoleCheck:
    """What the connected role can do to row-level security: one query.

    *operations_role* is the operations role's name (the shard's ``admin_url`` user),
    so that a routing role that is it, or a member of it, is reported.
    """
    row = conn.exec_driver_sql(
        ROLE_CHECK_SQL, {"column": column, "operations": operations_role}
    ).one()
    return _role_check(tuple(row))


# -- routing roles: the check, its override, and setting one up -------------------------

#: The logger of refusals' overrides (a warning each time) and of cautions.
security_logger = logging.getLogger("tenantry.security")
#: What the override is called in messages (the setting and the CLI flag).
OVERRIDE_NAME = "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE / --allow-unsafe-routing-role"
#: The routing role ``tenantry shard secure`` creates unless told another name.
DEFAULT_ROUTING_ROLE = "tenantry_router"
#: The comment on roles ``tenantry shard secure`` created.
ROLE_COMMENT = "tenantry routing role"
#: Role names ``tenantry shard secure`` accepts (they need no quoting anywhere).
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Named parameters in the driver's style (psycopg), and no literal percent sign, so the
# same text serves a SQLAlchemy connection and a bare DBAPI connection (the router's
# check runs in the pool's connect event, where there is only the latter).
ROLE_CHECK_SQL = """
WITH me AS (
  SELECT oid, rolname, rolsuper, rolbypassrls, rolcreaterole
    FROM pg_catalog.pg_roles WHERE rolname = current_user
), mine AS (
  SELECT r.oid, r.rolname, r.rolsuper, r.rolbypassrls
    FROM pg_catalog.pg_roles r WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')
), owned AS (
  SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS name,
         c.relowner AS owner
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p') AND c.relowner IN (SELECT oid FROM mine)
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')
     AND (n.nspname = 'tenantry' OR pg_catalog.starts_with(c.relname, 'tenantry_')
          OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = %(column)s
                        AND a.attnum > 0 AND NOT a.attisdropped))
  UNION ALL
  SELECT 'schema tenantry', n.nspowner FROM pg_catalog.pg_namespace n
   WHERE n.nspname = 'tenantry' AND n.nspowner IN (SELECT oid FROM mine)
  UNION ALL
  SELECT 'tenantry.' || pg_catalog.quote_ident(p.proname) || '()', p.proowner
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname = 'tenantry' AND p.proowner IN (SELECT oid FROM mine)
)
SELECT me.rolname::text, me.rolsuper, me.rolbypassrls, me.rolcreaterole,
  ARRAY(SELECT m.rolname::text FROM mine m
         WHERE m.oid <> me.oid AND (m.rolsuper OR m.rolbypassrls) ORDER BY 1),
  ARRAY(SELECT DISTINCT o.name FROM owned o ORDER BY 1),
  ARRAY(SELECT DISTINCT r.rolname::text FROM owned o JOIN pg_catalog.pg_roles r
           ON r.oid = o.owner WHERE r.oid <> me.oid ORDER BY 1),
  CASE WHEN me.rolname = %(operations)s THEN 'same'
       WHEN EXISTS (SELECT 1 FROM mine m WHERE m.rolname = %(operations)s) THEN 'member'
  END,
  ARRAY(SELECT n.nspname::text FROM pg_catalog.pg_namespace n
         WHERE n.nspname NOT IN ('information_schema', 'tenantry')
           AND NOT pg_catalog.starts_with(n.nspname, 'pg_')
           AND pg_catalog.has_schema_privilege(n.oid, 'CREATE') ORDER BY 1),
  pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY')
FROM me
"""


def _role_check(row: tuple[Any, ...]) -> RoleCheck:
    return RoleCheck(
        role=str(row[0]),
        superuser=bool(row[1]),
        bypassrls=bool(row[2]),
        createrole=bool(row[3]),
        bypassing_roles=tuple(row[4] or ()),
        owned=tuple(row[5] or ()),
        owner_roles=tuple(row[6] or ()),
        operations=row[7],
        create_schemas=tuple(row[8] or ()),
        temporary=bool(row[9]),
    )


def _names(names: Sequence[str], *, quote: bool = True, most: int = 4) -> str:
    shown = [repr(n) if quote else n for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def secure_fix(shard: str) -> str:
    """The fix of an unsafe routing role of a registered shard."""
    return f"run `tenantry shard secure {shard}` (a routing role with only the grants it needs)"


def check_dbapi_role(
    dbapi_connection: Any, *, column: str = "tenant_id", operations_role: str | None = None
) -> RoleCheck:
    """:func:`check_role` on a bare DBAPI connection (psycopg, sync or SQLAlchemy's
    asyncio adaptation); the transaction it opened is rolled back."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(ROLE_CHECK_SQL, {"column": column, "operations": operations_role})
        row = cursor.fetchone()
    finally:
        cursor.close()
        dbapi_connection.rollback()
    return _role_check(tuple(row))


def operations_role(shard: Shard) -> str | None:
    """The operations role's name, as its URL gives it."""
    return make_url(shard.operations_url).username


def shard_role_check(check: RoleCheck, shard: Shard) -> RoleCheck:
    """*check* with what the shard's URLs say: one URL for both roles is the same role."""
    if check.operations is None and (shard.admin_url is None or shard.admin_url == shard.url):
        return replace(check, operations="same")
    return check


def enforce_routing_role(
    shard: str,
    check: RoleCheck,
    *,
    allow: bool,
    fix: str | None = None,
) -> list[str]:
    """Refuse *check*'s role for shared shard *shard* (:class:`UnsafeRoutingRole`), or,
    with *allow*, log the override's warning; return the cautions (lines)."""
    refusal = check.refusal(shard, fix)
    if refusal is not None:
        if not allow:
            raise UnsafeRoutingRole(
                refusal + f" (local development only: {OVERRIDE_NAME})",
                shard=shard,
                role=check.role,
                problems=check.problems,
            )
        security_logger.warning("%s", check.override_warning(shard))
        return []  # the cautions are nothing beside that
    caution = check.caution(shard)
    return [caution] if caution else []


def inspect_routing_role(shard: Shard, settings: TenantrySettings) -> RoleCheck:
    """Connect to *shard* as its routing role (``url``) and check it."""
    engine = make_engine(shard.url, connect_timeout=settings.connect_timeout, poolclass=NullPool)
    try:
        with (
            translate_errors(
                f"shard {shard.name!r} as its routing role",
                unavailable=ShardUnavailable,
                failed=ShardUnavailable,
            ),
            engine.connect() as conn,
        ):
            check = check_role(
                conn, column=settings.tenant_column, operations_role=operations_role(shard)
            )
    finally:
        engine.dispose()
    return shard_role_check(check, shard)


def verify_routing_role(
    shard: Shard,
    settings: TenantrySettings,
    *,
    allow: bool | None = None,
    fix: str | None = None,
) -> list[str]:
    """Refuse a shared PostgreSQL shard whose routing role row-level security does not
    bind, unless *allow* (default: the ``allow_unsafe_routing_role`` setting), which logs
    a warning; log and return the cautions. Other shards pass unchecked."""
    if shard.tier is not Tier.SHARED or shard.backend != "postgresql":
        return []
    check = inspect_routing_role(shard, settings)
    if allow is None:
        allow = settings.allow_unsafe_routing_role
    cautions = enforce_routing_role(shard.name, check, allow=allow, fix=fix)
    for caution in cautions:
        security_logger.warning("%s", caution)
    return cautions


def same_role_refusal(
    shard: str, routing_url: str, operations_url: str, *, allow: bool, fix: str
) -> None:
    """Refuse (or, with *allow*, warn about) a routing URL whose role is the operations
    role's, by name: what ``shard create`` and ``promote --server`` register."""
    if make_url(operations_url).get_backend_name() != "postgresql":
        return  # SQLite has no roles
    role = make_url(routing_url).username
    if role != make_url(operations_url).username:
        return
    check = RoleCheck(role=str(role), superuser=False, bypassrls=False, operations="same")
    enforce_routing_role(shard, check, allow=allow, fix=fix)


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
