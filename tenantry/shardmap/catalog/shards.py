"""Shard registration in the catalog: adding, re-pointing, re-weighting, draining,
retiring and removing shards, each database registered once (its identity), and the
fence keys routers sign with per shard."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tenantry.errors import (
    ConfigurationError,
    DatabaseAlreadyRegistered,
    InvalidShardUrl,
    PlacementError,
    PoolerInTheWay,
    ShardExists,
    UnknownShard,
)
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog.store import INIT_LOCK_KEY, CatalogStore, shard_from_row
from tenantry.shardmap.dedicated import mark_tier
from tenantry.shardmap.identity import DatabaseIdentity, ensure_identity
from tenantry.shardmap.keys import FenceKey, current_key, install_key
from tenantry.shardmap.model import (
    Shard,
    ShardState,
    Tier,
    mask_url,
    normalize_url,
    validate_shard_name,
)
from tenantry.shardmap.operations import operator_transaction, shard_errors
from tenantry.shardmap.poolers import pooler_message, url_through_pooler
from tenantry.shardmap.roles import verify_routing_role
from tenantry.shardmap.schema import fence_keys, moves, shards, tenants
from tenantry.shardmap.scripts import SHARD

__all__ = ["ShardRegistry", "prepare_shard"]

logger = logging.getLogger("tenantry.catalog")


class ShardRegistry(CatalogStore):
    """The catalog's shards (a part of :class:`tenantry.shardmap.catalog.Catalog`)."""

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
            return [shard_from_row(row) for row in conn.execute(query)]

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
        pooled: bool | None = None,
    ) -> Shard:
        """Register a database as a shard.

        *pooled* says that *url* reaches the server through a connection pooler in
        transaction mode (PgBouncer, say); None (the default) finds out with *prepare*
        (one query through *url*), else means no. Its operations URL (*admin_url*) must
        reach the server itself: a pooler there is refused with
        :class:`PoolerInTheWay`, and so is a pooled *url* without an *admin_url*.

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
        shard = _new_shard(name, url, admin_url, tier, weight)
        if prepare and pooled is None and shard.backend == "postgresql":
            timeout = self.settings.connect_timeout
            with shard_errors(shard):
                pooled = url_through_pooler(shard.url, connect_timeout=timeout)
        shard = _pooled_shard(shard, bool(pooled))
        with self._write() as (conn, _version):
            if conn.execute(sa.select(shards.c.name).where(shards.c.name == name)).first():
                raise ShardExists(name)
            database_id: str | None = None
            if prepare:
                identity = prepare_shard(
                    shard,
                    connect_timeout=self.settings.connect_timeout,
                    constant=self.settings.dedicated_constant,
                )
                database_id = identity.database_id
                self._check_unregistered(conn, name, database_id)
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
                    pooled=shard.pooled,
                )
            )
        logger.info(
            "added shard %s (%s%s)", name, shard.tier.value, ", pooled" if shard.pooled else ""
        )
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
        with _naming_shard(name):
            new_url = normalize_url(url)
            new_admin = normalize_url(admin_url) if admin_url else None
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

    def fence_keys(self) -> dict[str, FenceKey]:
        """Every fence key the catalog holds, by shard name (one query): what a router
        reads once rather than one shard at a time (a router of 1,000 dedicated shards
        would otherwise read the catalog on each shard's first transaction). Shards
        without a key yet are absent: :meth:`fence_key` reads theirs from the shard."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(fence_keys.c.shard, fence_keys.c.key_id, fence_keys.c.secret)
            )
            return {
                str(name): FenceKey(int(key_id), bytes(secret)) for name, key_id, secret in rows
            }

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


def _new_shard(name: str, url: str, admin_url: str | None, tier: Tier | str, weight: int) -> Shard:
    """The shard to register, its name, tier, weight and URLs checked."""
    validate_shard_name(name)
    tier = Tier(tier)
    _check_weight(name, weight)
    with _naming_shard(name):
        shard = Shard(
            name=name,
            url=normalize_url(url),
            admin_url=normalize_url(admin_url) if admin_url else None,
            tier=tier,
            weight=weight,
            created_at=datetime.now(UTC),
        )
    if shard.backend != (
        (shard.admin_url and Shard(name, shard.admin_url).backend) or shard.backend
    ):
        raise PlacementError("url and admin_url must name the same kind of database", shard=name)
    return shard


def _pooled_shard(shard: Shard, pooled: bool) -> Shard:
    """*shard*, routed through a pooler when *pooled*: which needs PostgreSQL and an
    operations URL of its own (the server's)."""
    if not pooled:
        return shard
    if shard.backend != "postgresql":
        raise ConfigurationError(
            f"shard {shard.name!r}: only PostgreSQL shards can be routed through a pooler",
            field="pooled",
        )
    if shard.admin_url is None or shard.admin_url == shard.url:
        raise PoolerInTheWay(pooler_message(shard.name, shard.url), shard=shard.name)
    return dataclasses.replace(shard, pooled=True)


@contextmanager
def _naming_shard(name: str) -> Iterator[None]:
    """An invalid URL's error names the shard it was given for."""
    try:
        yield
    except InvalidShardUrl as exc:
        exc.shard = name
        raise


def _place(url: str) -> tuple[str, str | None, int | None, str | None]:
    """Which database a URL names: backend, host, port, database."""
    parsed = sa.make_url(url)
    return parsed.get_backend_name(), parsed.host, parsed.port, parsed.database


def _check_weight(name: str, weight: object) -> None:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 10_000:
        raise PlacementError(
            f"invalid weight {weight!r}: use a whole number from 0 to 10000", shard=name
        )


def prepare_shard(
    shard: Shard, *, connect_timeout: float = 5.0, constant: bool = True
) -> DatabaseIdentity:
    """Create or upgrade tenantry's own tables on the shard; return the identity of its
    database (made, or repaired in a copy of another database, first when needed). A
    dedicated shard is marked dedicated unless not *constant* (the setting
    ``dedicated_constant``: :func:`~tenantry.shardmap.dedicated.mark_tier`)."""
    with operator_transaction(shard, connect_timeout=connect_timeout) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INIT_LOCK_KEY})
        SHARD.upgrade(conn)
        identity = ensure_identity(conn)
        mark_tier(conn, shard.tier, constant=constant)
    return identity
