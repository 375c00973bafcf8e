"""Provisioning: create a database, migrate it to the fleet's schema, register it.

If any step fails, the database tenantry created is dropped again and nothing is
registered: the catalog never lists a database that does not exist or is not
migrated.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from tenantry.errors import (
    ConfigurationError,
    ProvisionError,
    ShardExists,
    TenantryError,
    UnknownShard,
)
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import describe_error, make_engine
from tenantry.shardmap.model import (
    NAME_PATTERN,
    Shard,
    Tier,
    mask_url,
    normalize_url,
    validate_shard_name,
)

__all__ = ["create_database", "drop_database", "provision"]

logger = logging.getLogger("tenantry.provision")


def _with_database(url: URL, database: str) -> URL:
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or ".")
        return url.set(database=str(folder / f"{database}.db"))
    return url.set(database=database)


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
    target = _with_database(server, database)
    if server.get_backend_name() == "sqlite":
        path = Path(target.database or "")
        if path.exists():
            raise ProvisionError(f"database file {path} exists already: choose another name")
        if template:
            raise ProvisionError("--template needs PostgreSQL")
        path.parent.mkdir(parents=True, exist_ok=True)
        sa.create_engine(target, poolclass=NullPool).connect().close()
        return target.render_as_string(hide_password=False)
    engine = make_engine(
        server.render_as_string(hide_password=False),
        connect_timeout=connect_timeout,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        with engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
            ).first()
            if exists:
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
    finally:
        engine.dispose()
    return target.render_as_string(hide_password=False)


def drop_database(url: str, *, connect_timeout: float = 5.0) -> None:
    """Drop the database at *url* (PostgreSQL: ``WITH (FORCE)``; SQLite: the file)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                Path(f"{parsed.database}{suffix}").unlink()
        return
    server = parsed.set(database="postgres")
    engine = make_engine(
        server.render_as_string(hide_password=False),
        connect_timeout=connect_timeout,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        with engine.connect() as conn:
            q = conn.dialect.identifier_preparer.quote
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q(parsed.database or '')} WITH (FORCE)")
    finally:
        engine.dispose()


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
) -> Shard:
    """Create database *database* (default *name*) on *server_url*, migrate it to
    *revision* of the application's migrations, and register it as shard *name*.

    *server_url* is the operations role (it owns the new database); *routing_url*, if
    given, is the routing role on the same server, granted what routing needs.
    """
    from tenantry.migrations.fleet import _catalog

    catalog: Catalog = _catalog(target)
    settings = catalog.settings
    validate_shard_name(name)
    tier = Tier(tier)
    database = database or name
    with suppress(UnknownShard):
        catalog.get_shard(name)
        raise ShardExists(name)
    cfg = None
    if migrate:
        cfg = app_config(alembic_config if alembic_config is not None else settings.alembic_config)
    admin_url = create_database(
        server_url, database, template=template, connect_timeout=settings.connect_timeout
    )
    try:
        url = admin_url
        if routing_url:
            url = _with_database(make_url(normalize_url(routing_url)), database).render_as_string(
                hide_password=False
            )
        shard = Shard(
            name=name,
            url=url,
            admin_url=admin_url if url != admin_url else None,
            tier=tier,
            weight=weight,
        )
        if cfg is not None:
            outcome = migrate_shard(shard, cfg, revision, settings=settings)
            if not outcome.ok:
                raise ProvisionError(
                    f"database {database!r} was created but could not be migrated "
                    f"({outcome.error}); it was dropped again",
                    shard=name,
                )
        return catalog.add_shard(
            name, shard.url, admin_url=shard.admin_url, tier=tier, weight=weight
        )
    except BaseException as exc:
        try:
            drop_database(admin_url, connect_timeout=settings.connect_timeout)
        except (sa.exc.SQLAlchemyError, OSError) as cleanup:
            logger.error(
                "could not drop database %s after a failed provision: %s",
                mask_url(admin_url),
                describe_error(cleanup),
            )
        if isinstance(exc, TenantryError) and not isinstance(exc, ProvisionError):
            raise ProvisionError(
                f"{exc} (database {database!r} was dropped again)", shard=name
            ) from None
        raise
