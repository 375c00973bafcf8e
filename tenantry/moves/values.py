"""Column values across dialects: how a copy or a digest reads and writes them.

SQLite keeps dates, JSON, booleans and decimals as text or numbers; PostgreSQL as
typed values. A copy or digest that involves SQLite reads each SQLite value into the
Python object PostgreSQL (psycopg) would give, and writes Python objects back the way
SQLAlchemy's own types store them in SQLite. A value that does not parse is passed on
unchanged rather than failing a whole move over a single odd row.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from contextlib import suppress
from decimal import Decimal
from typing import Any

__all__ = ["Convert", "value_reader", "value_writer"]

Convert = Callable[[Any], Any]


def value_reader(dialect: str, declared: str) -> Convert | None:
    """How to turn a value read from a *declared*-type column into a typed object.

    None when the driver's value is used as is (all of PostgreSQL).
    """
    if dialect != "sqlite":
        return None
    kind = _sqlite_kind(declared)
    return _SQLITE_READERS.get(kind)


def value_writer(dialect: str, declared: str) -> Convert | None:
    """How to turn a Python object into what a *declared*-type column should store.

    None when the driver adapts the object itself.
    """
    if dialect == "postgresql":
        name = declared.lower()
        if name == "json":
            return _to_pg_json
        if name == "jsonb":
            return _to_pg_jsonb
        if name == "timestamp with time zone":
            return _naive_is_utc
        return None
    writer: Convert = _SQLITE_WRITERS.get(_sqlite_kind(declared), _to_sqlite_any)
    return writer


def _sqlite_kind(declared: str) -> str:
    name = declared.upper().split("(", 1)[0].strip()
    if "JSON" in name:
        return "json"
    if "BOOL" in name:
        return "bool"
    if name.startswith(("DATETIME", "TIMESTAMP")):
        return "datetime"
    if name == "DATE":
        return "date"
    if name.startswith("TIME"):
        return "time"
    if name.startswith(("NUMERIC", "DECIMAL")):
        return "numeric"
    return ""


def _iso_reader(parse: Callable[[str], Any]) -> Convert:
    """A reader of SQLite's ISO 8601 text with *parse* (other values, and text it
    cannot parse, pass unchanged)."""

    def read(value: Any) -> Any:
        if isinstance(value, str):
            with suppress(ValueError):
                return parse(value)
        return value

    return read


_read_datetime = _iso_reader(dt.datetime.fromisoformat)
_read_date = _iso_reader(dt.date.fromisoformat)
_read_time = _iso_reader(dt.time.fromisoformat)


def _read_bool(value: Any) -> Any:
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return value


def _read_numeric(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | str):
        with suppress(ArithmeticError):
            return Decimal(value)
    if isinstance(value, float):
        # repr is the shortest text that round-trips: 12.34, not 12.339999...
        return Decimal(repr(value))
    return value


def _read_json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        with suppress(ValueError):
            return json.loads(value)
    return value


def _utc_naive(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _write_datetime(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        # SQLAlchemy's SQLite DateTime storage format
        return _utc_naive(value).isoformat(" ", "microseconds")
    return value


def _write_date(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _write_time(value: Any) -> Any:
    if isinstance(value, dt.time):
        return value.replace(tzinfo=None).isoformat("microseconds")
    return value


def _write_bool(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _write_numeric(value: Any) -> Any:
    # SQLite has no decimal type; SQLAlchemy stores floats, and so do we.
    return float(value) if isinstance(value, Decimal) else value


def _write_json(value: Any) -> Any:
    if value is None:
        return None
    return json.dumps(value, default=str)


def _to_sqlite_any(value: Any) -> Any:
    if value is None or isinstance(value, int | float | str | bytes):
        return value
    if isinstance(value, dt.datetime):
        return _write_datetime(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return value.hex  # as SQLAlchemy's Uuid stores it
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _to_pg_json(value: Any) -> Any:
    from psycopg.types.json import Json

    return None if value is None else Json(value)


def _to_pg_jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return None if value is None else Jsonb(value)


def _naive_is_utc(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


_SQLITE_READERS: dict[str, Convert] = {
    "json": _read_json,
    "bool": _read_bool,
    "datetime": _read_datetime,
    "date": _read_date,
    "time": _read_time,
    "numeric": _read_numeric,
}
_SQLITE_WRITERS: dict[str, Convert] = {
    "json": _write_json,
    "bool": _write_bool,
    "datetime": _write_datetime,
    "date": _write_date,
    "time": _write_time,
    "numeric": _write_numeric,
}
