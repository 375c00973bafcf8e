"""The catalog: the SQL store of the shard map (SQLite or PostgreSQL, same code).

Every change runs in one transaction that first bumps the map version; on PostgreSQL
that row lock also serialises concurrent writers, and the same transaction sends
``NOTIFY tenantry_map`` so that routers refresh. On SQLite the write transaction takes
the database lock at ``BEGIN IMMEDIATE`` for the same effect.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tenantry.errors import (
    CatalogNotInitialized,
    CatalogUnavailable,
    ConfigurationError,
    DatabaseAlreadyRegistered,
    InvalidShardUrl,
    NoSharedShard,
    PlacementError,
    ShardExists,
    ShardNotActive,
    ShardOccupied,
    TenantExists,
    TenantryError,
    TierMismatch,
    UnknownShard,
    UnknownTenant,
)
from tenantry.settings import TenantrySettings, load_settings
from tenantry.shardmap.connect import WRITE, make_engine, translate_errors
from tenantry.shardmap.identity import DatabaseIdentity, ensure_identity
from tenantry.shardmap.keys import FenceKey, current_key, install_key
from tenantry.shardmap.model import (
    MapDelta,
    MapSnapshot,
    Shard,
    ShardState,
    Tenant,
    TenantState,
    Tier,
    absolute_sqlite_path,
    mask_url,
    normalize_url,
    parse_url,
    validate_shard_name,
    validate_tenant_id,
)
from tenantry.shardmap.operations import operator_engine, operator_transaction
from tenantry.shardmap.residency import Residency, clear_residency, commit_residency
from tenantry.shardmap.ring import PlacementRing
from tenantry.shardmap.roles import verify_routing_role
from tenantry.shardmap.schema import fence_keys, map_changes, map_table, moves, shards, tenants
from tenantry.shardmap.scripts import CATALOG, SHARD

__all__ = ["NOTIFY_CHANNEL", "Catalog", "catalog_of"]

logger = logging.getLogger("tenantry.catalog")

#: PostgreSQL channel on which every map change is announced (payload: new version).
NOTIFY_CHANNEL = "tenantry_map"
#: How many map versions of tenant changes the catalog keeps for routers' refreshes;
#: a router further behind reloads the whole map.
CHANGES_KEPT = 10_000
_PRUNE_EVERY = 100

# Any constant works; it only has to be the same in every tenantry process.
_INIT_LOCK_KEY = 0x7E4A7C01


class Catalog:
    """The shard map's store.

    ``Catalog()`` opens the catalog named by the settings (``TENANTRY_CATALOG_URL``,
    by default a SQLite file under ``./.tenantry/``). Run :meth:`init` once to create
    or upgrade its schema.
    """

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

    def __enter__(self) -> Catalog:
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
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK_KEY})
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

    # -- reads ---------------------------------------------------------------------

    def map_version(self) -> int:
        """The current map version; every change bumps it."""
        with self._read() as conn:
            return int(conn.execute(sa.select(map_table.c.version)).scalar_one())

    def fleet_id(self) -> str:
        """This catalog's fleet id (c0007): it names the fleet's replication objects."""
        if self._fleet_id is None:
            with self._read() as conn:
                found = conn.execute(sa.select(map_table.c.fleet_id)).scalar_one()
            if not found:
                raise CatalogNotInitialized(
                    f"the catalog at {mask_url(self.url)} has no fleet id: run `tenantry init`"
                )
            self._fleet_id = str(found)
        return self._fleet_id

    def snapshot(self) -> MapSnapshot:
        """The whole map at one version, read in one consistent transaction."""
        with self._read() as conn:
            version = int(conn.execute(sa.select(map_table.c.version)).scalar_one())
            shard_rows = conn.execute(sa.select(shards)).all()
            tenant_rows = conn.execute(sa.select(*_SNAPSHOT_COLUMNS)).all()
        return MapSnapshot(
            version=version,
            shards={row.name: _shard(row) for row in shard_rows},
            tenants=_tenants_fast(tenant_rows),
        )

    def map_delta(self, since: int) -> MapDelta | None:
        """What changed after map version *since*: every shard, and the tenants added,
        changed or removed since. None when the change log does not reach back that far
        (then take a whole :meth:`snapshot`)."""
        with self._read() as conn:
            version, complete_from = conn.execute(
                sa.select(map_table.c.version, map_table.c.changes_since)
            ).one()
            if since < int(complete_from) or since > int(version):
                return None
            changed_ids = list(
                conn.execute(
                    sa.select(map_changes.c.tenant_id)
                    .where(map_changes.c.version > since)
                    .distinct()
                ).scalars()
            )
            rows: list[Any] = []
            for start in range(0, len(changed_ids), 1000):
                chunk = changed_ids[start : start + 1000]
                rows += conn.execute(
                    sa.select(*_SNAPSHOT_COLUMNS).where(tenants.c.id.in_(chunk))
                ).all()
            shard_rows = conn.execute(sa.select(shards)).all()
        changed = _tenants_fast(rows)
        return MapDelta(
            version=int(version),
            since=since,
            shards={row.name: _shard(row) for row in shard_rows},
            tenants=changed,
            removed=frozenset(changed_ids) - changed.keys(),
        )

    def get_shard(self, name: str) -> Shard:
        """The shard called *name*, or raise UnknownShard."""
        with self._read() as conn:
            return self._get_shard(conn, name)

    def list_shards(
        self, *, tier: Tier | str | None = None, state: ShardState | str | None = None
    ) -> list[Shard]:
        """Shards by name, optionally only those of one tier or state."""
        query = sa.select(shards).order_by(shards.c.name)
        if tier is not None:
            query = query.where(shards.c.tier == Tier(tier).value)
        if state is not None:
            query = query.where(shards.c.state == ShardState(state).value)
        with self._read() as conn:
            return [_shard(row) for row in conn.execute(query)]

    def get_tenant(self, tenant_id: str) -> Tenant:
        """The tenant *tenant_id*, or raise UnknownTenant."""
        validate_tenant_id(tenant_id)
        with self._read() as conn:
            return self._get_tenant(conn, tenant_id)

    def list_tenants(self, shard: str | None = None) -> list[Tenant]:
        """Tenants by id, optionally only those placed on *shard*."""
        query = sa.select(tenants).order_by(tenants.c.id)
        with self._read() as conn:
            if shard is not None:
                self._get_shard(conn, shard)
                query = query.where(tenants.c.shard == shard)
            return [_tenant(row) for row in conn.execute(query)]

    def propose_shard(self, tenant_id: str) -> str:
        """Where the ring would place a new shared tenant now (nothing is written)."""
        validate_tenant_id(tenant_id)
        with self._read() as conn:
            return self._ring_place(conn, tenant_id)

    # -- shard changes ---------------------------------------------------------------

    def add_shard(
        self,
        name: str,
        url: str,
        *,
        admin_url: str | None = None,
        tier: Tier | str = Tier.SHARED,
        weight: int = 1,
        prepare: bool = True,
        allow_unsafe_routing_role: bool | None = None,
    ) -> Shard:
        """Register a database as a shard.

        With *prepare* (the default) the shard is first connected to through its
        operations role and given tenantry's per-shard tables (residency, identity), so
        an unreachable or unusable database is refused before it is registered, and so
        is a database registered already under another name, however its URL is spelled
        (:class:`DatabaseAlreadyRegistered`). Without *prepare* its identity is recorded
        by the next ``tenantry migrate upgrade``.

        With *prepare*, a shared PostgreSQL shard is also connected to as its routing
        role: one that row-level security would not bind (a superuser, BYPASSRLS, an
        owner of the tables, the operations role) is refused with
        :class:`UnsafeRoutingRole`, unless *allow_unsafe_routing_role* (default: the
        setting of that name), which logs a warning.
        """
        validate_shard_name(name)
        tier = Tier(tier)
        _check_weight(name, weight)
        try:
            shard = Shard(
                name=name,
                url=normalize_url(url),
                admin_url=normalize_url(admin_url) if admin_url else None,
                tier=tier,
                weight=weight,
                created_at=datetime.now(UTC),
            )
        except InvalidShardUrl as exc:
            exc.shard = name
            raise
        if shard.backend != (
            (shard.admin_url and Shard(name, shard.admin_url).backend) or shard.backend
        ):
            raise PlacementError(
                "url and admin_url must name the same kind of database", shard=name
            )
        with self._write() as (conn, _version):
            if conn.execute(sa.select(shards.c.name).where(shards.c.name == name)).first():
                raise ShardExists(name)
            database_id: str | None = None
            if prepare:
                identity = prepare_shard(shard, connect_timeout=self.settings.connect_timeout)
                database_id = identity.database_id
                self._check_unregistered(conn, name, database_id)
            if prepare:
                _check_routing_role(shard, self.settings, allow_unsafe_routing_role, added=True)
            conn.execute(
                shards.insert().values(
                    name=shard.name,
                    url=shard.url,
                    admin_url=shard.admin_url,
                    tier=shard.tier.value,
                    state=shard.state.value,
                    weight=shard.weight,
                    created_at=shard.created_at,
                    database_id=database_id,
                )
            )
        logger.info("added shard %s (%s)", name, tier.value)
        return shard

    def database_ids(self) -> dict[str, str | None]:
        """Each shard's recorded database identity (None: not recorded yet)."""
        with self._read() as conn:
            rows = conn.execute(sa.select(shards.c.name, shards.c.database_id)).all()
        return {name: database_id for name, database_id in rows}

    def record_database_id(self, name: str, database_id: str) -> str | None:
        """Record the identity read from shard *name*'s database (``migrate upgrade``
        fills it for shards registered before identities existed).

        Raises :class:`DatabaseAlreadyRegistered` when another shard has this identity:
        the two names are one database. Returns a warning when the shard had another
        identity recorded (its database was restored or recreated), else None.
        """
        with self.journal_transaction() as conn:
            recorded = conn.execute(
                sa.select(shards.c.database_id).where(shards.c.name == name)
            ).first()
            if recorded is None:
                raise UnknownShard(name)
            if recorded[0] == database_id:
                return None
            self._check_unregistered(conn, name, database_id, registered=True)
            conn.execute(
                shards.update().where(shards.c.name == name).values(database_id=database_id)
            )
        if recorded[0] is None:
            return None
        return (
            f"shard {name!r}: its database has a new identity (restored, recreated or its "
            "URL changed); recorded the new one"
        )

    @staticmethod
    def _check_unregistered(
        conn: Connection, name: str, database_id: str, *, registered: bool = False
    ) -> None:
        other = conn.execute(
            sa.select(shards.c.name).where(
                shards.c.database_id == database_id, shards.c.name != name
            )
        ).scalar_one_or_none()
        if other is None:
            return
        message = None
        if registered:
            message = (
                f"shard {name!r} is the database of shard {other!r} (same database, another "
                f"spelling of its URL): moves between them would lose data; remove one with "
                f"`tenantry shard remove {name}`"
            )
        raise DatabaseAlreadyRegistered(name, other, message=message)

    def set_shard_urls(
        self,
        name: str,
        url: str,
        *,
        admin_url: str | None = None,
        allow_unsafe_routing_role: bool | None = None,
    ) -> Shard:
        """Point shard *name* at new URLs of the same database: *url* for routing,
        *admin_url* for operations (None: *url* serves both); ``tenantry shard secure``
        uses it. A shared PostgreSQL shard's routing role is checked as by
        :meth:`add_shard`. Bumps the map version, so routers take the new URL."""
        try:
            new_url = normalize_url(url)
            new_admin = normalize_url(admin_url) if admin_url else None
        except InvalidShardUrl as exc:
            exc.shard = name
            raise
        with self._write() as (conn, _version):
            shard = self._get_shard(conn, name)
            for candidate in (new_url, new_admin):
                if candidate is not None and _place(candidate) != _place(shard.operations_url):
                    raise PlacementError(
                        f"shard {name!r}: the new URL {mask_url(candidate)} names another "
                        f"database than {mask_url(shard.operations_url)}",
                        shard=name,
                    )
            updated = dataclasses.replace(shard, url=new_url, admin_url=new_admin)
            _check_routing_role(updated, self.settings, allow_unsafe_routing_role)
            conn.execute(
                shards.update()
                .where(shards.c.name == name)
                .values(url=updated.url, admin_url=updated.admin_url)
            )
            shard = self._get_shard(conn, name)
        logger.info("shard %s: new URLs (%s)", name, mask_url(shard.url))
        return shard

    def set_shard_state(
        self, name: str, state: ShardState | str, *, for_move: int | None = None
    ) -> Shard:
        """Mark a shard active, draining or retired (see :meth:`update_shard`)."""
        return self.update_shard(name, state=state, for_move=for_move)

    def set_shard_weight(self, name: str, weight: int) -> Shard:
        """Change a shared shard's weight (its share of new tenants and of the load)."""
        return self.update_shard(name, weight=weight)

    def update_shard(
        self,
        name: str,
        *,
        state: ShardState | str | None = None,
        weight: int | None = None,
        for_move: int | None = None,
    ) -> Shard:
        """Change a shard's state and its weight in one transaction: a refused change
        changes nothing.

        A shard that still holds tenants cannot be retired: move them away first; nor can
        the target of a live move be drained or retired (the tenant would land on it),
        nor the source of one retired, except by that move itself (*for_move*).
        """
        new_state = ShardState(state) if state is not None else None
        if weight is not None:
            _check_weight(name, weight)
        with self._write() as (conn, _version):
            self._get_shard(conn, name)
            values: dict[str, object] = {}
            if new_state is not None:
                if new_state is not ShardState.ACTIVE:
                    self._refuse_if_moving(
                        conn,
                        name,
                        f"marked {new_state.value}",
                        ends=("target",)
                        if new_state is ShardState.DRAINING
                        else ("source", "target"),
                        for_move=for_move,
                    )
                if new_state is ShardState.RETIRED:
                    count = conn.execute(
                        sa.select(sa.func.count())
                        .select_from(tenants)
                        .where(tenants.c.shard == name)
                    ).scalar_one()
                    if count:
                        raise PlacementError(
                            f"shard {name!r} still holds {count} tenant(s): drain it before "
                            "retiring it",
                            shard=name,
                        )
                values["state"] = new_state.value
            if weight is not None:
                values["weight"] = weight
            if values:
                conn.execute(shards.update().where(shards.c.name == name).values(**values))
            return self._get_shard(conn, name)

    # -- tenant changes ----------------------------------------------------------------

    def add_tenant(
        self,
        tenant_id: str,
        *,
        tier: Tier | str = Tier.SHARED,
        shard: str | None = None,
        pinned: bool = False,
    ) -> Tenant:
        """Register a tenant and place it.

        A shared tenant goes to *shard* if given, else where the consistent-hash ring
        over the active shared shards says; a dedicated tenant needs *shard*, a
        dedicated shard holding no other tenant. The residency row on the shard is
        written before the catalog commits, so the tenant is routable at once.
        """
        validate_tenant_id(tenant_id)
        tier = Tier(tier)
        if tier is Tier.DEDICATED and shard is None:
            raise PlacementError(
                "a dedicated tenant needs its own shard: add one with "
                "`tenantry shard add NAME URL --tier dedicated`, then pass --shard NAME",
                tenant_id=tenant_id,
            )
        written: Shard | None = None
        try:
            with self._write() as (conn, version):
                existing = conn.execute(
                    sa.select(tenants.c.shard).where(tenants.c.id == tenant_id)
                ).scalar_one_or_none()
                if existing is not None:
                    raise TenantExists(tenant_id, existing)
                name = shard if shard is not None else self._ring_place(conn, tenant_id)
                target = self._get_shard(conn, name)
                self._check_home(conn, tenant_id, tier, target)
                set_residency(target, tenant_id, Residency.ACTIVE, version, self.settings)
                written = target
                created = datetime.now(UTC)
                conn.execute(
                    tenants.insert().values(
                        id=tenant_id,
                        shard=target.name,
                        tier=tier.value,
                        pinned=pinned,
                        state=TenantState.ACTIVE.value,
                        created_at=created,
                    )
                )
                self._log_change(conn, tenant_id)
        except BaseException:
            if written is not None:
                # The catalog did not commit: take back the residency row we wrote.
                with suppress(TenantryError):
                    drop_residency(written, tenant_id, self.settings)
            raise
        logger.info("added tenant %s on shard %s", tenant_id, target.name)
        return Tenant(tenant_id, target.name, tier, pinned, TenantState.ACTIVE, created)

    def remove_tenant(self, tenant_id: str) -> Tenant:
        """Unregister a tenant; routers stop serving it. Only the registration: its rows
        stay on its shard, and a tenant added again with this id would see them.

        :func:`tenantry.moves.remove_tenant` (what ``tenantry tenant remove`` runs)
        refuses while the tenant has rows, or purges them first, then calls this.
        """
        validate_tenant_id(tenant_id)
        with self._write() as (conn, version):
            tenant = self._get_tenant(conn, tenant_id)
            shard = self._get_shard(conn, tenant.shard)
            live = conn.execute(
                sa.select(moves.c.id).where(
                    moves.c.tenant_id == tenant_id, moves.c.ended_at.is_(None)
                )
            ).scalar_one_or_none()
            if live is not None:
                raise PlacementError(
                    f"tenant {tenant_id!r} is being moved (move {live}): finish it with "
                    f"`tenantry moves resume {live}` or `tenantry moves abort {live}` first",
                    tenant_id=tenant_id,
                )
            # Fence first, so a router with an old map cannot write after we return.
            set_residency(shard, tenant_id, Residency.MOVED, version, self.settings)
            conn.execute(tenants.delete().where(tenants.c.id == tenant_id))
            self._log_change(conn, tenant_id)
        with suppress(TenantryError):
            drop_residency(shard, tenant_id, self.settings)
        logger.info("removed tenant %s from shard %s", tenant_id, tenant.shard)
        return tenant

    def set_pinned(self, tenant_id: str, pinned: bool) -> Tenant:
        """Pin a tenant (the rebalancer never moves it) or unpin it."""
        validate_tenant_id(tenant_id)
        with self._write() as (conn, _version):
            self._get_tenant(conn, tenant_id)
            conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(pinned=pinned))
            self._log_change(conn, tenant_id)
            return self._get_tenant(conn, tenant_id)

    def set_placement(
        self,
        tenant_id: str,
        shard: str,
        *,
        conn: Connection | None = None,
        check: bool = True,
    ) -> tuple[Tenant, int]:
        """Point the tenant's placement at *shard*; return the tenant and new map version.

        This changes only the directory. The mover calls it inside its switch step,
        after the data is verified at *shard* and with the residency rows updated; the
        tier follows the new shard's.
        """
        if conn is not None:
            return self._set_placement(conn, tenant_id, shard, check=check)
        with self._write() as (own, _version):
            return self._set_placement(own, tenant_id, shard, check=check)

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

    # -- fence keys ----------------------------------------------------------------

    def fence_key(self, name: str, *, resync: bool = False) -> FenceKey:
        """The key routers sign the fences of PostgreSQL shard *name* with.

        Read from the catalog. When the catalog has none yet (a shard registered before
        the signed fence), or with *resync*, it is read from the shard through its
        operations role and stored. Never printed or logged.
        """
        if not resync:
            with self._read() as conn:
                row = conn.execute(
                    sa.select(fence_keys.c.key_id, fence_keys.c.secret).where(
                        fence_keys.c.shard == name
                    )
                ).first()
            if row is not None:
                return FenceKey(int(row[0]), bytes(row[1]))
        shard = self.get_shard(name)
        with operator_transaction(shard, connect_timeout=self.settings.connect_timeout) as conn:
            key = current_key(conn)
        if key is None:
            raise ConfigurationError(
                f"shard {name!r} has no fence key: its tenantry tables predate the signed "
                "fence; run `tenantry migrate upgrade`"
            )
        self._store_fence_key(name, key)
        return key

    def rotate_fence_key(self, name: str, *, retire_previous: bool = False) -> FenceKey:
        """Give PostgreSQL shard *name* a new fence key; return it (never print it).

        The shard keeps accepting the previous key, so routers that still sign with it
        go on working until they read the new one; *retire_previous* stops accepting it
        at once (routers then fail one fence, read the new key and retry).
        """
        shard = self.get_shard(name)
        if shard.backend != "postgresql":
            raise ConfigurationError(
                f"shard {name!r} is SQLite: SQLite shards have no row-level security and "
                "no fence key"
            )
        with operator_transaction(shard, connect_timeout=self.settings.connect_timeout) as conn:
            if current_key(conn) is None:
                raise ConfigurationError(
                    f"shard {name!r} has no fence key to rotate: run `tenantry migrate "
                    "upgrade` first"
                )
            key = install_key(conn, retire_previous=retire_previous)
        self._store_fence_key(name, key)
        logger.info("rotated the fence key of shard %s (key %d)", name, key.key_id)
        return key

    def _store_fence_key(self, name: str, key: FenceKey) -> None:
        # An upsert: routers that meet a shard the catalog has no key for yet all read it
        # from the shard at once, and each stores it; a newer key is never replaced by
        # an older one read a moment before a rotation.
        insert: Any = (
            postgresql_insert(fence_keys)
            if self.dialect == "postgresql"
            else sqlite_insert(fence_keys)
        )
        values = {"key_id": key.key_id, "secret": key.secret, "updated_at": datetime.now(UTC)}
        statement = insert.values(shard=name, **values)
        with self.journal_transaction() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[fence_keys.c.shard],
                    set_=values,
                    where=fence_keys.c.key_id <= statement.excluded.key_id,
                )
            )

    @contextmanager
    def read_transaction(self) -> Iterator[Connection]:
        """A consistent read transaction on the catalog."""
        with self._read() as conn:
            yield conn

    def remove_shard(self, name: str, *, for_move: int | None = None) -> Shard:
        """Unregister a shard that holds no tenant (its database is left alone).

        Not while a live move has it as source or target, except that move itself
        (*for_move*: a dropped source, an aborted promote's new database).
        """
        with self._write() as (conn, _version):
            shard = self._get_shard(conn, name)
            self._refuse_if_moving(
                conn, name, "removed", ends=("source", "target"), for_move=for_move
            )
            held = list(
                conn.execute(
                    sa.select(tenants.c.id).where(tenants.c.shard == name).order_by(tenants.c.id)
                ).scalars()
            )
            if held:
                shown = ", ".join(held[:5]) + (f" +{len(held) - 5}" if len(held) > 5 else "")
                raise PlacementError(
                    f"shard {name!r} still holds {len(held)} tenant(s) ({shown}): move them "
                    "away first (`tenantry move`, or `tenantry shard drain` for a shared shard)",
                    shard=name,
                )
            conn.execute(fence_keys.delete().where(fence_keys.c.shard == name))
            conn.execute(shards.delete().where(shards.c.name == name))
        logger.info("removed shard %s", name)
        return shard

    @staticmethod
    def _refuse_if_moving(
        conn: Connection,
        name: str,
        what: str,
        *,
        ends: tuple[str, ...],
        for_move: int | None,
    ) -> None:
        """Refuse, naming the move, when a live move has shard *name* at one of *ends*."""
        clauses = [getattr(moves.c, end) == name for end in ends]
        query = sa.select(moves.c.id, moves.c.tenant_id, moves.c.source, moves.c.target).where(
            moves.c.ended_at.is_(None), sa.or_(*clauses)
        )
        if for_move is not None:
            query = query.where(moves.c.id != for_move)
        live = conn.execute(query.order_by(moves.c.id)).first()
        if live is None:
            return
        end = "target" if live.target == name else "source"
        raise PlacementError(
            f"shard {name!r} cannot be {what}: it is the {end} of live move {live.id} "
            f"(tenant {live.tenant_id!r}); finish it with `tenantry moves resume {live.id}` "
            f"or `tenantry moves abort {live.id}` first",
            shard=name,
        )

    def set_tenant_state(self, conn: Connection, tenant_id: str, state: TenantState) -> None:
        """Mark a tenant active or moving, in the caller's catalog transaction."""
        conn.execute(
            tenants.update().where(tenants.c.id == tenant_id).values(state=TenantState(state).value)
        )
        self._log_change(conn, tenant_id)

    def _set_placement(
        self, conn: Connection, tenant_id: str, shard: str, *, check: bool
    ) -> tuple[Tenant, int]:
        tenant = self._get_tenant(conn, tenant_id)
        target = self._get_shard(conn, shard)
        if check:
            self._check_home(conn, tenant_id, target.tier, target)
        conn.execute(
            tenants.update()
            .where(tenants.c.id == tenant_id)
            .values(shard=target.name, tier=target.tier.value)
        )
        self._log_change(conn, tenant_id)
        version = int(conn.execute(sa.select(map_table.c.version)).scalar_one())
        del tenant
        return self._get_tenant(conn, tenant_id), version

    # -- helpers ------------------------------------------------------------------------

    def _get_shard(self, conn: Connection, name: str) -> Shard:
        row = conn.execute(sa.select(shards).where(shards.c.name == name)).first()
        if row is None:
            raise UnknownShard(name)
        return _shard(row)

    def _get_tenant(self, conn: Connection, tenant_id: str) -> Tenant:
        row = conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        if row is None:
            raise UnknownTenant(tenant_id)
        return _tenant(row)

    def _ring_place(self, conn: Connection, tenant_id: str) -> str:
        ring = PlacementRing.for_shards(_shard(row) for row in conn.execute(sa.select(shards)))
        name = ring.place(tenant_id)
        if name is None:
            raise NoSharedShard(
                "no active shared shard to place the tenant on: add one with "
                "`tenantry shard add NAME URL`",
                tenant_id=tenant_id,
            )
        return name

    def _check_home(self, conn: Connection, tenant_id: str, tier: Tier, shard: Shard) -> None:
        if shard.state is not ShardState.ACTIVE:
            raise ShardNotActive(
                f"shard {shard.name!r} is {shard.state.value} and takes no tenants: "
                "choose an active shard",
                tenant_id=tenant_id,
                shard=shard.name,
            )
        if tier is not shard.tier:
            raise TierMismatch(
                f"a {tier.value} tenant cannot live on {shard.tier.value} shard "
                f"{shard.name!r}: choose a {tier.value} shard",
                tenant_id=tenant_id,
                shard=shard.name,
            )
        if tier is Tier.DEDICATED:
            other = conn.execute(
                sa.select(tenants.c.id)
                .where(tenants.c.shard == shard.name, tenants.c.id != tenant_id)
                .limit(1)
            ).scalar_one_or_none()
            if other is not None:
                raise ShardOccupied(
                    f"dedicated shard {shard.name!r} already holds tenant {other!r}: "
                    "give each dedicated tenant its own shard",
                    tenant_id=tenant_id,
                    shard=shard.name,
                )


def catalog_of(target: object) -> Catalog:
    """*target* when it is a :class:`Catalog`, else its ``catalog`` (a router's); what
    the fleet migrations, provisioning and moves accept as "a catalog or a router"."""
    if isinstance(target, Catalog):
        return target
    catalog = getattr(target, "catalog", None)
    if isinstance(catalog, Catalog):
        return catalog
    raise TypeError(f"expected a Catalog or a Router, got {type(target).__name__}")


def _check_routing_role(
    shard: Shard, settings: TenantrySettings, allow: bool | None, *, added: bool = False
) -> None:
    """Refuse a shared PostgreSQL shard whose routing role row-level security does not
    bind (tenantry.shardmap.roles has the check), unless allowed."""
    if shard.tier is not Tier.SHARED or shard.backend != "postgresql":
        return
    fix = None
    if added:
        fix = (
            f"add it with `tenantry shard add {shard.name} URL --secure` (a routing role "
            "with only the grants it needs), or give a routing role's URL and this one as "
            "--admin-url"
        )
    verify_routing_role(shard, settings, allow=allow, fix=fix)


def _place(url: str) -> tuple[str, str | None, int | None, str | None]:
    """Which database a URL names: backend, host, port, database."""
    parsed = sa.make_url(url)
    return parsed.get_backend_name(), parsed.host, parsed.port, parsed.database


def _check_weight(name: str, weight: object) -> None:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 10_000:
        raise PlacementError(
            f"invalid weight {weight!r}: use a whole number from 0 to 10000", shard=name
        )


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


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything tenantry stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _shard(row: Any) -> Shard:
    return Shard(
        name=row.name,
        url=row.url,
        admin_url=row.admin_url,
        tier=Tier(row.tier),
        state=ShardState(row.state),
        weight=row.weight,
        created_at=_utc(row.created_at),
    )


_TIERS = {t.value: t for t in Tier}
_TENANT_STATES = {s.value: s for s in TenantState}


#: A tenant's columns in a snapshot, in the order :func:`_tenants_fast` reads them.
_SNAPSHOT_COLUMNS = (
    tenants.c.id,
    tenants.c.shard,
    tenants.c.tier,
    tenants.c.pinned,
    tenants.c.state,
    tenants.c.created_at,
)


def _tenants_fast(rows: Any) -> dict[str, Tenant]:
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


def _tenant(row: Any) -> Tenant:
    return Tenant(
        id=row.id,
        shard=row.shard,
        tier=Tier(row.tier),
        pinned=bool(row.pinned),
        state=TenantState(row.state),
        created_at=_utc(row.created_at),
    )


# -- the shard side -------------------------------------------------------------------


def prepare_shard(shard: Shard, *, connect_timeout: float = 5.0) -> DatabaseIdentity:
    """Create or upgrade tenantry's own tables on the shard; return the identity of its
    database (made, or repaired in a copy of another database, first when needed)."""
    with operator_transaction(shard, connect_timeout=connect_timeout) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK_KEY})
        SHARD.upgrade(conn)
        identity = ensure_identity(conn)
    return identity


def set_residency(
    shard: Shard, tenant_id: str, state: Residency, version: int, settings: TenantrySettings
) -> None:
    """Write the tenant's residency row on *shard* and commit it there."""
    with operator_engine(shard, connect_timeout=settings.connect_timeout) as engine:
        commit_residency(engine, tenant_id, state, version)


def drop_residency(shard: Shard, tenant_id: str, settings: TenantrySettings) -> None:
    """Delete the tenant's residency row on *shard*."""
    with operator_transaction(shard, connect_timeout=settings.connect_timeout) as conn:
        clear_residency(conn, tenant_id)
