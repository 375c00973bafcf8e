"""The routing-role check: whether row-level security binds the role a shard routes as.

A shared PostgreSQL shard's routing role (its ``url``'s user) must not bypass the
policies: no superuser, BYPASSRLS, CREATEROLE, owner of tenant tables or of tenantry's
own objects, nor the operations role or a member of it. The catalog checks it when a
shard is added, the router on each engine's first connection, the fleet migrations and
provisioning when they touch a shard; the override (``allow_unsafe_routing_role``) is
for local development only and logs a warning each time. Setting up a safe routing
role, and the policies themselves, are :mod:`tenantry.migrations.rls`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry.errors import ShardUnavailable, UnsafeRoutingRole
from tenantry.settings import TenantrySettings
from tenantry.shardmap.drivers import make_engine, translate_errors
from tenantry.shardmap.model import Shard, Tier

__all__ = [
    "OVERRIDE_NAME",
    "ROLE_CHECK_SQL",
    "RoleCheck",
    "check_dbapi_role",
    "check_role",
    "enforce_routing_role",
    "inspect_routing_role",
    "operations_role",
    "same_role_refusal",
    "secure_fix",
    "security_logger",
    "shard_role_check",
    "verify_routing_role",
]

#: The logger of refusals' overrides (a warning each time) and of cautions.
security_logger = logging.getLogger("tenantry.security")
#: What the override is called in messages (the setting and the CLI flag).
OVERRIDE_NAME = "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE / --allow-unsafe-routing-role"


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
        found = self._problems_line(shard)
        if found is None:
            return None
        return f"{found}, so row-level security does nothing for it: {fix or secure_fix(shard)}"

    def override_warning(self, shard: str) -> str | None:
        """The warning logged each time the override lets this role through."""
        found = self._problems_line(shard)
        if found is None:
            return None
        return (
            f"{found}; allowed by the {OVERRIDE_NAME} override (local development only): "
            "row-level security does not isolate this shard's tenants; "
            f"`tenantry shard secure {shard}` fixes it"
        )

    def _problems_line(self, shard: str) -> str | None:
        """The shard, the role and what is wrong with it; None if nothing is."""
        problems = self.problems
        if not problems:
            return None
        return f"shard {shard!r}: the routing role {self.role!r} {', '.join(problems)}"

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
