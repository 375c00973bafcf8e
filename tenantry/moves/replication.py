"""PostgreSQL logical replication of one tenant, for online moves.

A publication on the source publishes the tenant's rows of every tenant table
(row filter ``WHERE (tenant_id = '<tenant>')``; insert, update and delete, never
truncate, which row filters do not stop), a logical slot holds the source's WAL, and a
subscription on the target copies the rows and then applies changes. Every object is
named after the move (``tenantry_move_<id>``), so ``moves gc`` can find any left over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from tenantry.moves.tables import TenantTable, quoted_name

__all__ = [
    "PREFIX",
    "Leftovers",
    "ServerFacts",
    "artifact_name",
    "create_publication",
    "create_slot",
    "create_subscription",
    "drop_publication",
    "drop_slot",
    "drop_subscription",
    "find_leftovers",
    "lag_bytes",
    "replica_identity_problems",
    "server_facts",
    "source_conninfo",
    "sync_pending",
    "wait_sentinel",
    "write_sentinel",
]

PREFIX = "tenantry_move_"
#: Replication slots an online move holds on its source: the subscription's, the tail's.
SLOTS_PER_MOVE = 2
SENTINEL = "tenantry_move_sentinel"


def artifact_name(move_id: int) -> str:
    """The name of a move's publication, slot and subscription."""
    return f"{PREFIX}{int(move_id)}"


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


def server_facts(conn: Connection, move_id: int | None = None) -> ServerFacts:
    """Version, wal_level, free slots and the connected role's rights.

    Slots that move *move_id* made already count as free: they are its own.
    """
    own = [artifact_name(move_id), f"{artifact_name(move_id)}_tail"] if move_id else []
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
) -> None:
    """The tenant's row-filtered publication (plus the sentinel table)."""
    q = _quote(conn, column)
    parts = [
        f"TABLE {t} WHERE ({q} = {_literal(tenant_id)})"
        for t in [*(quoted_name(conn, t) for t in tables), _quote(conn, SENTINEL)]
    ]
    conn.exec_driver_sql(
        f"CREATE PUBLICATION {_quote(conn, name)} FOR {', '.join(parts)}"
        " WITH (publish = 'insert, update, delete')"
    )


def create_slot(conn: Connection, name: str) -> None:
    """A logical slot for the subscription, made on the source first (this also works
    when source and target share a server, where CREATE SUBSCRIPTION would hang)."""
    conn.execute(sa.text("SELECT pg_create_logical_replication_slot(:n, 'pgoutput')"), {"n": name})


def source_conninfo(url: str) -> str:
    """A libpq connection string for the target server to reach the source."""
    parsed = make_url(url)
    params: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
    }
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


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
