"""Provisioning: create a database, migrate it to the fleet's schema, register it.

If any step fails, the database tenantry created is dropped again and nothing is
registered: the catalog never lists a database that does not exist or is not
migrated.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from tenantry.errors import (
    ConfigurationError,
    ProvisionError,
    ShardExists,
    TenantryError,
    UnknownShard,
    UnsafeRoutingRole,
)
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.migrations.rls import (
    DEFAULT_ROUTING_ROLE,
    ROLE_NAME,
    role_state,
    setup_routing_role,
)
from tenantry.shardmap.catalog import Catalog, catalog_of, prepare_shard
from tenantry.shardmap.drivers import describe_error, make_engine, translate_errors
from tenantry.shardmap.model import (
    NAME_PATTERN,
    Shard,
    Tier,
    mask_url,
    normalize_url,
    validate_shard_name,
)
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.roles import (
    enforce_routing_role,
    inspect_routing_role,
    same_role_refusal,
    security_logger,
)
from tenantry.urls import with_database

__all__ = [
    "SecuredShard",
    "add_secured_shard",
    "create_database",
    "drop_database",
    "provision",
    "secure_shard",
]

logger = logging.getLogger("tenantry.provision")


def create_database(
    server_url: str, database: str, *, template: str | None = None, connect_timeout: float = 5.0
) -> str:
    """Create *database* on the server (PostgreSQL) or in the folder (SQLite); return
    its URL. Refuses a database that exists already."""
    if not NAME_PATTERN.fullmatch(database):
        raise ConfigurationError(
            f"invalid database name {database!r}: use 1 to 63 characters of a-z, 0-9, "
            "'_' and '-', starting with a letter or digit"
        )
    server = make_url(normalize_url(server_url))
    target = with_database(server, database)
    if server.get_backend_name() == "sqlite":
        path = Path(target.database or "")
        if path.exists():
            raise ProvisionError(f"database file {path} exists already: choose another name")
        if template:
            raise ProvisionError("--template needs PostgreSQL")
        path.parent.mkdir(parents=True, exist_ok=True)
        sa.create_engine(target, poolclass=NullPool).connect().close()
        return target.render_as_string(hide_password=False)
    try:
        with _server_connection(server, connect_timeout) as conn:
            if _exists(conn, database):
                raise ProvisionError(
                    f"database {database!r} exists already on {mask_url(server)}: register "
                    "it with `tenantry shard add`, or choose another name"
                )
            q = conn.dialect.identifier_preparer.quote
            ddl = f"CREATE DATABASE {q(database)}"
            if template:
                ddl += f" TEMPLATE {q(template)}"
            conn.exec_driver_sql(ddl)
    except sa.exc.SQLAlchemyError as exc:
        raise ProvisionError(
            f"cannot create database {database!r} on {mask_url(server)}: {describe_error(exc)}"
        ) from None
    return target.render_as_string(hide_password=False)


@contextmanager
def _server_connection(server: URL, connect_timeout: float) -> Iterator[sa.Connection]:
    """An autocommit connection to *server* (for CREATE and DROP DATABASE), its engine
    disposed of afterwards."""
    engine = make_engine(
        server.render_as_string(hide_password=False),
        connect_timeout=connect_timeout,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def database_exists(server_url: str, database: str, *, connect_timeout: float = 5.0) -> bool:
    """Whether *database* exists on the server (PostgreSQL) or in the folder (SQLite)."""
    server = make_url(normalize_url(server_url))
    target = with_database(server, database)
    if server.get_backend_name() == "sqlite":
        return Path(target.database or "").exists()
    engine = make_engine(
        server.render_as_string(hide_password=False),
        connect_timeout=connect_timeout,
        poolclass=NullPool,
    )
    try:
        with (
            translate_errors(
                f"the server {mask_url(server)}",
                unavailable=ProvisionError,
                failed=ProvisionError,
            ),
            engine.connect() as conn,
        ):
            return _exists(conn, database)
    finally:
        engine.dispose()


def _exists(conn: sa.Connection, database: str) -> bool:
    found = conn.execute(
        sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
    ).first()
    return found is not None


def drop_database(url: str, *, connect_timeout: float = 5.0) -> None:
    """Drop the database at *url* (PostgreSQL: ``WITH (FORCE)``; SQLite: the file)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                Path(f"{parsed.database}{suffix}").unlink()
        return
    with _server_connection(parsed.set(database="postgres"), connect_timeout) as conn:
        q = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q(parsed.database or '')} WITH (FORCE)")


def provision(
    target: object,
    name: str,
    server_url: str,
    *,
    tier: Tier | str = Tier.DEDICATED,
    database: str | None = None,
    template: str | None = None,
    routing_url: str | None = None,
    weight: int = 1,
    alembic_config: str | Path | None = None,
    revision: str = "head",
    migrate: bool = True,
    secure_role: str | None = None,
    allow_unsafe_routing_role: bool | None = None,
) -> Shard:
    """Create database *database* (default *name*) on *server_url*, migrate it to
    *revision* of the application's migrations, and register it as shard *name*.

    *server_url* is the operations role (it owns the new database); *routing_url*, if
    given, is the routing role on the same server, granted what routing needs; with
    *secure_role* instead, that role is created (or reused) as :func:`secure_shard`
    does. A shared PostgreSQL shard whose routing role would be the operations role is
    refused before anything is created (:class:`UnsafeRoutingRole`), and one whose
    routing role row-level security would not bind when it is registered (the
    database is dropped again), unless *allow_unsafe_routing_role* (default: the
    setting), which logs a warning.
    """
    catalog: Catalog = catalog_of(target)
    settings = catalog.settings
    validate_shard_name(name)
    tier = Tier(tier)
    database = database or name
    allow = _check_new_shard(
        catalog, name, tier, server_url, routing_url, secure_role, allow_unsafe_routing_role
    )
    cfg = None
    if migrate:
        cfg = app_config(alembic_config if alembic_config is not None else settings.alembic_config)
    admin_url = create_database(
        server_url, database, template=template, connect_timeout=settings.connect_timeout
    )
    try:
        url = _routing_url(admin_url, routing_url, database)
        shard = Shard(
            name, url, tier, admin_url=admin_url if url != admin_url else None, weight=weight
        )
        if cfg is not None:
            _migrate_new(shard, cfg, revision, database, catalog)
        if secure_role is not None:
            ops = Shard(name=name, url=admin_url, tier=tier)
            secured, _created, _generated, _warnings = _routing_role(catalog, ops, secure_role)
            shard = dataclasses.replace(shard, url=secured, admin_url=admin_url)
        return catalog.add_shard(
            name,
            shard.url,
            admin_url=shard.admin_url,
            tier=tier,
            weight=weight,
            allow_unsafe_routing_role=allow,
        )
    except BaseException as exc:
        _drop_after_failure(admin_url, connect_timeout=settings.connect_timeout)
        if isinstance(exc, TenantryError) and not isinstance(
            exc, (ProvisionError, UnsafeRoutingRole)
        ):
            raise ProvisionError(
                f"{exc} (database {database!r} was dropped again)", shard=name
            ) from None
        raise


def _check_new_shard(
    catalog: Catalog,
    name: str,
    tier: Tier,
    server_url: str,
    routing_url: str | None,
    secure_role: str | None,
    allow_unsafe_routing_role: bool | None,
) -> bool:
    """Refuse, before anything is created, a shard name taken already and a shared
    PostgreSQL shard that would route as its operations role; return whether an unsafe
    routing role is allowed (*allow_unsafe_routing_role*, default: the setting)."""
    _refuse_taken(catalog, name)
    allow = (
        catalog.settings.allow_unsafe_routing_role
        if allow_unsafe_routing_role is None
        else allow_unsafe_routing_role
    )
    if (
        tier is Tier.SHARED
        and secure_role is None
        and not allow  # allowed: registering it warns, once
        and make_url(normalize_url(server_url)).get_backend_name() == "postgresql"
    ):
        same_role_refusal(
            name,
            routing_url or server_url,
            server_url,
            allow=False,
            fix="pass --secure (a routing role with only the grants it needs) or "
            "--routing-url URL of a role that owns nothing",
        )
    return allow


def _refuse_taken(catalog: Catalog, name: str) -> None:
    """Refuse shard name *name* if the catalog has it already."""
    with suppress(UnknownShard):
        catalog.get_shard(name)
        raise ShardExists(name)


def _routing_url(admin_url: str, routing_url: str | None, database: str) -> str:
    """The URL the new shard routes through: *routing_url*'s role on the new database,
    or the operations URL."""
    if not routing_url:
        return admin_url
    return with_database(make_url(normalize_url(routing_url)), database).render_as_string(
        hide_password=False
    )


def _migrate_new(shard: Shard, cfg: Config, revision: str, database: str, catalog: Catalog) -> None:
    """Migrate the new database, or raise :class:`ProvisionError` (the caller drops it)."""
    outcome = migrate_shard(shard, cfg, revision, settings=catalog.settings)
    if not outcome.ok:
        raise ProvisionError(
            f"database {database!r} was created but could not be migrated "
            f"({outcome.error}); it was dropped again",
            shard=shard.name,
        )


def _drop_after_failure(admin_url: str, *, connect_timeout: float) -> None:
    """Drop the database a failed provision created; a failure to is logged."""
    try:
        drop_database(admin_url, connect_timeout=connect_timeout)
    except (sa.exc.SQLAlchemyError, OSError) as cleanup:
        logger.error(
            "could not drop database %s after a failed provision: %s",
            mask_url(admin_url),
            describe_error(cleanup),
        )


# -- routing roles ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecuredShard:
    """What ``tenantry shard secure`` did to one shard (never its password)."""

    shard: Shard
    role: str
    role_created: bool
    #: "generated": a new password was set and stored in the catalog's URL; "kept".
    password: str
    #: Whether the catalog's URLs changed (False: it was secured already).
    changed: bool
    warnings: tuple[str, ...] = ()


def secure_shard(target: object, name: str, *, role: str = DEFAULT_ROUTING_ROLE) -> SecuredShard:
    """Make PostgreSQL shard *name* route as *role*, a role with exactly the grants
    routing needs, created (or reused) through the shard's operations URL.

    The role is ``LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT``,
    with a generated password that is stored in the catalog's URL and never printed
    or logged (the server is sent its SCRAM verifier only). The shard's ``url`` becomes
    the role's; ``admin_url`` keeps the operations URL. The new routing role is checked
    like ``shard add``'s, and the catalog is changed only when it passes. Idempotent.
    """
    catalog: Catalog = catalog_of(target)
    shard = catalog.get_shard(name)
    if shard.backend != "postgresql":
        raise ConfigurationError(
            f"shard {name!r} is SQLite: SQLite has no roles (and no row-level security)"
        )
    ops_url = shard.operations_url
    routing, created, generated, warnings = _routing_role(catalog, shard, role)
    probe = dataclasses.replace(shard, url=routing, admin_url=ops_url)
    check = inspect_routing_role(probe, catalog.settings)  # and the new URL connects
    cautions: list[str] = []
    if shard.tier is Tier.SHARED:
        cautions = enforce_routing_role(name, check, allow=False, fix=_manual_fix(role))
    changed = (routing, ops_url) != (shard.url, shard.admin_url)
    if changed:
        # Checks the role again, in the catalog's transaction; logs the cautions.
        shard = catalog.set_shard_urls(
            name, routing, admin_url=ops_url, allow_unsafe_routing_role=False
        )
        logger.info("shard %s routes as role %s now", name, role)
    else:
        for caution in cautions:
            security_logger.warning("%s", caution)
    return _secured(shard, role, created, generated, changed, [*warnings, *cautions])


def add_secured_shard(
    catalog: Catalog,
    name: str,
    url: str,
    *,
    admin_url: str | None = None,
    tier: Tier | str = Tier.SHARED,
    weight: int = 1,
    role: str = DEFAULT_ROUTING_ROLE,
) -> SecuredShard:
    """Register a PostgreSQL database as shard *name* routing as *role* (what
    ``tenantry shard add --secure`` does): *admin_url*, else *url*, is the operations
    role, which prepares the database and creates the routing role as
    :func:`secure_shard` does."""
    validate_shard_name(name)
    tier = Tier(tier)
    _refuse_taken(catalog, name)
    ops = Shard(name=name, url=normalize_url(admin_url or url), tier=tier)
    if ops.backend != "postgresql":
        raise ConfigurationError("--secure needs PostgreSQL: SQLite has no roles")
    prepare_shard(
        ops,
        connect_timeout=catalog.settings.connect_timeout,
        constant=catalog.settings.dedicated_constant,
    )
    routing, created, generated, warnings = _routing_role(catalog, ops, role)
    shard = catalog.add_shard(
        name,
        routing,
        admin_url=ops.url,
        tier=tier,
        weight=weight,
        allow_unsafe_routing_role=False,
    )
    logger.info("shard %s routes as role %s", name, role)
    return _secured(shard, role, created, generated, True, warnings)


def _secured(
    shard: Shard, role: str, created: bool, generated: bool, changed: bool, warnings: list[str]
) -> SecuredShard:
    """What securing *shard* did, its password only said to be generated or kept."""
    return SecuredShard(
        shard=shard,
        role=role,
        role_created=created,
        password="generated" if generated else "kept",
        changed=changed,
        warnings=tuple(warnings),
    )


def _manual_fix(role: str) -> str:
    return (
        f"take from role {role!r} its memberships and its ownerships, then run "
        "`tenantry shard secure` again"
    )


def _routing_role(catalog: Catalog, shard: Shard, role: str) -> tuple[str, bool, bool, list[str]]:
    """Create or reuse *role* through *shard*'s operations URL and grant it what routing
    needs; return its routing URL (with the password), whether the role was created,
    whether a new password was generated, and warnings."""
    settings = catalog.settings
    if not ROLE_NAME.fullmatch(role):
        raise ConfigurationError(
            f"invalid role name {role!r}: use 1 to 63 characters of a-z, 0-9 and '_', "
            "not starting with a digit",
            field="role",
        )
    ops_url = shard.operations_url
    if make_url(ops_url).username == role:
        raise ConfigurationError(
            f"shard {shard.name!r}: {role!r} is the operations role; the routing role "
            "must be another one: choose another --role",
            field="role",
        )
    current = make_url(shard.url) if shard.url != ops_url else None
    with operator_transaction(shard, connect_timeout=settings.connect_timeout) as conn:
        state = role_state(conn, role)
    if state.exists and not state.ours and (current is None or current.username != role):
        raise ConfigurationError(
            f"role {role!r} exists on the server of shard {shard.name!r} and was not made "
            "by tenantry: choose another --role (or route as it with `tenantry shard add` "
            "and a URL of yours)",
            field="role",
        )
    password = _known_password(catalog, shard, role) if state.exists else None
    generated = password is None
    if password is None:
        password = secrets.token_urlsafe(32)
    with operator_transaction(shard, connect_timeout=settings.connect_timeout) as conn:
        created = setup_routing_role(
            conn,
            role,
            password=password if generated else None,
            column=settings.tenant_column,
        )
    routing = make_url(ops_url).set(username=role, password=password)
    warnings = []
    if generated and not created:
        stale = _others_routing_as(catalog, shard, role, password)
        if stale:
            warnings.append(
                f"role {role!r} got a new password: shard(s) {', '.join(stale)} route as it "
                f"with the old one; run `tenantry shard secure --all`"
            )
            security_logger.warning("%s", warnings[-1])
    return routing.render_as_string(hide_password=False), created, generated, warnings


def _known_password(catalog: Catalog, shard: Shard, role: str) -> str | None:
    """A password of *role* the catalog knows and the server accepts, or None."""
    candidates: list[str] = []
    for url in [shard.url] + [s.url for s in catalog.list_shards()]:
        parsed = make_url(url)
        if parsed.username == role and parsed.password and parsed.password not in candidates:
            candidates.append(str(parsed.password))
    ops = make_url(shard.operations_url)
    for password in candidates:
        engine = make_engine(
            ops.set(username=role, password=password).render_as_string(hide_password=False),
            connect_timeout=catalog.settings.connect_timeout,
            poolclass=NullPool,
        )
        try:
            with engine.connect():
                return password
        except sa.exc.SQLAlchemyError:
            continue
        finally:
            engine.dispose()
    return None


def _others_routing_as(catalog: Catalog, shard: Shard, role: str, password: str) -> list[str]:
    """Other shards of *shard*'s server whose URL routes as *role* with another password."""
    here = make_url(shard.operations_url)
    found = []
    for other in catalog.list_shards():
        parsed = make_url(other.url)
        if (
            other.name != shard.name
            and parsed.username == role
            and (parsed.host, parsed.port) == (here.host, here.port)
            and parsed.password != password
        ):
            found.append(other.name)
    return found
