"""The tail of an online move: which of the tenant's rows changed after a verified cut.

An online move verifies the tenant in full at a *cut* — a moment when source and
target are known to hold the same rows — outside any freeze. What changes after the cut
is found by a second logical slot on the source (``<move's name>_tail``), decoded with
the tail's own row-filtered publication (the same tables and filter as the move's, plus
truncate) through PostgreSQL's SQL interface (``pg_logical_slot_get_binary_changes``
with ``pgoutput``): the replica-identity key of every row inserted, updated or deleted,
and every tenant table truncated. Inside the final freeze only those rows are compared,
so the freeze does not grow with the tenant's size; a truncated table fails the move.

No maintained Python library parses ``pgoutput``; this module reads the few messages of
protocol version 1 it needs (Relation, Insert, Update, Delete, Truncate) and skips the
others.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.moves.tables import TenantTable
from tenantry.moves.verify import (
    TableDigest,
    digest_tenant,
    pinned_settings,
    rendering_settings,
    set_local,
)

__all__ = [
    "Tail",
    "TailTable",
    "changed_table",
    "compare_tail",
    "create_tail_slot",
    "drain",
    "parse_messages",
    "referenced_by_changes",
    "timeout_ms",
]

_SENTINEL = "tenantry_move_sentinel"
_BATCH = 5_000

#: Find the changed rows one by one through the primary key whatever the planner's
#: statistics say: right after a bulk copy they may still describe an empty table, and
#: a sequential scan per key would not fit in a freeze.
_LOOKUP_PLAN = {
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "enable_bitmapscan": "off",
}

Key = tuple[str | None, ...]


def timeout_ms(seconds: float) -> str:
    """A ``statement_timeout`` of *seconds*, at least 1 ms (0 would mean none)."""
    return f"{max(1, int(seconds * 1000))}ms"


@dataclass(slots=True)
class TailTable:
    """The changed rows of one table, by the values of its replica identity's columns
    (every column under ``REPLICA IDENTITY FULL``); ``whole`` when a value was not sent
    (an unchanged TOASTed key), and the whole table is to be compared."""

    schema: str
    name: str
    key_columns: tuple[str, ...] = ()
    keys: set[Key] = field(default_factory=set)
    whole: bool = False


@dataclass(slots=True)
class Tail:
    """What changed since the cut, table by table."""

    tables: dict[tuple[str, str], TailTable] = field(default_factory=dict)
    #: Tables truncated since the cut (``schema.name``): their rows cannot be compared
    #: by key, and the subscription does not apply a TRUNCATE.
    truncated: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return sum(len(t.keys) for t in self.tables.values())

    def clear(self) -> None:
        """Forget the rows collected so far (a new cut begins)."""
        self.tables.clear()
        self.truncated.clear()


@dataclass(frozen=True, slots=True)
class _Relation:
    schema: str
    name: str
    identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[str, ...]
    key: tuple[int, ...]  # positions of the replica identity's columns


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> str:
        value = chr(self.data[self.pos])
        self.pos += 1
        return value

    def int16(self) -> int:
        (value,) = struct.unpack_from("!h", self.data, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        (value,) = struct.unpack_from("!i", self.data, self.pos)
        self.pos += 4
        return int(value)

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        value = self.data[self.pos : end].decode()
        self.pos = end + 1
        return value

    def tuple_data(self) -> list[str | bool | None]:
        """TupleData: text values, None for NULL, False for an unchanged TOAST value."""
        values: list[str | bool | None] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(False)
            else:  # "t" text or "b" binary (never asked for)
                length = self.int32()
                values.append(self.data[self.pos : self.pos + length].decode())
                self.pos += length
        return values


def parse_messages(
    messages: Iterable[bytes], tail: Tail, relations: dict[int, _Relation] | None = None
) -> None:
    """Add the keys of the rows changed in *messages* (pgoutput, version 1) to *tail*.

    *relations* carries Relation messages from one call to the next (each call of the
    SQL interface sends them again for the tables it touches, so it may be omitted).
    """
    known = {} if relations is None else relations
    for message in messages:
        reader = _Reader(bytes(message))
        kind = reader.byte()
        if kind == "R":
            relid = reader.int32()
            schema, name = reader.string(), reader.string()
            identity = reader.byte()
            columns, key = [], []
            for position in range(reader.int16()):
                flags = reader.data[reader.pos]
                reader.pos += 1
                columns.append(reader.string())
                reader.pos += 8  # type oid, type modifier
                if flags & 1:
                    key.append(position)
            known[relid] = _Relation(schema, name, identity, tuple(columns), tuple(key))
        elif kind == "T":
            count = reader.int32()
            reader.pos += 1  # options: CASCADE, RESTART IDENTITY
            for _ in range(count):
                relation = known[reader.int32()]
                if relation.name != _SENTINEL:
                    tail.truncated.add(f"{relation.schema}.{relation.name}")
        elif kind in ("I", "U", "D"):
            relation = known[reader.int32()]
            if relation.name == _SENTINEL:
                continue
            table = tail.tables.get((relation.schema, relation.name))
            if table is None:
                table = TailTable(
                    relation.schema,
                    relation.name,
                    tuple(relation.columns[i] for i in relation.key),
                    whole=not relation.key,
                )
                tail.tables[(relation.schema, relation.name)] = table
            if table.whole:
                continue
            while reader.pos < len(reader.data):
                marker = reader.byte()  # K (old key), O (old row), N (new row)
                _add_key(table, relation, reader.tuple_data())
                if marker == "N":
                    break


def _add_key(table: TailTable, relation: _Relation, values: Sequence[str | bool | None]) -> None:
    key = tuple(values[i] for i in relation.key)
    if any(v is False for v in key):
        # An unchanged TOASTed key value is not sent: compare the whole table instead.
        table.whole = True
        table.keys.clear()
        return
    table.keys.add(tuple(v if isinstance(v, str) else None for v in key))


def create_tail_slot(conn: Connection, name: str) -> str:
    """Create the move's tail slot *name* on the source (dropping a stale one first)."""
    if conn.execute(
        sa.text("SELECT 1 FROM pg_replication_slots WHERE slot_name = :n"), {"n": name}
    ).first():
        conn.execute(sa.text("SELECT pg_drop_replication_slot(:n)"), {"n": name})
    conn.execute(sa.text("SELECT pg_create_logical_replication_slot(:n, 'pgoutput')"), {"n": name})
    return name


def drain(
    conn: Connection,
    slot: str,
    publication: str,
    tail: Tail | None,
    *,
    upto_lsn: str | None = None,
    timeout: float | None = None,
) -> int:
    """Consume the tail slot's changes (those committed before *upto_lsn*, if given),
    adding the changed keys to *tail* (None: discard them). Return how many messages.
    With *timeout* (seconds) the decoding is cancelled after that long.

    Values come as text, rendered under the pinned settings of
    :func:`tenantry.moves.verify.rendering_settings`, so they read back the same way.
    """
    with conn.begin(), rendering_settings(conn):
        if timeout is not None:
            set_local(conn, {"statement_timeout": timeout_ms(timeout)})
        rows = (
            conn.execute(
                sa.text(
                    "SELECT data FROM pg_logical_slot_get_binary_changes("
                    "CAST(:slot AS name), CAST(:upto AS pg_lsn), NULL,"
                    " 'proto_version', '1', 'publication_names', CAST(:pub AS text))"
                ),
                {"slot": slot, "upto": upto_lsn, "pub": publication},
            )
            .scalars()
            .all()
        )
    if tail is not None:
        parse_messages(rows, tail)
    return len(rows)


def compare_tail(
    source: Connection,
    target: Connection,
    tenant_id: str,
    tables: Sequence[TenantTable],
    tail: Tail,
    *,
    column: str = "tenant_id",
) -> list[str]:
    """Names of the tables whose changed rows differ between *source* and *target*.

    Each changed row is read on both ends by its primary key (taken from the replica
    identity's values) and compared by the md5 of its text (the same row hash as the
    ``sql`` digest); a row gone from both ends was deleted on both. Tables marked
    ``whole`` are compared in full. Both connections should be in a transaction that
    sees the state to compare.
    """
    if not tail.tables:
        return []
    # pgoutput names every relation's real namespace; the tables of the connection's
    # default schema have none.
    default = str(source.execute(sa.text("SELECT current_schema()")).scalar())
    by_name = {(t.schema or default, t.name): t for t in tables}
    differ: list[str] = []
    for changed in tail.tables.values():
        table = by_name.get((changed.schema, changed.name))
        if table is None:
            # replicated but not a tenant table any more
            differ.append(
                changed.name if changed.schema == default else f"{changed.schema}.{changed.name}"
            )
            continue
        if changed.whole:
            left: dict[str, TableDigest] = digest_tenant(source, tenant_id, [table], column=column)
            right = digest_tenant(target, tenant_id, [table], column=column)
            if left != right:
                differ.append(table.qualified_name)
            continue
        by, keys = _lookup_keys(table, changed)
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            if _row_hashes(source, tenant_id, table, by, batch, column) != _row_hashes(
                target, tenant_id, table, by, batch, column
            ):
                differ.append(table.qualified_name)
                break
    return differ


def changed_table(conn: Connection, tail: Tail, table: TenantTable) -> TailTable | None:
    """*table*'s changed rows in *tail* (None: none changed)."""
    schema = table.schema or str(conn.execute(sa.text("SELECT current_schema()")).scalar())
    return tail.tables.get((schema, table.name))


def referenced_by_changes(
    conn: Connection,
    tenant_id: str,
    table: TenantTable,
    changed: TailTable,
    columns: Sequence[str],
    column: str = "tenant_id",
) -> set[tuple[str, ...]]:
    """The distinct values (as text) of *columns* in the tenant's changed rows of
    *table* at *conn*, rows with a NULL among them aside: what those rows reference
    through a foreign key on *columns*. Not for a ``whole`` table (the caller reads
    every row of those)."""
    quote = conn.dialect.identifier_preparer.quote
    name = f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
    by, keys = _lookup_keys(table, changed)
    types = _column_types(conn, name)
    slots = [f"k{i}" for i in range(len(by))]
    arrays = ", ".join(f"CAST(:{s} AS text[])" for s in slots)
    join = " AND ".join(
        f"t.{quote(c)} = CAST(k.{s} AS {types[c]})" for c, s in zip(by, slots, strict=True)
    )
    values = ", ".join(f"t.{quote(c)}::text" for c in columns)
    present = " AND ".join(f"t.{quote(c)} IS NOT NULL" for c in columns)
    found: set[tuple[str, ...]] = set()
    with rendering_settings(conn), pinned_settings(conn, _LOOKUP_PLAN):
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            params: dict[str, object] = {s: [k[i] for k in batch] for i, s in enumerate(slots)}
            params["tenant"] = tenant_id
            found |= {
                tuple(str(v) for v in row)
                for row in conn.execute(
                    sa.text(
                        f"SELECT DISTINCT {values}"
                        f" FROM unnest({arrays}) AS k({', '.join(slots)})"
                        f" JOIN {name} AS t ON {join} AND t.{quote(column)} = :tenant"
                        f" WHERE {present}"
                    ),
                    params,
                )
            }
    return found


def _column_types(conn: Connection, name: str) -> dict[str, str]:
    return dict(
        conn.execute(
            sa.text(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 AND NOT attisdropped"
            ),
            {"t": name},
        ).all()
    )


def _lookup_keys(table: TenantTable, changed: TailTable) -> tuple[tuple[str, ...], list[Key]]:
    """The columns to find the changed rows by — the primary key when the replica
    identity holds it (always, for the default identity and FULL) — and their values."""
    by = changed.key_columns
    if set(table.primary_key) <= set(by):
        positions = [by.index(c) for c in table.primary_key]
        by = table.primary_key
        keys = {tuple(k[i] for i in positions) for k in changed.keys}
    else:
        keys = set(changed.keys)
    return by, sorted(keys, key=lambda k: tuple("" if v is None else v for v in k))


def _row_hashes(
    conn: Connection,
    tenant_id: str,
    table: TenantTable,
    by: Sequence[str],
    keys: Sequence[Key],
    column: str,
) -> dict[int, str]:
    """Row number in *keys* -> md5 of the row's text, for the rows found."""
    quote = conn.dialect.identifier_preparer.quote
    name = f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
    types = _column_types(conn, name)
    slots = [f"k{i}" for i in range(len(by))]
    arrays = ", ".join(f"CAST(:{s} AS text[])" for s in slots)
    join = " AND ".join(
        f"t.{quote(c)} = CAST(k.{s} AS {types[c]})" for c, s in zip(by, slots, strict=True)
    )
    columns = ", ".join(f"t.{quote(c)}" for c in table.columns)
    params: dict[str, object] = {s: [k[i] for k in keys] for i, s in enumerate(slots)}
    params["tenant"] = tenant_id
    with rendering_settings(conn), pinned_settings(conn, _LOOKUP_PLAN):
        rows = conn.execute(
            sa.text(
                f"SELECT k.n, md5(ROW({columns})::text)"
                f" FROM unnest({arrays}) WITH ORDINALITY AS k({', '.join(slots)}, n)"
                f" JOIN {name} AS t ON {join} AND t.{quote(column)} = :tenant"
            ),
            params,
        ).all()
    return {int(n): str(h) for n, h in rows}
