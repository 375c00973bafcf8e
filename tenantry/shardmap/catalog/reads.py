"""The shard map as routers read it: its version, a whole snapshot, or what changed
since a version (the change log); and the fleet's id."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tenantry.errors import CatalogNotInitialized
from tenantry.shardmap.catalog.store import (
    SNAPSHOT_COLUMNS,
    CatalogStore,
    shard_from_row,
    tenants_from_rows,
)
from tenantry.shardmap.model import MapDelta, MapSnapshot, mask_url
from tenantry.shardmap.schema import map_changes, map_table, shards, tenants

__all__ = ["MapReads"]


class MapReads(CatalogStore):
    """The catalog's map reads (a part of :class:`tenantry.shardmap.catalog.Catalog`)."""

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
            tenant_rows = conn.execute(sa.select(*SNAPSHOT_COLUMNS)).all()
        return MapSnapshot(
            version=version,
            shards={row.name: shard_from_row(row) for row in shard_rows},
            tenants=tenants_from_rows(tenant_rows),
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
                    sa.select(*SNAPSHOT_COLUMNS).where(tenants.c.id.in_(chunk))
                ).all()
            shard_rows = conn.execute(sa.select(shards)).all()
        changed = tenants_from_rows(rows)
        return MapDelta(
            version=int(version),
            since=since,
            shards={row.name: shard_from_row(row) for row in shard_rows},
            tenants=changed,
            removed=frozenset(changed_ids) - changed.keys(),
        )
