"""The catalog's store: its engine, schema revision and transactions, and its rows
read back as model objects.

Every change runs in one transaction that first bumps the map version; on PostgreSQL
that row lock also serialises concurrent writers, and the same transaction sends
``NOTIFY tenantry_map`` so that routers refresh. On SQLite the write transaction takes
the database lock at ``BEGIN IMMEDIATE`` for the same effect. The tenant changes of each
version are logged (``tenantry_map_changes``) for routers' refreshes, and pruned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import (
    CatalogNotInitialized,
    CatalogUnavailable,
    ConfigurationError,
    UnknownShard,
    UnknownTenant,
)
from tenantry.settings import TenantrySettings, load_settings
from tenantry.shardmap.drivers import WRITE, make_engine, translate_errors
from tenantry.shardmap.model import (
    Shard,
    ShardState,
    Tenant,
    TenantState,
    Tier,
    absolute_sqlite_path,
    as_utc,
    mask_url,
    parse_url,
)
from tenantry.shardmap.poolers import unprepared_through_pooler
from tenantry.shardmap.schema import map_changes, map_table, shards, tenants
from tenantry.shardmap.scripts import CATALOG

__all__ = [
    "CHANGES_KEPT",
    "INIT_LOCK_KEY",
    "NOTIFY_CHANNEL",
    "SNAPSHOT_COLUMNS",
    "CatalogStore",
    "shard_from_row",
    "tenant_from_row",
    "tenants_from_rows",
]

#: PostgreSQL channel on which every map change is announced (payload: new version).
NOTIFY_CHANNEL = "tenantry_map"
#: How many map versions of tenant changes the catalog keeps for routers' refreshes;
#: a router further behind reloads the whole map.
CHANGES_KEPT = 10_000
_PRUNE_EVERY = 100

#: The advisory lock that serialises schema upgrades (of the catalog, of a shard's own
#: tables). Any constant works; it only has to be the same in every tenantry process.
INIT_LOCK_KEY = 0x7E4A7C01


#: Connections one process's catalog may hold on the catalog's server at most: its
#: engine (2 + 4 overflow), the map reads' engine (1 + 1) and the map listener (1).
#: Routers leave them out of their share of that server (tenantry.router.connections).
CATALOG_CONNECTIONS = 9


class CatalogStore:
    """The catalog's connection and transactions, which the catalog's parts share
    (:class:`tenantry.shardmap.catalog.Catalog` is the whole catalog)."""

    def __init__(self, url: str | None = None, *, settings: TenantrySettings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.url: str = _catalog_url(url if url is not None else self.settings.catalog_url)
        self._engine: Engine = make_engine(
            self.url,
            connect_timeout=self.settings.connect_timeout,
            pool_size=2,
            max_overflow=4,
            pool_pre_ping=True,
        )
        unprepared_through_pooler(self._engine)
        self._ready = False
        self._lock = threading.Lock()
        self._fleet_id: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The catalog's engine (for tenantry's own modules)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Release the catalog's connections."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalog({mask_url(self.url)!r})"

    def init(self) -> str:
        """Create or upgrade the catalog schema; return its revision. Idempotent."""
        with self._errors(), self._engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            with conn.begin():
                if self.dialect == "postgresql":
                    # Two `tenantry init` at once: the second waits, then finds head.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INIT_LOCK_KEY})
                CATALOG.upgrade(conn)
                revision = CATALOG.current(conn)
        self._ready = True
        assert revision is not None
        return revision

    def revision(self) -> str | None:
        """The catalog schema's revision, or None when it was never initialised."""
        with self._errors(), self._engine.connect() as conn:
            return CATALOG.current(conn)

    def _missing_file(self) -> bool:
        """A SQLite catalog whose file does not exist (yet)."""
        parsed = sa.make_url(self.url)
        database = parsed.database or ""
        return (
            parsed.get_backend_name() == "sqlite"
            and not database.startswith("file:")
            and not os.path.exists(database)
        )

    def _check_ready(self) -> None:
        if self._ready:
            return
        if self._missing_file():
            # Looking would create an empty file where none was, and leave it behind.
            raise CatalogNotInitialized(
                f"there is no catalog at {mask_url(self.url)}: run `tenantry init` first, "
                "or set TENANTRY_CATALOG_URL to the fleet's catalog"
            )
        current = self.revision()
        if current is None:
            raise CatalogNotInitialized(
                f"the catalog at {mask_url(self.url)} has no tenantry schema: "
                "run `tenantry init` first"
            )
        if current != CATALOG.head:
            raise CatalogNotInitialized(
                f"the catalog at {mask_url(self.url)} is at schema revision {current}, "
                f"this tenantry needs {CATALOG.head}: run `tenantry init` to upgrade it"
            )
        self._ready = True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with translate_errors(
            f"the catalog at {mask_url(self.url)}", unavailable=CatalogUnavailable
        ):
            yield

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self._check_ready()
        with self._errors(), self._engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, int]]:
        """A write transaction that has bumped the map version (and so holds its lock)."""
        self._check_ready()
        with self._errors(), self._engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            with conn.begin():
                conn.execute(map_table.update().values(version=map_table.c.version + 1))
                version = int(conn.execute(sa.select(map_table.c.version)).scalar_one())
                if self.dialect == "postgresql":
                    conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(version))))
                if version % _PRUNE_EVERY == 0:
                    self._prune_changes(conn, version - CHANGES_KEPT)
                yield conn, version

    @staticmethod
    def _prune_changes(conn: Connection, below: int) -> None:
        """Forget the tenant changes of versions up to *below*: routers older than that
        reload the whole map."""
        conn.execute(map_changes.delete().where(map_changes.c.version <= below))
        conn.execute(
            map_table.update().where(map_table.c.changes_since < below).values(changes_since=below)
        )

    @staticmethod
    def _log_change(conn: Connection, tenant_id: str) -> None:
        """Record that this transaction's map version changes *tenant_id*."""
        conn.execute(
            map_changes.insert().from_select(
                ["version", "tenant_id"],
                sa.select(map_table.c.version, sa.literal(tenant_id, sa.String(63))),
            )
        )

    @contextmanager
    def transaction(self) -> Iterator[tuple[Connection, int]]:
        """A catalog write transaction with the map version bumped (for the mover)."""
        with self._write() as pair:
            yield pair

    @contextmanager
    def journal_transaction(self) -> Iterator[Connection]:
        """A catalog write transaction that leaves the map version alone.

        For records that routers do not route by (the move journal): no snapshot
        reload in every router for each step of a move.
        """
        self._check_ready()
        with self._errors(), self._engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            with conn.begin():
                yield conn

    @contextmanager
    def read_transaction(self) -> Iterator[Connection]:
        """A consistent read transaction on the catalog."""
        with self._read() as conn:
            yield conn

    def _get_shard(self, conn: Connection, name: str) -> Shard:
        row = conn.execute(sa.select(shards).where(shards.c.name == name)).first()
        if row is None:
            raise UnknownShard(name)
        return shard_from_row(row)

    def _get_tenant(self, conn: Connection, tenant_id: str) -> Tenant:
        row = conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise UnknownTenant(tenant_id)
        return tenant_from_row(row)


def _catalog_url(url: str) -> str:
    """The catalog's URL, checked; a relative SQLite path made absolute (the catalog is
    then the same file whatever directory a router or a command later runs in)."""
    parsed = parse_url(url, error=ConfigurationError)
    if parsed.get_backend_name() != "sqlite":
        return url
    if parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory SQLite catalog vanishes with its process: "
            "use sqlite:///path/to/catalog.db",
            field="catalog_url",
        )
    assert parsed.database is not None
    absolute = absolute_sqlite_path(parsed.database)
    if absolute == parsed.database:
        return url
    return parsed.set(database=absolute).render_as_string(hide_password=False)


def shard_from_row(row: Any) -> Shard:
    """The Shard of a ``tenantry_shards`` row."""
    return Shard(
        name=row.name,
        url=row.url,
        admin_url=row.admin_url,
        tier=Tier(row.tier),
        state=ShardState(row.state),
        weight=row.weight,
        pooled=row.pooled,
        created_at=as_utc(row.created_at),
    )


_TIERS = {t.value: t for t in Tier}
_TENANT_STATES = {s.value: s for s in TenantState}


#: A tenant's columns in a snapshot, in the order :func:`tenants_from_rows` reads them.
SNAPSHOT_COLUMNS = (
    tenants.c.id,
    tenants.c.shard,
    tenants.c.tier,
    tenants.c.pinned,
    tenants.c.state,
    tenants.c.created_at,
)


def tenants_from_rows(rows: Any) -> dict[str, Tenant]:
    """The snapshot's tenants: 100,000 of them are built in a fraction of a second."""
    tiers, states, utc = _TIERS, _TENANT_STATES, UTC
    found = {}
    for tenant_id, shard, tier, pinned, state, created in rows:
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=utc)
        found[tenant_id] = Tenant(
            tenant_id, shard, tiers[tier], bool(pinned), states[state], created
        )
    return found


def tenant_from_row(row: Any) -> Tenant:
    """The Tenant of a ``tenantry_tenants`` row."""
    return Tenant(
        id=row.id,
        shard=row.shard,
        tier=Tier(row.tier),
        pinned=bool(row.pinned),
        state=TenantState(row.state),
        created_at=as_utc(row.created_at),
    )
