"""Removing a tenant: never silently leave its rows for a tenant added later.

``Catalog.remove_tenant`` only unregisters; the rows at the tenant's home stay, and a
tenant added again with the same id would see them. :func:`remove_tenant` (what
``tenantry tenant remove`` runs) decides about the rows first:

- ``rows="refuse"`` (the default): refused with :class:`TenantHasRows`, naming the
  row count of every tenant table, while the tenant has rows at its home;
- ``rows="purge"``: the tenant is frozen at its home (reads go on, writes are
  refused), the transactions that began before are waited out, its rows are deleted
  in batches, children first (the batched delete of moves' cleanup), none may remain,
  and then it is unregistered. A purge that stops half-way leaves the tenant frozen:
  run it again;
- ``rows="keep"``: unregistered, the rows stay (said in the result).

The tenant tables are found the way moves find them (:func:`tenant_tables`), on the
shard's operations role.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import sqlalchemy as sa
from sqlalchemy import Engine

from tenantry.errors import (
    ConfigurationError,
    FreezeTimeout,
    PlacementError,
    TenantHasRows,
)
from tenantry.moves.copy import delete_tenant_rows
from tenantry.moves.freeze import wait_out
from tenantry.moves.journal import Journal
from tenantry.moves.tables import TenantTable, tenant_tables
from tenantry.shardmap.catalog import Catalog, catalog_of
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.model import Shard, Tenant, validate_tenant_id
from tenantry.shardmap.operations import operator_engine
from tenantry.shardmap.residency import Residency, commit_residency

__all__ = ["RowsPolicy", "TenantRemoval", "remove_tenant", "tenant_row_counts"]

RowsPolicy = Literal["refuse", "purge", "keep"]
_POLICIES = ("refuse", "purge", "keep")


@dataclass(frozen=True, slots=True)
class TenantRemoval:
    """What removing a tenant did.

    ``rows`` counts the tenant's rows per table at its home when it was removed
    (after a purge: what the purge found); ``deleted`` what the purge deleted per
    table; ``kept`` whether rows were left at its home.
    """

    tenant: Tenant
    policy: RowsPolicy
    rows: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        """Whether the tenant's rows were kept at its home."""
        return self.policy == "keep" and any(self.rows.values())

    @property
    def shard(self) -> str:
        """The shard the tenant lived on."""
        return self.tenant.shard


def remove_tenant(
    catalog_or_router: object,
    tenant_id: str,
    *,
    rows: RowsPolicy = "refuse",
    batch_size: int = 5000,
    progress: Callable[[str, int], None] | None = None,
) -> TenantRemoval:
    """Unregister *tenant_id*, deciding first about its rows at its home (see the
    module's docstring). *progress* gets (table, rows deleted so far) during a purge."""
    if rows not in _POLICIES:
        raise ConfigurationError(
            f"invalid rows policy {rows!r}: use 'refuse', 'purge' or 'keep'", field="rows"
        )
    validate_tenant_id(tenant_id)
    catalog = catalog_of(catalog_or_router)
    tenant = catalog.get_tenant(tenant_id)
    _check_no_move(catalog, tenant_id)
    shard = catalog.get_shard(tenant.shard)
    column = catalog.settings.tenant_column
    with _operations(catalog, shard) as engine:
        tables = _tables(engine, column, catalog.settings.move_schemas)
        found = _count(engine, tenant_id, tables, column)
        if rows == "keep":
            catalog.remove_tenant(tenant_id)
            return TenantRemoval(tenant, "keep", found)
        if rows == "refuse" and any(found.values()):
            raise _has_rows(tenant, found)
        # Frozen while its rows are counted again (refuse) or deleted (purge): no routed
        # write can add one after it was counted.
        _freeze(catalog, engine, tenant_id, timeout=catalog.settings.freeze_timeout)
        unfreeze = True
        try:
            deleted: dict[str, int] = {}
            if rows == "purge":
                # From here a failure leaves the tenant frozen: half its rows must not
                # be served as if they were all of them. Running the purge again ends it.
                unfreeze = False
                deleted = _purge(engine, tenant_id, tables, column, batch_size, progress)
            _check_emptied(engine, tenant, shard, tables, column, rows)
            catalog.remove_tenant(tenant_id)
        finally:
            if unfreeze:
                commit_residency(engine, tenant_id, Residency.ACTIVE, catalog.map_version())
    if rows == "purge":
        deleted = {
            t.qualified_name: deleted.get(t.qualified_name, 0)
            for t in tables
            if found.get(t.qualified_name)
        }
        return TenantRemoval(tenant, "purge", found, deleted)
    return TenantRemoval(tenant, "refuse", found)


def _purge(
    engine: Engine,
    tenant_id: str,
    tables: list[TenantTable],
    column: str,
    batch_size: int,
    progress: Callable[[str, int], None] | None,
) -> dict[str, int]:
    """Delete the tenant's rows; the rows deleted per table."""
    deleted: dict[str, int] = {}

    def counted(table: str, so_far: int) -> None:
        deleted[table] = so_far
        if progress is not None:
            progress(table, so_far)

    delete_tenant_rows(
        engine, tenant_id, tables, column=column, batch_size=batch_size, progress=counted
    )
    return deleted


def _check_emptied(
    engine: Engine,
    tenant: Tenant,
    shard: Shard,
    tables: list[TenantTable],
    column: str,
    rows: RowsPolicy,
) -> None:
    """Refuse (refuse) or fail (purge) when the tenant still has rows at its home."""
    left = _count(engine, tenant.id, tables, column)
    if not any(left.values()):
        return
    if rows == "refuse":
        raise _has_rows(tenant, left)
    raise PlacementError(
        f"tenant {tenant.id!r} still has rows on shard {shard.name!r} after the "
        f"purge ({_describe(left)}): run `tenantry tenant remove {tenant.id} "
        "--purge` again",
        tenant_id=tenant.id,
        shard=shard.name,
    )


def tenant_row_counts(catalog_or_router: object, tenant_id: str) -> dict[str, int]:
    """The tenant's rows at its home, per tenant table (the operations role counts)."""
    validate_tenant_id(tenant_id)
    catalog = catalog_of(catalog_or_router)
    shard = catalog.get_shard(catalog.get_tenant(tenant_id).shard)
    column = catalog.settings.tenant_column
    with _operations(catalog, shard) as engine:
        tables = _tables(engine, column, catalog.settings.move_schemas)
        return _count(engine, tenant_id, tables, column)


# -- steps -----------------------------------------------------------------------------------


def _check_no_move(catalog: Catalog, tenant_id: str) -> None:
    live = Journal(catalog).list(live=True, tenant_id=tenant_id)
    if live:
        move_id = live[0].id
        raise PlacementError(
            f"tenant {tenant_id!r} is being moved (move {move_id}): finish it with "
            f"`tenantry moves resume {move_id}` or `tenantry moves abort {move_id}` first",
            tenant_id=tenant_id,
        )


@contextmanager
def _operations(catalog: Catalog, shard: Shard) -> Iterator[Engine]:
    with operator_engine(shard, connect_timeout=catalog.settings.connect_timeout) as engine:
        yield engine


def _tables(engine: Engine, column: str, schemas: Sequence[str]) -> list[TenantTable]:
    with engine.connect() as conn:
        return tenant_tables(conn, column=column, schemas=schemas)


def _count(
    engine: Engine, tenant_id: str, tables: list[TenantTable], column: str
) -> dict[str, int]:
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        for table in tables:
            target = sa.table(table.name, sa.column(column), schema=table.schema)
            counts[table.qualified_name] = int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(target)
                    .where(target.c[column] == tenant_id)
                ).scalar_one()
            )
    return counts


def _freeze(catalog: Catalog, engine: Engine, tenant_id: str, *, timeout: float) -> None:
    """Make the tenant read-only at its home, and wait out the transactions that began
    before (they may still write): the mover's freeze."""
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        commit_residency(conn, tenant_id, Residency.FROZEN, catalog.map_version())
        try:
            wait_out(conn, timeout=timeout)
        except FreezeTimeout:
            commit_residency(conn, tenant_id, Residency.ACTIVE, catalog.map_version())
            raise


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()) if n)


def _has_rows(tenant: Tenant, counts: dict[str, int]) -> TenantHasRows:
    total = sum(counts.values())
    return TenantHasRows(
        f"tenant {tenant.id!r} still has {total} row(s) on shard {tenant.shard!r} "
        f"({_describe(counts)}): delete them with `tenantry tenant remove {tenant.id} "
        f"--purge`, or leave them with --keep-rows (a tenant added again as {tenant.id!r} "
        "would see them)",
        tenant_id=tenant.id,
        shard=tenant.shard,
        counts=counts,
    )
