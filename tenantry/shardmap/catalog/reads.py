"""The shard map as routers read it: its version, a whole snapshot, or what changed
since a version (the change log); and the fleet's id.

A router's refresh is one statement (:meth:`MapReads.map_delta`): the map row joined to
the changes logged since the router's version, joined to those tenants' rows. It runs
on a connection of its own, in autocommit (one statement is consistent by itself: no
BEGIN, no COMMIT) and without the pool's ping on every checkout (a connection found dead
is replaced and the statement run again once): one round trip per refresh. The shards
are read only when a version in the range changed no tenant, the only kind of version
that may have changed a shard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from tenantry.errors import CatalogNotInitialized
from tenantry.shardmap.catalog.store import (
    SNAPSHOT_COLUMNS,
    CatalogStore,
    shard_from_row,
    tenants_from_rows,
)
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.model import MapDelta, MapSnapshot, Shard, mask_url
from tenantry.shardmap.poolers import unprepared_through_pooler
from tenantry.shardmap.schema import map_changes, map_table, shards, tenants

__all__ = ["MapReads"]

_SINCE = sa.bindparam("since", type_=sa.BigInteger)

#: The map row, each change logged after ``since`` (none when the log does not reach
#: back that far), and the changed tenant's row now (NULLs: removed). Columns: version,
#: changes_since, the change's version, the changed id, then SNAPSHOT_COLUMNS.
_DELTA = sa.select(
    map_table.c.version,
    map_table.c.changes_since,
    map_changes.c.version.label("changed_at"),
    map_changes.c.tenant_id.label("changed_id"),
    *SNAPSHOT_COLUMNS,
).select_from(
    map_table.outerjoin(
        map_changes,
        sa.and_(
            map_changes.c.version > _SINCE,
            map_changes.c.version <= map_table.c.version,
            map_table.c.changes_since <= _SINCE,
        ),
    ).outerjoin(tenants, tenants.c.id == map_changes.c.tenant_id)
)
_VERSION = sa.select(map_table.c.version)
_TENANT_FIELDS = 4  # where SNAPSHOT_COLUMNS start in a _DELTA row


class MapReads(CatalogStore):
    """The catalog's map reads (a part of :class:`tenantry.shardmap.catalog.Catalog`)."""

    _map_engine: Engine | None = None

    def map_version(self) -> int:
        """The current map version; every change bumps it."""
        return int(self._map_statement(_VERSION, {})[0][0])

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
        """What changed after map version *since*: the tenants added, changed or
        removed since, and every shard when a shard may have changed (else the delta's
        ``shards`` is None). None when the change log does not reach back that far
        (then take a whole :meth:`snapshot`).

        One statement when only tenants changed; a version that logged no tenant change
        (a shard's, or the move journal's) makes it read again, with the shards, in one
        transaction.
        """
        rows = self._map_statement(_DELTA, {"since": since})
        version, complete_from = int(rows[0][0]), int(rows[0][1])
        if since < complete_from or since > version:
            return None
        if len({row[2] for row in rows if row[2] is not None}) == version - since:
            return _delta(rows, since, None)
        with self._read() as conn:
            rows = conn.execute(_DELTA, {"since": since}).all()
            shard_rows = conn.execute(sa.select(shards)).all()
        if since < int(rows[0][1]):
            return None  # pruned in between
        return _delta(rows, since, {row.name: shard_from_row(row) for row in shard_rows})

    def close(self) -> None:
        """Release the catalog's connections."""
        engine, self._map_engine = self._map_engine, None
        if engine is not None and engine is not self._engine:
            engine.dispose()
        super().close()

    def _map_statement(self, statement: Any, params: Mapping[str, Any]) -> Sequence[Any]:
        """The rows of one read-only *statement*, run on the map reads' connection; a
        connection that turns out dead is replaced and the statement run again once."""
        self._check_ready()
        engine = self._map_reads_engine()
        with self._errors():
            try:
                with engine.connect() as conn:
                    return conn.execute(statement, params).all()
            except sa.exc.DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
            with engine.connect() as conn:
                return conn.execute(statement, params).all()

    def _map_reads_engine(self) -> Engine:
        """PostgreSQL: an engine of one autocommit connection (a second one at most, for
        concurrent readers) with no ping at checkout; SQLite: the catalog's engine."""
        engine = self._map_engine
        if engine is not None:
            return engine
        with self._lock:
            if self._map_engine is None:
                if self.dialect != "postgresql":
                    self._map_engine = self._engine
                else:
                    made = make_engine(
                        self.url,
                        connect_timeout=self.settings.connect_timeout,
                        pool_size=1,
                        max_overflow=1,
                        isolation_level="AUTOCOMMIT",
                        pool_reset_on_return=None,
                    )
                    unprepared_through_pooler(made)
                    self._map_engine = made
            return self._map_engine


def _delta(rows: Sequence[Any], since: int, shard_map: Mapping[str, Shard] | None) -> MapDelta:
    """The MapDelta of _DELTA's *rows*."""
    changed_ids = {row[3] for row in rows if row[3] is not None}
    changed = tenants_from_rows(row[_TENANT_FIELDS:] for row in rows if row[4] is not None)
    return MapDelta(
        version=int(rows[0][0]),
        since=since,
        shards=shard_map,
        tenants=changed,
        removed=frozenset(changed_ids - changed.keys()),
    )
