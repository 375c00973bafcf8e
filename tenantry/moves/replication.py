"""PostgreSQL logical replication of one tenant, for online moves.

A publication on the source publishes the tenant's rows of every tenant table
(row filter ``WHERE (tenant_id = '<tenant>')``; insert, update and delete, never
truncate, which row filters do not stop), a logical slot holds the source's WAL, and a
subscription on the target copies the rows and then applies changes. The tail slot is
decoded with a publication of its own (``<name>_tail``), which publishes truncate too,
so that a TRUNCATE of a tenant table is seen. Every object is named after the fleet
and the move (``tenantry_move_<fleet id>_<move id>``), so ``moves gc`` finds any left
over and never touches another fleet's; moves recorded before fleet ids keep the names
their journal entries recorded (``tenantry_move_<move id>``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from tenantry.moves.tables import TenantTable, quoted_name
from tenantry.urls import libpq_conninfo

__all__ = [
    "PREFIX",
    "Leftovers",
    "MoveNames",
    "ServerFacts",
    "artifact_name",
    "copy_progress",
    "create_publication",
    "create_slot",
    "create_subscription",
    "drop_publication",
    "drop_slot",
    "drop_subscription",
    "find_leftovers",
    "lag_bytes",
    "move_names",
    "recorded_names",
    "replica_identity_problems",
    "server_facts",
    "source_conninfo",
    "subscription_errors",
    "sync_pending",
    "sync_progress",
    "unpublishable_tables",
    "wait_sentinel",
    "write_sentinel",
]

PREFIX = "tenantry_move_"
#: Replication slots an online move holds on its source: the subscription's, the tail's.
SLOTS_PER_MOVE = 2
SENTINEL = "tenantry_move_sentinel"


#: The journal's artifacts that name a replication object.
NAME_ARTIFACTS = ("publication", "slot", "subscription", "tail_slot", "tail_publication")


def artifact_name(move_id: int, fleet_id: str | None = None) -> str:
    """The name of a move's publication, slot and subscription: with the fleet's id
    (``tenantry_move_<fleet>_<move>``), or without it as before fleet ids."""
    if fleet_id is None:
        return f"{PREFIX}{int(move_id)}"
    return f"{PREFIX}{fleet_id}_{int(move_id)}"


@dataclass(frozen=True, slots=True)
class MoveNames:
    """The replication objects of one online move."""

    #: The publication, the subscription's slot and the subscription share this name.
    name: str
    tail_slot: str
    #: The tail slot's own publication (it publishes truncate); None when the move
    #: recorded a tail slot before the tail had one: it decodes with :attr:`name`.
    tail_publication: str | None

    @property
    def tail_decoding(self) -> str:
        """The publication the tail slot is decoded with."""
        return self.tail_publication or self.name

    def all(self) -> set[str]:
        """Every replication object name of the move."""
        names = {self.name, self.tail_slot}
        if self.tail_publication:
            names.add(self.tail_publication)
        return names


def move_names(artifacts: Mapping[str, object], move_id: int, fleet_id: str) -> MoveNames:
    """A move's names: those its journal entry recorded, else new ones with the fleet's
    id. A move that recorded its tail slot but no tail publication (before the tail had
    one) decodes the tail with its main publication until its cut is taken again."""
    recorded = artifacts.get("publication")
    name = str(recorded) if recorded else artifact_name(move_id, fleet_id)
    tail_slot = str(artifacts.get("tail_slot") or f"{name}_tail")
    tail_publication = artifacts.get("tail_publication")
    if tail_publication is None and "tail_slot" not in artifacts:
        tail_publication = f"{name}_tail"
    return MoveNames(name, tail_slot, str(tail_publication) if tail_publication else None)


def recorded_names(artifacts: Mapping[str, object]) -> set[str]:
    """Every replication object name a journal entry recorded."""
    return {str(artifacts[k]) for k in NAME_ARTIFACTS if isinstance(artifacts.get(k), str)}


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What decides whether a server can take part in an online move."""

    version: int
    wal_level: str
    free_slots: int
    superuser: bool
    replication: bool

    def problems(self, role: str) -> list[str]:
        """Why this server cannot be the *role* ("source" or "target") of an online move."""
        found = []
        if self.version < 150000:
            found.append(
                f"the {role} runs PostgreSQL {self.version // 10000}; online moves need 15+"
            )
        if role == "source":
            if self.wal_level != "logical":
                found.append(
                    f"the source has wal_level={self.wal_level}; set wal_level=logical and restart"
                )
            if self.free_slots < SLOTS_PER_MOVE:
                found.append(
                    f"the source has {max(self.free_slots, 0)} free replication slot(s) and an "
                    f"online move needs {SLOTS_PER_MOVE}: raise max_replication_slots or run "
                    "`tenantry moves gc`"
                )
            if not (self.superuser or self.replication):
                found.append("the source's operations role needs REPLICATION (or superuser)")
        elif not self.superuser:
            found.append(
                "the target's operations role must be a superuser to create a subscription"
            )
        return found


def server_facts(conn: Connection, own_slots: Sequence[str] = ()) -> ServerFacts:
    """Version, wal_level, free slots and the connected role's rights.

    The slots named *own_slots* (a move's own, made already) count as free.
    """
    own = list(own_slots)
    row = conn.execute(
        sa.text(
            "SELECT current_setting('server_version_num')::int,"
            " current_setting('wal_level'),"
            " current_setting('max_replication_slots')::int"
            "   - (SELECT count(*) FROM pg_replication_slots"
            "      WHERE slot_name <> ALL(CAST(:own AS text[]))),"
            " r.rolsuper, r.rolreplication"
            " FROM pg_roles r WHERE r.rolname = current_user"
        ),
        {"own": own},
    ).one()
    return ServerFacts(int(row[0]), str(row[1]), int(row[2]), bool(row[3]), bool(row[4]))


def replica_identity_problems(
    conn: Connection, tables: Sequence[TenantTable], column: str = "tenant_id"
) -> list[str]:
    """Tables whose replica identity does not cover the tenant column, with the fix.

    Row filters on UPDATE and DELETE may only use replica-identity columns.
    """
    found = []
    for table in tables:
        row = conn.execute(
            sa.text(
                "SELECT c.relreplident,"
                " (SELECT array_agg(a.attname::text) FROM pg_index i"
                "   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                "   WHERE i.indrelid = c.oid AND"
                "   ((c.relreplident = 'd' AND i.indisprimary) OR"
                "    (c.relreplident = 'i' AND i.indisreplident)))"
                " FROM pg_class c WHERE c.oid = to_regclass(:t)"
            ),
            {"t": quoted_name(conn, table)},
        ).one()
        mode, columns = row[0], row[1] or []
        if mode == "f" or (mode in ("d", "i") and column in columns):
            continue
        found.append(
            f"table {table.qualified_name!r}: its replica identity does not include "
            f"{column!r}; run ALTER TABLE {quoted_name(conn, table)} REPLICA IDENTITY FULL, "
            f"or make the primary key begin with {column}"
        )
    return found


def unpublishable_tables(conn: Connection, tables: Sequence[TenantTable], column: str) -> list[str]:
    """Tenant tables a row-filtered logical replication cannot carry, each with why:
    partitioned tables (PostgreSQL refuses a publication's WHERE clause on them: "cannot
    use publication WHERE clause"), UNLOGGED and temporary tables (they write no WAL),
    and foreign tables with the tenant column (they cannot be published)."""
    found = []
    for table in tables:
        row = conn.execute(
            sa.text("SELECT relkind, relpersistence FROM pg_class WHERE oid = to_regclass(:t)"),
            {"t": _regclass_name(conn, table)},
        ).first()
        if row is None:
            continue
        kind, persistence = str(row[0]), str(row[1])
        if kind == "p":
            found.append(
                f"table {table.qualified_name!r} is partitioned (logical replication "
                "cannot filter a partitioned table's rows by tenant)"
            )
        elif persistence == "u":
            found.append(f"table {table.qualified_name!r} is UNLOGGED (it writes no WAL)")
        elif persistence == "t":
            found.append(f"table {table.qualified_name!r} is temporary (it writes no WAL)")
    schemas: list[str | None] = [*sorted({t.schema for t in tables if t.schema})] or [None]
    for schema in schemas:
        foreign = conn.execute(
            sa.text(
                "SELECT c.relname::text FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :col"
                "  AND a.attnum > 0 AND NOT a.attisdropped"
                " WHERE c.relkind = 'f' AND n.nspname = coalesce(:schema, current_schema())"
                " ORDER BY 1"
            ),
            {"col": column, "schema": schema},
        ).scalars()
        found += [
            f"foreign table {name!r} has a {column} column (foreign tables cannot be published)"
            for name in foreign
        ]
    return found


def _regclass_name(conn: Connection, table: TenantTable) -> str:
    quote = conn.dialect.identifier_preparer.quote
    return f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def create_publication(
    conn: Connection,
    name: str,
    tables: Sequence[TenantTable],
    tenant_id: str,
    column: str = "tenant_id",
    *,
    truncate: bool = False,
) -> None:
    """The tenant's row-filtered publication (plus the sentinel table).

    With *truncate*, the tail slot's publication: truncate is published too. No
    subscription uses that one (it would apply a TRUNCATE to every tenant's rows); the
    tail decodes it to see a TRUNCATE of a tenant table after the cut.
    """
    q = _quote(conn, column)
    parts = [
        f"TABLE {t} WHERE ({q} = {_literal(tenant_id)})"
        for t in [*(quoted_name(conn, t) for t in tables), _quote(conn, SENTINEL)]
    ]
    conn.exec_driver_sql(
        f"CREATE PUBLICATION {_quote(conn, name)} FOR {', '.join(parts)}"
        " WITH (publish = 'insert, update, delete')"
    )
    if truncate:
        conn.exec_driver_sql(
            f"ALTER PUBLICATION {_quote(conn, name)}"
            " SET (publish = 'insert, update, delete, truncate')"
        )


def create_slot(conn: Connection, name: str) -> None:
    """A logical slot for the subscription, made on the source first (this also works
    when source and target share a server, where CREATE SUBSCRIPTION would hang)."""
    conn.execute(sa.text("SELECT pg_create_logical_replication_slot(:n, 'pgoutput')"), {"n": name})


def source_conninfo(url: str) -> str:
    """A libpq connection string for the target server to reach the source: host,
    port, user, password and database only. The URL's query parameters are the
    client's (a ``sslrootcert`` path on the operator's machine, say) and would be read
    on the target server, which connects with its own defaults."""
    return libpq_conninfo(make_url(url).set(query={}))


def create_subscription(conn: Connection, name: str, conninfo: str, slot: str) -> None:
    """The target's subscription, copying existing rows first (needs autocommit)."""
    conn.exec_driver_sql(
        f"CREATE SUBSCRIPTION {_quote(conn, name)} CONNECTION {_literal(conninfo)}"
        f" PUBLICATION {_quote(conn, name)}"
        f" WITH (copy_data = true, create_slot = false, slot_name = {_literal(slot)})"
    )


def sync_pending(conn: Connection, name: str) -> int | None:
    """Tables of the subscription not yet through their initial copy (None: no such
    subscription)."""
    row = conn.execute(
        sa.text(
            "SELECT count(*) FILTER (WHERE r.srsubstate NOT IN ('r', 's')), count(s.oid)"
            " FROM pg_subscription s LEFT JOIN pg_subscription_rel r ON r.srsubid = s.oid"
            " WHERE s.subname = :n"
        ),
        {"n": name},
    ).one()
    return None if row[1] == 0 else int(row[0])


def copy_progress(conn: Connection, name: str) -> dict[str, tuple[int, int]]:
    """Tables of subscription *name* whose initial copy is running now, each with the
    rows and bytes its table-sync worker has copied so far (PostgreSQL 14+ reports the
    worker's ``COPY`` in ``pg_stat_progress_copy``; a table done or not begun is not
    listed), by ``schema.table``; on the target."""
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname || '.' || c.relname, p.tuples_processed, p.bytes_processed"
            " FROM pg_stat_subscription s"
            " JOIN pg_stat_progress_copy p ON p.pid = s.pid"
            " JOIN pg_class c ON c.oid = p.relid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE s.subname = :n AND s.relid IS NOT NULL"
        ),
        {"n": name},
    ).all()
    return {str(table): (int(count), int(size)) for table, count, size in rows}


def subscription_errors(conn: Connection, name: str) -> tuple[int, int] | None:
    """(apply_error_count, sync_error_count) of the subscription, on the target (None:
    no such subscription): each failure of its apply or table-sync worker counts."""
    row = conn.execute(
        sa.text(
            "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats"
            " WHERE subname = :n"
        ),
        {"n": name},
    ).first()
    return None if row is None else (int(row[0]), int(row[1]))


def sync_progress(conn: Connection, name: str) -> tuple[object, ...]:
    """How far the subscription's initial copy has come, on the target: its tables'
    states, the rows COPY has taken in, and what its table-sync workers have received.
    Any change here is progress. (Not the apply worker's positions: keepalives move
    those with any WAL of the source server, even while a table's copy is stuck.)"""
    workers = conn.execute(
        sa.text(
            "SELECT relid::bigint, received_lsn::text, latest_end_lsn::text"
            " FROM pg_stat_subscription WHERE subname = :n AND relid IS NOT NULL ORDER BY 1"
        ),
        {"n": name},
    ).all()
    copied = conn.execute(
        sa.text(
            "SELECT coalesce(sum(tuples_processed), 0)::bigint FROM pg_stat_progress_copy"
            " WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    ).scalar()
    states = conn.execute(
        sa.text(
            "SELECT string_agg(r.srrelid::text || r.srsubstate::text, ',' ORDER BY r.srrelid)"
            " FROM pg_subscription s JOIN pg_subscription_rel r ON r.srsubid = s.oid"
            " WHERE s.subname = :n"
        ),
        {"n": name},
    ).scalar()
    return (tuple(tuple(w) for w in workers), copied, states)


def lag_bytes(conn: Connection, slot: str) -> int | None:
    """How far the subscriber trails the source's WAL, in bytes."""
    value = conn.execute(
        sa.text(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = :n"
        ),
        {"n": slot},
    ).scalar()
    return None if value is None else int(value)


def write_sentinel(conn: Connection, tenant_id: str, move_id: int, token: str) -> None:
    """Write the sentinel on the source (the caller commits)."""
    # A logical walsender sends only flushed WAL: on a server with
    # synchronous_commit=off the sentinel would wait for the WAL writer (up to
    # wal_writer_delay, 200 ms by default) inside the freeze.
    conn.execute(sa.text("SET LOCAL synchronous_commit = local"))
    conn.execute(
        sa.text(f"DELETE FROM {SENTINEL} WHERE tenant_id = :t AND move_id = :m"),
        {"t": tenant_id, "m": move_id},
    )
    conn.execute(
        sa.text(
            f"INSERT INTO {SENTINEL} (tenant_id, move_id, token, written_at)"
            " VALUES (:t, :m, :k, now())"
        ),
        {"t": tenant_id, "m": move_id, "k": token},
    )


def wait_sentinel(
    conn: Connection, tenant_id: str, move_id: int, token: str, *, timeout: float
) -> bool:
    """Whether the sentinel arrived on the target within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with conn.begin():
            found = conn.execute(
                sa.text(f"SELECT token FROM {SENTINEL} WHERE tenant_id = :t AND move_id = :m"),
                {"t": tenant_id, "m": move_id},
            ).scalar()
        if found == token:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def drop_subscription(conn: Connection, name: str) -> bool:
    """Drop the subscription if it exists, leaving the slot to :func:`drop_slot`
    (autocommit connection). Return whether it existed."""
    exists = conn.execute(
        sa.text("SELECT 1 FROM pg_subscription WHERE subname = :n"), {"n": name}
    ).first()
    if not exists:
        return False
    q = _quote(conn, name)
    conn.exec_driver_sql(f"ALTER SUBSCRIPTION {q} DISABLE")
    conn.exec_driver_sql(f"ALTER SUBSCRIPTION {q} SET (slot_name = NONE)")
    conn.exec_driver_sql(f"DROP SUBSCRIPTION {q}")
    return True


def drop_slot(conn: Connection, name: str) -> bool:
    """Drop the replication slot if it exists (ending a walsender still using it)."""
    for _ in range(50):
        row = conn.execute(
            sa.text("SELECT active_pid FROM pg_replication_slots WHERE slot_name = :n"),
            {"n": name},
        ).first()
        if row is None:
            return False
        if row[0] is None:
            conn.execute(sa.text("SELECT pg_drop_replication_slot(:n)"), {"n": name})
            return True
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": row[0]})
        time.sleep(0.1)
    conn.execute(sa.text("SELECT pg_drop_replication_slot(:n)"), {"n": name})
    return True


def drop_publication(conn: Connection, name: str) -> bool:
    """Drop the publication if it exists."""
    exists = conn.execute(
        sa.text("SELECT 1 FROM pg_publication WHERE pubname = :n"), {"n": name}
    ).first()
    if exists:
        conn.exec_driver_sql(f"DROP PUBLICATION {_quote(conn, name)}")
    return bool(exists)


@dataclass(frozen=True, slots=True)
class Leftovers:
    """tenantry replication objects found on one database."""

    publications: tuple[str, ...]
    slots: tuple[str, ...]
    subscriptions: tuple[str, ...]

    def all_names(self) -> set[str]:
        """The names of every object found, of every kind."""
        return {*self.publications, *self.slots, *self.subscriptions}


def find_leftovers(conn: Connection) -> Leftovers:
    """Every tenantry publication, slot (of this database) and subscription."""

    def names(query: str) -> tuple[str, ...]:
        return tuple(sorted(conn.execute(sa.text(query), {"p": PREFIX + "%"}).scalars()))

    return Leftovers(
        publications=names("SELECT pubname FROM pg_publication WHERE pubname LIKE :p"),
        slots=names(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE :p"
            " AND database = current_database()"
        ),
        subscriptions=names(
            "SELECT subname FROM pg_subscription WHERE subname LIKE :p"
            " AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
    )
