"""Copying a tenant's rows between shards, and deleting them in batches.

PostgreSQL to PostgreSQL streams ``COPY (SELECT ...) TO STDOUT`` into ``COPY ... FROM
STDIN`` through psycopg's libpq connection: the rows are never parsed in Python, only
gathered into blocks of about 128 kB and passed on (binary format when the column types
match on both sides, text otherwise). Any pair involving SQLite selects the rows in
batches in key order and inserts each batch with one ``executemany``.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import generators, sql
from psycopg.copy import Copy
from sqlalchemy import Connection, Engine

from tenantry.moves.tables import (
    TenantTable,
    check_same_tables,
    quoted_name,
    tenant_tables,
)
from tenantry.moves.values import Convert, value_reader, value_writer
from tenantry.moves.verify import rendering_settings
from tenantry.shardmap.drivers import WRITE, mark_error

__all__ = ["ProgressFn", "TableCopy", "copy_tenant", "delete_tenant_rows"]

#: (table, rows so far, bytes so far)
ProgressFn = Callable[[str, int, int], None]

#: Bytes gathered before each write to the target: psycopg's largest unsplit block.
_BLOCK = 128 * 1024
#: Least time between two progress reports of one table, in seconds.
_PROGRESS_EVERY = 0.2
#: A binary COPY stream with no rows: 19 bytes of header, 2 of trailer.
_EMPTY_BINARY = 21
#: Sequences this close behind the copied ids advance by nextval, which cannot go back.
_NEXTVAL_GAP = 1000


@dataclass(frozen=True, slots=True)
class TableCopy:
    """What copying one table did.

    ``bytes`` is the size of the COPY stream between PostgreSQL servers; for batched
    copies it is an estimate: the length of text and binary values, 8 for any other.
    """

    table: str
    rows: int
    bytes: int
    seconds: float


def copy_tenant(
    source: Connection,
    target: Connection,
    tenant_id: str,
    tables: list[TenantTable],
    *,
    column: str = "tenant_id",
    batch_size: int = 5000,
    progress: ProgressFn | None = None,
    checkpoint: Callable[[str], None] | None = None,
    target_tables: list[TenantTable] | None = None,
) -> list[TableCopy]:
    """Copy the tenant's rows of *tables* (parents first) from *source* to *target*.

    The target's tables are reflected and checked against *tables*, unless the caller
    did so already and passes them as *target_tables* (a move, when planned).

    The caller has begun both transactions: *source* in one snapshot (PostgreSQL
    ``REPEATABLE READ, READ ONLY``, SQLite a read transaction), *target* a normal
    one, which the caller commits afterwards; nothing is committed here. Rows of the
    tenant already at the target (an interrupted copy) are deleted first, children
    before parents, so the copy never duplicates. On a PostgreSQL target, sequences
    are then advanced past the copied ids, never moved back.

    *progress* is called every ~0.2 s per table and once at its end; *checkpoint*
    with ``"copy-mid"`` once, after the first block of the first non-empty table has
    been written, and with ``"copy-table:<name>"`` after each table.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not tables:
        return []
    if target_tables is None:
        # The target's tables of the same schemas (the default one always).
        schemas = sorted({t.schema for t in tables if t.schema})
        target_tables = tenant_tables(target, column=column, schemas=schemas)
        check_same_tables(tables, target_tables)
    at_target = {(t.schema, t.name): t for t in target_tables}
    pairs = [(t, at_target[t.schema, t.name]) for t in tables]

    _defer_foreign_keys(target)
    for _table, there in reversed(pairs):
        _delete_all(target, tenant_id, there, column)

    mid = _Once(checkpoint, "copy-mid")
    both_pg = source.dialect.name == target.dialect.name == "postgresql"
    unsafe = _binary_unsafe(source, tables) if both_pg else set()
    copies: list[TableCopy] = []
    for table, there in pairs:
        started = time.monotonic()
        report = _Reporter(table.qualified_name, progress)
        if both_pg:
            binary = table.qualified_name not in unsafe and _same_types(
                source, target, table, there
            )
            rows, size = _copy_postgresql(
                source, target, tenant_id, table, column, binary=binary, report=report, mid=mid
            )
        else:
            with rendering_settings(source), rendering_settings(target):
                rows, size = _copy_batches(
                    source, target, tenant_id, table, there, column, batch_size, report, mid
                )
        report.done(rows, size)
        copies.append(TableCopy(table.qualified_name, rows, size, time.monotonic() - started))
        if checkpoint is not None:
            checkpoint(f"copy-table:{table.qualified_name}")
    if target.dialect.name == "postgresql":
        for _table, there in pairs:
            for col, sequence in there.sequences:
                _advance_sequence(target, tenant_id, there, column, col, sequence)
    return copies


def replica_allowed(conn: Connection) -> bool:
    """Whether this PostgreSQL role may set ``session_replication_role`` (a superuser,
    or one granted SET on it)."""
    allowed = conn.exec_driver_sql(
        "SELECT has_parameter_privilege('session_replication_role', 'SET')"
    ).scalar()
    return bool(allowed)


def quiet_triggers(conn: Connection) -> None:
    """Run the rest of this transaction as logical replication's apply worker does:
    ``session_replication_role = replica``, so that the application's triggers (and
    foreign-key checks, whose order the copy keeps) do not fire for rows the move
    copies or cleans. PostgreSQL; the caller checked :func:`replica_allowed`."""
    conn.exec_driver_sql("SET LOCAL session_replication_role = replica")


def user_triggers(conn: Connection, tables: Iterable[TenantTable]) -> list[str]:
    """``table.trigger`` for every enabled trigger of the application on *tables*."""
    if conn.dialect.name != "postgresql":
        return []
    names = [quoted_name(conn, table) for table in tables]
    if not names:
        return []
    rows = conn.execute(
        sa.text(
            "SELECT t.tgrelid::regclass::text || '.' || t.tgname FROM pg_trigger t"
            " WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'"
            "  AND t.tgrelid = ANY(ARRAY(SELECT to_regclass(n)"
            "   FROM unnest(CAST(:names AS text[])) n)) ORDER BY 1"
        ),
        {"names": names},
    )
    return [str(name) for (name,) in rows]


def delete_tenant_rows(
    engine: Engine,
    tenant_id: str,
    tables: list[TenantTable],
    *,
    column: str = "tenant_id",
    batch_size: int = 5000,
    progress: Callable[[str, int], None] | None = None,
    checkpoint: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> int:
    """Delete the tenant's rows of *tables*, children first; return how many.

    With *quiet* (PostgreSQL), each batch runs without the application's triggers
    (:func:`quiet_triggers`).

    Each batch of *batch_size* rows is its own short transaction, so that other
    tenants' traffic on a shared shard keeps flowing; *progress* gets the table and
    its rows deleted so far after each batch, and *checkpoint* ``"clean-mid"`` after
    the first batch that deleted rows. Deleting again deletes nothing. *engine*
    should be the operations role: row-level security would hide the rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    mid = _Once(checkpoint, "clean-mid")
    total = 0
    for table in reversed(tables):
        statement = _batch_delete(engine.dialect, table, column)
        deleted = 0
        while True:
            with engine.connect() as conn:
                conn = conn.execution_options(**WRITE)
                with conn.begin():
                    if quiet:
                        quiet_triggers(conn)
                    count = conn.execute(statement, {"tenant": tenant_id, "n": batch_size}).rowcount
            deleted += count
            total += count
            if count:
                if progress is not None:
                    progress(table.qualified_name, deleted)
                mid()
            # Fewer than asked means none left; PostgreSQL's "= tenant AND ctid = ANY"
            # may match more than asked (a partitioned table repeats ctids).
            if count < batch_size:
                break
    return total


# PostgreSQL to PostgreSQL ---------------------------------------------------------------


def _copy_postgresql(
    source: Connection,
    target: Connection,
    tenant_id: str,
    table: TenantTable,
    column: str,
    *,
    binary: bool,
    report: _Reporter,
    mid: _Once,
) -> tuple[int, int]:
    src = _psycopg(source)
    dst = _psycopg(target)
    name = _identifier(table)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in table.columns)
    options = sql.SQL(" (FORMAT BINARY)" if binary else "")
    copy_out = sql.SQL("COPY (SELECT {} FROM {} WHERE {} = {}) TO STDOUT{}").format(
        columns, name, sql.Identifier(column), sql.Literal(tenant_id), options
    )
    copy_in = sql.SQL("COPY {} ({}) FROM STDIN{}").format(name, columns, options)
    try:
        with _text_settings(source, target, binary):
            with src.cursor() as out_cursor, dst.cursor() as in_cursor:
                with out_cursor.copy(copy_out), in_cursor.copy(copy_in) as copy_in_:
                    size = _pump(src, copy_in_, binary=binary, report=report, mid=mid)
                rows = in_cursor.rowcount
    except psycopg.Error as exc:
        # psycopg raises these itself, past SQLAlchemy: say which end failed while
        # both connections can still tell (the caller names the shard).
        if src.broken or (exc.pgconn is not None and exc.pgconn is src.pgconn):
            mark_error(exc, source.engine.url)
        elif dst.broken or (exc.pgconn is not None and exc.pgconn is dst.pgconn):
            mark_error(exc, target.engine.url)
        raise
    return rows, size


def _pump(
    src: psycopg.Connection[Any], sink: Copy, *, binary: bool, report: _Reporter, mid: _Once
) -> int:
    """Pass the source's COPY stream to *sink* in blocks; return the bytes passed.

    psycopg's ``Copy.read()`` costs a generator round trip per row; taking libpq's
    messages here without blocking, and waiting on the socket only when none is
    buffered, keeps up with ``psql | psql``.
    """
    pgconn = src.pgconn
    get = pgconn.get_copy_data
    block = bytearray()
    messages = 0
    size = 0
    # not select.select(): it fails on descriptors above 1024, which a busy process has
    with selectors.DefaultSelector() as readable:
        readable.register(pgconn.socket, selectors.EVENT_READ)
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                block += data
                messages += 1
                if len(block) >= _BLOCK:
                    sink.write(block)
                    size += len(block)
                    block = bytearray()
                    report.tick(messages, size)
                    if size > _EMPTY_BINARY or not binary:
                        mid()
            elif nbytes == 0:
                readable.select()  # releases the GIL while the server works
                pgconn.consume_input()
            else:
                break
    # The COPY's own result, as psycopg's Copy would have read it, before anything
    # else can fail: the source connection is then ready for the caller's rollback.
    for result in src.wait(generators.fetch_many(pgconn)):
        if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
            raise psycopg.errors.error_from_result(result, encoding=src.info.encoding)
    if block:
        sink.write(block)
        size += len(block)
        if size > _EMPTY_BINARY or not binary:
            mid()
    return size


def _psycopg(conn: Connection) -> psycopg.Connection[Any]:
    raw = conn.connection.dbapi_connection
    if not isinstance(raw, psycopg.Connection):
        raise TypeError("PostgreSQL copies need SQLAlchemy's psycopg (3) driver")
    return raw


def _identifier(table: TenantTable) -> sql.Identifier:
    if table.schema:
        return sql.Identifier(table.schema, table.name)
    return sql.Identifier(table.name)


def _same_types(
    source: Connection, target: Connection, table: TenantTable, there: TenantTable
) -> bool:
    """Binary COPY carries raw values: same types, and text in the same encoding."""
    if any(table.column_type(c) != there.column_type(c) for c in table.columns):
        return False
    encoding = "server_encoding"
    return bool(
        _psycopg(source).info.parameter_status(encoding)
        == _psycopg(target).info.parameter_status(encoding)
    )


_UNSAFE_BINARY = sa.text(
    """
    SELECT DISTINCT u.i
      FROM unnest(CAST(:tables AS regclass[])) WITH ORDINALITY AS u(oid, i)
      JOIN pg_attribute a ON a.attrelid = u.oid
      JOIN pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_type b ON b.oid = t.typbasetype
     WHERE TRUE
       AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
       AND (
           (t.typtype = 'c' AND t.oid >= 16384) OR (t.typelem >= 16384 AND t.typlen = -1)
           OR (b.typtype = 'c' AND b.oid >= 16384) OR (b.typelem >= 16384 AND b.typlen = -1)
       )
    """
)


def _binary_unsafe(source: Connection, tables: Sequence[TenantTable]) -> set[str]:
    """Tables with arrays or composites of user-defined types.

    Their binary form embeds type oids, which differ between databases: those tables
    copy in text format.
    """
    names = [_identifier(t).as_string(_psycopg(source)) for t in tables]
    found = source.execute(_UNSAFE_BINARY, {"tables": names}).scalars()
    return {tables[int(i) - 1].qualified_name for i in found}


@contextmanager
def _text_settings(source: Connection, target: Connection, binary: bool) -> Iterator[None]:
    """Text COPY: both sides print and parse values alike (dates, intervals, floats)."""
    if binary:
        yield
        return
    wanted = _psycopg(source).info.parameter_status("client_encoding")
    previous = _psycopg(target).info.parameter_status("client_encoding")
    with rendering_settings(source), rendering_settings(target):
        # The text travels as the source encodes it: the target must decode it so.
        if wanted and previous and wanted != previous:
            _set_encoding(target, wanted)
            yield
            _set_encoding(target, previous)
        else:
            yield


def _set_encoding(conn: Connection, encoding: str) -> None:
    conn.execute(sa.text("SELECT set_config('client_encoding', :e, true)"), {"e": encoding})


def _advance_sequence(
    conn: Connection, tenant_id: str, table: TenantTable, column: str, col: str, sequence: str
) -> None:
    """Move *sequence* past the tenant's largest *col*, never backwards.

    Other tenants on a shared shard draw from the same sequence while this runs. A
    sequence a little behind takes the missing values by ``nextval``, which no one
    can undo; one far behind is set with ``setval`` only if still behind.
    """
    quote = conn.dialect.identifier_preparer.quote
    top = conn.execute(
        sa.text(
            f"SELECT max({quote(col)}) FROM {_table_sql(conn, table)} "
            f"WHERE {quote(column)} = :tenant"
        ),
        {"tenant": tenant_id},
    ).scalar()
    if top is None or not isinstance(top, int):
        return
    # The name as PostgreSQL prints it: resolved, and quoted where needed.
    name, increment = conn.execute(
        sa.text(
            "SELECT CAST(seqrelid AS regclass)::text, seqincrement FROM pg_sequence "
            "WHERE seqrelid = CAST(:seq AS regclass)"
        ),
        {"seq": sequence},
    ).one()
    if increment <= 0:
        return  # descending sequences are left alone
    last, called = conn.execute(sa.text(f"SELECT last_value, is_called FROM {name}")).one()
    following = last + increment if called else last
    if following > top:
        return
    steps = (top - following) // increment + 1
    if steps <= _NEXTVAL_GAP:
        conn.execute(
            sa.text("SELECT nextval(CAST(:seq AS regclass)) FROM generate_series(1, :n)"),
            {"seq": sequence, "n": steps},
        ).all()
    else:
        # Checked again in the statement that sets it, in case others drew meanwhile.
        conn.execute(
            sa.text(
                f"SELECT setval(CAST(:seq AS regclass), :top) FROM {name} "
                "WHERE (CASE WHEN is_called THEN last_value ELSE last_value - 1 END) < :top"
            ),
            {"seq": sequence, "top": top},
        ).all()


# Any other pair: batches ----------------------------------------------------------------


def _copy_batches(
    source: Connection,
    target: Connection,
    tenant_id: str,
    table: TenantTable,
    there: TenantTable,
    column: str,
    batch_size: int,
    report: _Reporter,
    mid: _Once,
) -> tuple[int, int]:
    same = source.dialect.name == target.dialect.name
    converters: list[tuple[int, Convert]] = []
    if not same:  # SQLite to SQLite copies stored values as they are
        for i, name in enumerate(table.columns):
            read = value_reader(source.dialect.name, table.column_type(name) or "")
            write = value_writer(target.dialect.name, there.column_type(name) or "")
            convert = _chain(read, write) if read and write else read or write
            if convert is not None:
                converters.append((i, convert))
    clause = sa.table(table.name, *(sa.column(c) for c in table.columns), schema=table.schema)
    select_rows = (
        sa.select(*clause.c)
        .where(clause.c[column] == tenant_id)
        .order_by(*(clause.c[c] for c in table.primary_key))
    )
    insert = _insert_sql(target, there, table.columns)
    keys = [f"p{i}" for i in range(len(table.columns))]
    rows = 0
    size = 0
    result = source.execution_options(yield_per=batch_size).execute(select_rows)
    for partition in result.partitions():
        batch = []
        for row in partition:
            values = list(row)
            for i, convert in converters:
                if values[i] is not None:
                    values[i] = convert(values[i])
            batch.append(dict(zip(keys, values, strict=True)))
        target.execute(insert, batch)
        rows += len(batch)
        size += _estimate(partition)
        report.tick(rows, size)
        mid()
    return rows, size


def _chain(first: Convert, second: Convert) -> Convert:
    return lambda value: second(first(value))


def _insert_sql(conn: Connection, table: TenantTable, columns: Sequence[str]) -> sa.TextClause:
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    params = ", ".join(f":p{i}" for i in range(len(columns)))
    # The source's ids are kept, identity columns GENERATED ALWAYS included.
    overriding = " OVERRIDING SYSTEM VALUE" if conn.dialect.name == "postgresql" else ""
    return sa.text(f"INSERT INTO {_table_sql(conn, table)} ({names}){overriding} VALUES ({params})")


def _estimate(rows: Sequence[Sequence[Any]]) -> int:
    size = 0
    for row in rows:
        for value in row:
            size += len(value) if isinstance(value, str | bytes) else 8
    return size


# Both ---------------------------------------------------------------------------------


def _table_sql(conn: Connection, table: TenantTable) -> str:
    quote = conn.dialect.identifier_preparer.quote
    if table.schema:
        return f"{quote(table.schema)}.{quote(table.name)}"
    return quote(table.name)


def _defer_foreign_keys(conn: Connection) -> None:
    """Check foreign keys at commit where the database allows: cycles then copy."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")  # until this commit
    else:
        conn.exec_driver_sql("SET CONSTRAINTS ALL DEFERRED")  # DEFERRABLE ones only


def _delete_all(conn: Connection, tenant_id: str, table: TenantTable, column: str) -> None:
    quote = conn.dialect.identifier_preparer.quote
    conn.execute(
        sa.text(f"DELETE FROM {_table_sql(conn, table)} WHERE {quote(column)} = :tenant"),
        {"tenant": tenant_id},
    )


def _batch_delete(dialect: sa.Dialect, table: TenantTable, column: str) -> sa.TextClause:
    quote = dialect.identifier_preparer.quote
    name = f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
    tenant = f"{quote(column)} = :tenant"
    if dialect.name == "postgresql":
        # "ctid = ANY(ARRAY(...))" is a TID scan; "ctid IN (SELECT ...)" would be a
        # semi-join over the whole table. The tenant test keeps a partitioned table,
        # whose partitions repeat ctids, from touching another tenant's rows.
        return sa.text(
            f"DELETE FROM {name} WHERE {tenant} AND ctid = ANY(ARRAY("
            f"SELECT ctid FROM {name} WHERE {tenant} LIMIT :n))"
        )
    if table.without_rowid:
        key = ", ".join(quote(c) for c in table.primary_key)
        return sa.text(
            f"DELETE FROM {name} WHERE ({key}) IN (SELECT {key} FROM {name} "
            f"WHERE {tenant} LIMIT :n)"
        )
    return sa.text(
        f"DELETE FROM {name} WHERE rowid IN (SELECT rowid FROM {name} WHERE {tenant} LIMIT :n)"
    )


class _Once:
    """Calls ``checkpoint(name)`` the first time it is called, then never again."""

    __slots__ = ("_checkpoint", "_name")

    def __init__(self, checkpoint: Callable[[str], None] | None, name: str) -> None:
        self._checkpoint = checkpoint
        self._name = name

    def __call__(self) -> None:
        if self._checkpoint is not None:
            checkpoint, self._checkpoint = self._checkpoint, None
            checkpoint(self._name)


class _Reporter:
    """Progress of one table: at most every ``_PROGRESS_EVERY`` seconds, and at its end."""

    __slots__ = ("_last", "_progress", "_table")

    def __init__(self, table: str, progress: ProgressFn | None) -> None:
        self._table = table
        self._progress = progress
        self._last = time.monotonic()

    def tick(self, rows: int, size: int) -> None:
        if self._progress is not None and (now := time.monotonic()) - self._last >= _PROGRESS_EVERY:
            self._last = now
            self._progress(self._table, rows, size)

    def done(self, rows: int, size: int) -> None:
        if self._progress is not None:
            self._progress(self._table, rows, size)
