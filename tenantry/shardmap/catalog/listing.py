"""Targeted reads of the catalog for listings and look-ups of one tenant or shard.

A fleet of 100,000 tenants is too big to load whole (``snapshot()``) to answer for one
tenant or to print a listing: these reads ask the catalog for what they show.
:meth:`MapListing.iter_tenants` streams tenants in id order, a batch at a time by keyset
pagination (each batch a short read transaction of its own, so a slow reader of the
output holds no catalog transaction open); the look-ups read one tenant or one shard,
and the shards' tenant counts come from one ``GROUP BY``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import InvalidTenantId
from tenantry.shardmap.catalog.store import (
    SNAPSHOT_COLUMNS,
    CatalogStore,
    shard_from_row,
)
from tenantry.shardmap.model import (
    Shard,
    ShardState,
    Tenant,
    TenantState,
    Tier,
    as_utc,
    validate_tenant_id,
)
from tenantry.shardmap.schema import map_table, shards, tenants

__all__ = ["DEFAULT_BATCH", "ID_BATCH", "MapListing", "Route", "ShardListing"]

#: Tenants read per query when streaming a listing.
DEFAULT_BATCH = 2000
#: Ids read per query when streaming ids alone.
ID_BATCH = 10_000

_TIERS = {t.value: t for t in Tier}
_STATES = {s.value: s for s in TenantState}

#: What a tenant id may start with (the characters of the id rule).
_PREFIX = re.compile(r"[a-z0-9_-]{0,63}")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one tenant lives, read at one map version."""

    tenant: Tenant
    shard: Shard
    map_version: int


@dataclass(frozen=True, slots=True)
class ShardListing:
    """Shards with their tenant counts, read at one map version."""

    map_version: int
    shards: Sequence[tuple[Shard, int]]


class MapListing(CatalogStore):
    """The catalog's targeted reads (a part of :class:`tenantry.shardmap.catalog.Catalog`)."""

    def iter_tenants(
        self,
        *,
        shard: str | None = None,
        tier: Tier | str | None = None,
        state: TenantState | str | None = None,
        pinned: bool | None = None,
        prefix: str | None = None,
        after: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> Iterator[Tenant]:
        """Tenants in id order, streamed: *batch_size* per query, by keyset pagination.

        Filters: on *shard* (which must exist: UnknownShard), of *tier*, in *state*,
        pinned or not, whose id starts with *prefix*; *after* starts after that id (the
        last of a previous page), *offset* skips that many more, *limit* stops there.
        The arguments are checked and the first batch read before this returns, so a
        bad argument raises here rather than half-way through the output. Each batch is
        a read transaction of its own: a tenant added or removed while the listing runs
        may or may not be in it, but no tenant is listed twice or skipped.
        """
        rows = self.iter_tenant_rows(
            shard=shard,
            tier=tier,
            state=state,
            pinned=pinned,
            prefix=prefix,
            after=after,
            offset=offset,
            limit=limit,
            batch_size=batch_size,
        )
        return (Tenant(i, s, _TIERS[t], bool(p), _STATES[st], c) for i, s, t, p, st, c in rows)

    def iter_tenant_rows(
        self,
        *,
        shard: str | None = None,
        tier: Tier | str | None = None,
        state: TenantState | str | None = None,
        pinned: bool | None = None,
        prefix: str | None = None,
        after: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        batch_size: int = DEFAULT_BATCH,
        created: bool = True,
        ids_only: bool = False,
    ) -> Iterator[tuple[Any, ...]]:
        """:meth:`iter_tenants` as plain tuples, for output at scale: ``(id, shard,
        tier, pinned, state, created_at)`` with tier and state as their values and
        created_at an aware time (left out when not *created*, which saves parsing it;
        only ``(id,)`` with *ids_only*).
        """
        if offset < 0 or (limit is not None and limit < 0) or batch_size < 1:
            raise ValueError("offset and limit must be >= 0, batch_size >= 1")
        where = self._tenant_filter(shard, tier, state, pinned, prefix)
        if after is not None:
            validate_tenant_id(after)
        if ids_only:
            created = False
            columns: Sequence[Any] = (tenants.c.id,)
        else:
            columns = SNAPSHOT_COLUMNS if created else SNAPSHOT_COLUMNS[:5]
        query = sa.select(*columns).where(*where).order_by(tenants.c.id)

        def page(conn: Connection, start: str | None, skip: int, count: int) -> list[Any]:
            q = query if start is None else query.where(tenants.c.id > start)
            q = q.limit(count)
            if skip:
                q = q.offset(skip)
            if ids_only:
                return [(i,) for i in conn.execute(q).scalars()]
            rows = conn.execute(q).all()
            if created and rows and self.dialect == "sqlite":
                # SQLite hands back naive times; everything tenantry stores is UTC
                return [(*row[:5], as_utc(row[5])) for row in rows]
            return [tuple(row) for row in rows]

        first_count = batch_size if limit is None else min(batch_size, limit)
        with self._read() as conn:
            if shard is not None:
                self._get_shard(conn, shard)
            first = page(conn, after, offset, first_count) if first_count else []
        return self._more_rows(page, first, first_count, limit, batch_size)

    def _more_rows(
        self,
        page: Any,
        batch: list[Any],
        asked: int,
        limit: int | None,
        batch_size: int,
    ) -> Iterator[tuple[Any, ...]]:
        """The generator behind :meth:`iter_tenant_rows`: yield a batch, read the next."""
        left = limit
        while batch:
            yield from batch
            if left is not None:
                left -= len(batch)
            if len(batch) < asked or left == 0:
                return
            asked = batch_size if left is None else min(batch_size, left)
            last = batch[-1][0]
            with self._read() as conn:
                batch = page(conn, last, 0, asked)

    def iter_tenant_ids(
        self,
        *,
        shard: str | None = None,
        prefix: str | None = None,
        limit: int | None = None,
        batch_size: int = ID_BATCH,
    ) -> Iterator[str]:
        """Tenant ids in order, on *shard* (which must exist) and/or starting with
        *prefix*, streamed as :meth:`iter_tenants` does but reading the id alone, in
        larger batches (``shard show`` of a shard of 25,000 tenants)."""
        rows = self.iter_tenant_rows(
            shard=shard, prefix=prefix, limit=limit, batch_size=batch_size, ids_only=True
        )
        return (row[0] for row in rows)

    def count_tenants(
        self,
        *,
        shard: str | None = None,
        tier: Tier | str | None = None,
        state: TenantState | str | None = None,
        pinned: bool | None = None,
        prefix: str | None = None,
    ) -> int:
        """How many tenants the filters of :meth:`iter_tenants` match (one ``COUNT``)."""
        where = self._tenant_filter(shard, tier, state, pinned, prefix)
        with self._read() as conn:
            if shard is not None:
                self._get_shard(conn, shard)
            query = sa.select(sa.func.count()).select_from(tenants).where(*where)
            return int(conn.execute(query).scalar_one())

    def tenant_counts(self) -> dict[str, int]:
        """Tenants per shard name (one ``GROUP BY``); a shard holding none is absent."""
        with self._read() as conn:
            return self._tenant_counts(conn)

    def shard_listing(
        self, *, tier: Tier | str | None = None, state: ShardState | str | None = None
    ) -> ShardListing:
        """Shards by name with their tenant counts, optionally only those of one tier or
        state, and the map version they were read at (one read transaction)."""
        query = sa.select(shards).order_by(shards.c.name)
        if tier is not None:
            query = query.where(shards.c.tier == Tier(tier).value)
        if state is not None:
            query = query.where(shards.c.state == ShardState(state).value)
        with self._read() as conn:
            version = int(conn.execute(sa.select(map_table.c.version)).scalar_one())
            found = [shard_from_row(row) for row in conn.execute(query)]
            counts = self._tenant_counts(conn)
        return ShardListing(version, [(s, counts.get(s.name, 0)) for s in found])

    def shard_with_count(self, name: str) -> tuple[Shard, int]:
        """Shard *name* (or raise UnknownShard) and how many tenants it holds."""
        with self._read() as conn:
            shard = self._get_shard(conn, name)
            count = conn.execute(
                sa.select(sa.func.count()).select_from(tenants).where(tenants.c.shard == name)
            ).scalar_one()
        return shard, int(count)

    def route_of(self, tenant_id: str) -> Route:
        """Where *tenant_id* lives: its tenant and shard records and the map version,
        read in one transaction (UnknownTenant when it is not registered)."""
        validate_tenant_id(tenant_id)
        with self._read() as conn:
            version = int(conn.execute(sa.select(map_table.c.version)).scalar_one())
            tenant = self._get_tenant(conn, tenant_id)
            shard = self._get_shard(conn, tenant.shard)
        return Route(tenant, shard, version)

    @staticmethod
    def _tenant_counts(conn: Connection) -> dict[str, int]:
        query = sa.select(tenants.c.shard, sa.func.count()).group_by(tenants.c.shard)
        return {name: int(n) for name, n in conn.execute(query)}

    @staticmethod
    def _tenant_filter(
        shard: str | None,
        tier: Tier | str | None,
        state: TenantState | str | None,
        pinned: bool | None,
        prefix: str | None,
    ) -> list[sa.ColumnElement[bool]]:
        """The WHERE clauses of a tenant listing's filters (checked)."""
        where: list[sa.ColumnElement[bool]] = []
        if shard is not None:
            where.append(tenants.c.shard == shard)
        if tier is not None:
            where.append(tenants.c.tier == Tier(tier).value)
        if state is not None:
            where.append(tenants.c.state == TenantState(state).value)
        if pinned is not None:
            where.append(tenants.c.pinned == pinned)
        if prefix:
            if not _PREFIX.fullmatch(prefix):
                raise InvalidTenantId(prefix)
            where.append(tenants.c.id.startswith(prefix, autoescape=True))
        return where
