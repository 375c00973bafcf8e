"""Verification of a copy: per table, a row count and an order-independent checksum.

A table's checksum is the sum, modulo 2**64, of a 64-bit hash of each of the tenant's
rows over the copyable columns, so it does not depend on the order the rows come in.
Two methods compute it, and both sides of a comparison must use the same one:

- ``"sql"`` (PostgreSQL only): one aggregate query per table; the server hashes
  ``md5(ROW(columns)::text)``. Row text depends on session settings, so they are
  pinned first (:func:`rendering_settings`).
- ``"python"`` (any dialect; used whenever one side is SQLite): rows are streamed and
  every value is turned into a canonical string (:func:`canonical`), so that the same
  data in SQLite and PostgreSQL gives the same checksum.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.moves.tables import TenantTable
from tenantry.moves.values import value_reader

__all__ = [
    "RENDERING",
    "TableDigest",
    "canonical",
    "compare_digests",
    "digest_tenant",
    "pinned_settings",
    "rendering_settings",
    "row_hash",
    "set_local",
]

#: PostgreSQL settings under which two servers print the same value the same way.
RENDERING: Mapping[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

_MASK = (1 << 64) - 1
_STREAM_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class TableDigest:
    """A table's share of a tenant: row count and checksum (16 hex digits)."""

    table: str
    rows: int
    checksum: str


def digest_tenant(
    conn: Connection,
    tenant_id: str,
    tables: list[TenantTable],
    *,
    column: str = "tenant_id",
    method: Literal["sql", "python"] = "sql",
) -> dict[str, TableDigest]:
    """Row count and checksum of the tenant's rows in each of *tables*, in table order,
    by qualified name (:attr:`TenantTable.qualified_name`).

    Runs in the connection's current transaction; for a consistent result across
    tables the caller gives it one snapshot (PostgreSQL ``REPEATABLE READ``).
    """
    if method not in ("sql", "python"):
        raise ValueError(f"method must be 'sql' or 'python', not {method!r}")
    if method == "sql" and conn.dialect.name != "postgresql":
        raise ValueError(
            f"the 'sql' digest needs PostgreSQL, not {conn.dialect.name}: use method='python'"
        )
    digest = _digest_sql if method == "sql" else _digest_python
    # psycopg parses dates only in ISO style: the python method needs the settings too.
    with rendering_settings(conn):
        return {table.qualified_name: digest(conn, tenant_id, table, column) for table in tables}


def compare_digests(source: dict[str, TableDigest], target: dict[str, TableDigest]) -> list[str]:
    """Names of the tables whose count or checksum differ (or that one side lacks).

    In the source's table order, then tables only the target has.
    """
    differ = [name for name, digest in source.items() if target.get(name) != digest]
    return differ + [name for name in target if name not in source]


@contextmanager
def rendering_settings(conn: Connection) -> Iterator[None]:
    """Pin :data:`RENDERING` for the current transaction (``SET LOCAL``), then restore.

    Does nothing on SQLite.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    with pinned_settings(conn, RENDERING):
        yield


@contextmanager
def pinned_settings(conn: Connection, settings: Mapping[str, str]) -> Iterator[None]:
    """Set *settings* for the current transaction (``SET LOCAL``), then restore the
    previous values (PostgreSQL)."""
    names = list(settings)
    old = conn.execute(
        sa.text("SELECT current_setting(name) FROM unnest(CAST(:names AS text[])) AS name"),
        {"names": names},
    ).scalars()
    previous = dict(zip(names, old, strict=True))
    set_local(conn, settings)
    yield
    # Not on error: the transaction is failing then, and its settings end with it.
    set_local(conn, previous)


def set_local(conn: Connection, settings: Mapping[str, str]) -> None:
    """``SET LOCAL`` each of *settings*, in one statement (PostgreSQL)."""
    conn.execute(
        sa.text(
            "SELECT set_config(name, value, true) "
            "FROM unnest(CAST(:names AS text[]), CAST(:values AS text[])) AS s(name, value)"
        ),
        {"names": list(settings), "values": list(settings.values())},
    ).all()


def _digest_sql(conn: Connection, tenant_id: str, table: TenantTable, column: str) -> TableDigest:
    quote = conn.dialect.identifier_preparer.quote
    columns = ", ".join(quote(c) for c in table.columns)
    name = _table_sql(conn, table)
    # The first 64 bits of md5 as a signed bigint, summed as numeric: no overflow.
    count, total = conn.execute(
        sa.text(
            f"SELECT count(*), COALESCE(sum(('x' || left(md5(ROW({columns})::text), 16))"
            f"::bit(64)::bigint::numeric), 0) FROM {name} WHERE {quote(column)} = :tenant"
        ),
        {"tenant": tenant_id},
    ).one()
    return TableDigest(table.qualified_name, int(count), f"{int(total) & _MASK:016x}")


def _digest_python(
    conn: Connection, tenant_id: str, table: TenantTable, column: str
) -> TableDigest:
    readers = [value_reader(conn.dialect.name, t) for t in table.column_types]
    typed = [(i, f) for i, f in enumerate(readers) if f is not None]
    clause = sa.table(table.name, *(sa.column(c) for c in table.columns), schema=table.schema)
    stmt = sa.select(*clause.c).where(clause.c[column] == tenant_id)
    total = 0
    count = 0
    result = conn.execution_options(yield_per=_STREAM_ROWS).execute(stmt)
    for partition in result.partitions():
        for row in partition:
            if typed:
                values = list(row)
                for i, read in typed:
                    if values[i] is not None:
                        values[i] = read(values[i])
                total += row_hash(values)
            else:
                total += row_hash(row)
        count += len(partition)
    return TableDigest(table.qualified_name, count, f"{total & _MASK:016x}")


def row_hash(values: Iterable[Any]) -> int:
    """The 64-bit hash of one row's canonical form."""
    parts = []
    for value in values:
        if value is None:
            parts.append("N")
        else:
            text = canonical(value)
            parts.append(f"{len(text)}:{text}")
    digest = hashlib.blake2b("|".join(parts).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def canonical(value: Any) -> str:
    """One value as a string that is the same whichever database it was read from."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if value == 0:
            return "0"
        return format(value.normalize(), "f")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime):
        moment: dt.datetime = value
        if moment.tzinfo is not None:  # naive means UTC
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return moment.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return repr(value.total_seconds())
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        # SQLAlchemy's Uuid keeps 32 hex digits on SQLite
        return value.hex
    if isinstance(value, dict | list | tuple):
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=canonical
        )
    return str(value)


def _table_sql(conn: Connection, table: TenantTable) -> str:
    quote = conn.dialect.identifier_preparer.quote
    if table.schema:
        return f"{quote(table.schema)}.{quote(table.name)}"
    return quote(table.name)
