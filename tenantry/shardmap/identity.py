"""Which database a connection is on: every shard database has an identity.

A shard database holds one row in ``tenantry_shard_identity`` (shard revision s0003):
a random ``database_id`` and, on PostgreSQL, the server's ``system_identifier`` and
the database's oid it was made on. The catalog records the id of every shard it
registers (``tenantry_shards.database_id``, unique), so one database cannot be
registered twice under two spellings of its URL; the mover compares the identities of
its two live connections before it freezes anything, and again before it deletes a
tenant's rows from the source.

A PostgreSQL database cloned from a template (``CREATE DATABASE ... TEMPLATE``, how
tenantry provisions dedicated databases) or restored from a dump or a base backup
carries the row along, but its live system identifier or oid differ from the stored
ones: :func:`ensure_identity` then gives it an id of its own and rewrites the row.

On SQLite the identity row lives in the database file, with no system identifier and
no oid: a copy of the file keeps the original's id, and copies are not detected (two
shards on copies of one file are refused as one database). The live comparison of
:meth:`LiveDatabase.same_as` also compares the files' real paths.

Everything here runs as the shard's operations role: the routing role has no access
to the identity table.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.shardmap.schema import shard_identity

__all__ = [
    "DatabaseIdentity",
    "LiveDatabase",
    "ensure_identity",
    "live_database",
    "read_identity",
]

_TABLE = shard_identity.name


@dataclass(frozen=True, slots=True)
class DatabaseIdentity:
    """A shard database's identity row: its id, and where it was made (PostgreSQL)."""

    database_id: str
    system_identifier: str | None
    database_oid: int | None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LiveDatabase:
    """What a live connection is connected to.

    *identity* is the database's identity row (None when tenantry's shard tables are
    older than s0003); *system_identifier* and *database_oid* are read live from the
    server (PostgreSQL), *path* is the real path of the database file (SQLite).
    """

    identity: DatabaseIdentity | None
    system_identifier: str | None
    database_oid: int | None
    path: str | None

    @property
    def database_id(self) -> str | None:
        """The database's identity, or None when it has none yet."""
        return self.identity.database_id if self.identity is not None else None

    def same_as(self, other: LiveDatabase) -> bool:
        """True when both connections are on one database, by any of the signs."""
        if self.database_id is not None and self.database_id == other.database_id:
            return True
        if (
            self.system_identifier is not None
            and self.database_oid is not None
            and (self.system_identifier, self.database_oid)
            == (other.system_identifier, other.database_oid)
        ):
            return True
        return self.path is not None and self.path == other.path

    def describe(self) -> str:
        """A short description for messages: the id, and where it lives."""
        parts = [f"database id {self.database_id}"] if self.database_id else []
        if self.system_identifier is not None:
            parts.append(f"system {self.system_identifier}, oid {self.database_oid}")
        if self.path is not None:
            parts.append(f"file {self.path}")
        return ", ".join(parts) or "unknown database"


def _live(conn: Connection) -> tuple[str | None, int | None, str | None]:
    """(system identifier, database oid) on PostgreSQL; the file's real path on SQLite."""
    if conn.dialect.name == "postgresql":
        row = conn.execute(
            sa.text(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
                " (SELECT oid FROM pg_database WHERE datname = current_database())::bigint"
            )
        ).one()
        return str(row[0]), int(row[1]), None
    path: str | None = None
    for _seq, name, file in conn.exec_driver_sql("PRAGMA database_list").all():
        if name == "main" and file:
            path = os.path.realpath(file)
    return None, None, path


def _has_table(conn: Connection) -> bool:
    return sa.inspect(conn).has_table(_TABLE)


def _stored(conn: Connection, *, lock: bool = False) -> DatabaseIdentity | None:
    query = sa.select(shard_identity).where(shard_identity.c.id == 1)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    created = row.created_at
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    oid = row.database_oid
    return DatabaseIdentity(
        database_id=row.database_id,
        system_identifier=row.system_identifier,
        database_oid=int(oid) if oid is not None else None,
        created_at=created,
    )


def _current(stored: DatabaseIdentity | None, sysid: str | None, oid: int | None) -> bool:
    """Whether the stored row was made on this very database (not copied with it)."""
    return stored is not None and stored.system_identifier == sysid and stored.database_oid == oid


def read_identity(conn: Connection) -> DatabaseIdentity | None:
    """This database's identity, or None: no identity table or row yet, or a row that
    was copied from another database (a template or a restore; :func:`ensure_identity`
    gives this one its own). Writes nothing."""
    if not _has_table(conn):
        return None
    sysid, oid, _path = _live(conn)
    stored = _stored(conn)
    return stored if _current(stored, sysid, oid) else None


def ensure_identity(conn: Connection) -> DatabaseIdentity:
    """This database's identity, made or repaired first when needed.

    In the caller's transaction (the caller commits), on the operations role's
    connection, after tenantry's shard tables are at s0003 or later. A missing row is
    created; a row whose stored system identifier or oid differ from the live ones (the
    database is a copy) gets a new id. On PostgreSQL two callers at once agree on one
    id (the row is locked while it is repaired).
    """
    sysid, oid, _path = _live(conn)
    stored = _stored(conn)
    if stored is not None and _current(stored, sysid, oid):
        return stored
    if conn.dialect.name == "postgresql":
        # Serialise repairs: the second caller waits, then finds the first one's row.
        conn.execute(sa.text(f"LOCK TABLE {_TABLE} IN SHARE ROW EXCLUSIVE MODE"))
        stored = _stored(conn, lock=True)
        if stored is not None and _current(stored, sysid, oid):
            return stored
    fresh = DatabaseIdentity(
        database_id=uuid.uuid4().hex,
        system_identifier=sysid,
        database_oid=oid,
        created_at=datetime.now(UTC),
    )
    values = {
        "database_id": fresh.database_id,
        "system_identifier": fresh.system_identifier,
        "database_oid": fresh.database_oid,
        "created_at": fresh.created_at,
    }
    if stored is None:
        conn.execute(shard_identity.insert().values(id=1, **values))
    else:
        conn.execute(shard_identity.update().where(shard_identity.c.id == 1).values(**values))
    return fresh


def live_database(conn: Connection, *, repair: bool = True) -> LiveDatabase:
    """What *conn* is connected to, with its identity (made or repaired first unless
    *repair* is false; then a copied row counts as no identity).

    Works on a database whose tenantry tables predate the identity (then ``identity``
    is None and the live signs alone tell databases apart).
    """
    sysid, oid, path = _live(conn)
    identity: DatabaseIdentity | None = None
    if _has_table(conn):
        identity = ensure_identity(conn) if repair else read_identity(conn)
    return LiveDatabase(identity, sysid, oid, path)
