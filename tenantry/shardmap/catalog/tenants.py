"""The tenant directory in the catalog: registering, placing, pinning and removing
tenants, with the residency rows on their shards written alongside."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import (
    NoSharedShard,
    PlacementError,
    ShardOccupied,
    TenantExists,
    TenantryError,
    TierMismatch,
)
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog import bulk
from tenantry.shardmap.catalog.bulk import (
    DEFAULT_BATCH_SIZE,
    BulkImportFailed,
    BulkProgress,
    BulkSummary,
    TenantRecord,
    read_records,
)
from tenantry.shardmap.catalog.store import CatalogStore, shard_from_row, tenant_from_row
from tenantry.shardmap.model import (
    Shard,
    Tenant,
    TenantState,
    Tier,
    require_active,
    validate_tenant_id,
)
from tenantry.shardmap.operations import operator_engine, operator_transaction
from tenantry.shardmap.residency import Residency, clear_residency, commit_residency
from tenantry.shardmap.ring import PlacementRing
from tenantry.shardmap.schema import map_table, moves, shards, tenants

__all__ = [
    "BulkImportFailed",
    "BulkProgress",
    "BulkSummary",
    "TenantDirectory",
    "TenantRecord",
    "drop_residency",
    "read_records",
    "set_residency",
]

logger = logging.getLogger("tenantry.catalog")


class TenantDirectory(CatalogStore):
    """The catalog's tenants (a part of :class:`tenantry.shardmap.catalog.Catalog`)."""

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
            return [tenant_from_row(row) for row in conn.execute(query)]

    def propose_shard(self, tenant_id: str) -> str:
        """Where the ring would place a new shared tenant now (nothing is written)."""
        validate_tenant_id(tenant_id)
        with self._read() as conn:
            return self._ring_place(conn, tenant_id)

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
                target = self._new_home(conn, tenant_id, tier, shard)
                set_residency(target, tenant_id, Residency.ACTIVE, version, self.settings)
                written = target
                tenant = Tenant(
                    tenant_id, target.name, tier, pinned, TenantState.ACTIVE, datetime.now(UTC)
                )
                self._insert_tenant(conn, tenant)
        except BaseException:
            if written is not None:
                # The catalog did not commit: take back the residency row we wrote.
                with suppress(TenantryError):
                    drop_residency(written, tenant_id, self.settings)
            raise
        logger.info("added tenant %s on shard %s", tenant_id, target.name)
        return tenant

    def add_tenants(
        self,
        records: Iterable[TenantRecord | Mapping[str, Any]],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        on_batch: Callable[[BulkProgress], None] | None = None,
    ) -> BulkSummary:
        """Register many tenants: :meth:`add_tenant` for each record, in batches.

        *records* are :class:`TenantRecord`\\ s or mappings with the keys ``id`` and,
        optionally, ``shard``, ``tier`` and ``pinned`` (what :func:`read_records` reads
        from CSV or JSON Lines). Each batch of *batch_size* is one catalog transaction and
        one map version; its residency rows are written per shard, one transaction each,
        before the catalog commits. A record ``add_tenant`` would refuse (or an id given
        twice) raises :class:`BulkImportFailed` naming its line, with its batch left
        unwritten; the batches before it stay. *on_batch* is called after each batch.
        """
        return bulk.add_tenants(self, records, batch_size=batch_size, on_batch=on_batch)

    def _new_home(self, conn: Connection, tenant_id: str, tier: Tier, shard: str | None) -> Shard:
        """Where a new tenant goes: *shard*, or the ring's choice; checked to take it."""
        existing = conn.execute(
            sa.select(tenants.c.shard).where(tenants.c.id == tenant_id)
        ).scalar_one_or_none()
        if existing is not None:
            raise TenantExists(tenant_id, existing)
        name = shard if shard is not None else self._ring_place(conn, tenant_id)
        target = self._get_shard(conn, name)
        self._check_home(conn, tenant_id, tier, target)
        return target

    def _insert_tenant(self, conn: Connection, tenant: Tenant) -> None:
        conn.execute(
            tenants.insert().values(
                id=tenant.id,
                shard=tenant.shard,
                tier=tenant.tier.value,
                pinned=tenant.pinned,
                state=tenant.state.value,
                created_at=tenant.created_at,
            )
        )
        self._log_change(conn, tenant.id)

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

    def _ring_place(self, conn: Connection, tenant_id: str) -> str:
        ring = PlacementRing.for_shards(
            shard_from_row(row) for row in conn.execute(sa.select(shards))
        )
        name = ring.place(tenant_id)
        if name is None:
            raise NoSharedShard(
                "no active shared shard to place the tenant on: add one with "
                "`tenantry shard add NAME URL`",
                tenant_id=tenant_id,
            )
        return name

    def _check_home(self, conn: Connection, tenant_id: str, tier: Tier, shard: Shard) -> None:
        require_active(shard, tenant_id)
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
