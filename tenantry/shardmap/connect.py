"""Engines for tenantry's own use, and database errors turned into tenantry errors.

The same engine set-up serves the catalog, shard administration and the router:
PostgreSQL through psycopg 3 with a connect timeout; SQLite in WAL mode with foreign
keys on, a busy timeout, and ``BEGIN IMMEDIATE`` for transactions that will write
(so two writers queue on the lock instead of failing half-way with "database is
locked").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tenantry.errors import CatalogError, ConfigurationError, TenantryError

__all__ = [
    "WRITE",
    "DatabaseUnavailable",
    "describe_error",
    "make_async_engine",
    "make_engine",
    "translate_errors",
]

#: Execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE = {"tenantry_write": True}

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


class DatabaseUnavailable(TenantryError):
    """A database cannot be reached (internal; callers raise a specific subclass)."""


def describe_error(exc: BaseException) -> str:
    """One line about a driver error: no SQL, no parameters, no password."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(orig).strip().splitlines()
    line = text[0] if text else type(orig).__name__
    return _URL_PASSWORD.sub(r"\1***@", line)


def make_engine(
    url: str,
    *,
    connect_timeout: float = 5.0,
    poolclass: Any = None,
    **kwargs: Any,
) -> Engine:
    """An engine with tenantry's connection set-up for *url* (SQLite or PostgreSQL)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            "not a database URL: write it as postgresql://user@host:port/dbname "
            "or sqlite:///path/to/file.db"
        ) from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = kwargs.pop("connect_args", {})
    if poolclass is not None:
        kwargs["poolclass"] = poolclass
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # If the folder cannot be made, connecting says so, as one tenantry error.
            with suppress(OSError):
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args.setdefault("timeout", max(connect_timeout, 30.0))
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args.setdefault("connect_timeout", max(1, round(connect_timeout)))
    else:
        # Any other dialect would fail later with a driver ImportError and a traceback.
        raise ConfigurationError(
            f"{backend!r} databases are not supported: use postgresql:// or sqlite:///"
        )
    try:
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(f"cannot use database URL: {describe_error(exc)}") from None
    if backend == "sqlite":
        _setup_sqlite(engine)
    return engine


def make_async_engine(url: str, *, connect_timeout: float = 5.0, **kwargs: Any) -> AsyncEngine:
    """The asyncio twin of :func:`make_engine`: psycopg's async driver, or aiosqlite."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError("not a database URL") from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = kwargs.pop("connect_args", {})
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        connect_args.setdefault("timeout", max(connect_timeout, 30.0))
    else:
        parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args.setdefault("connect_timeout", max(1, round(connect_timeout)))
    try:
        engine = create_async_engine(parsed, connect_args=connect_args, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigurationError(f"cannot use database URL: {describe_error(exc)}") from None
    if backend == "sqlite":
        _setup_sqlite(engine.sync_engine)
    return engine


def _setup_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling begins lazily and cannot take the write lock
    # up front; take over BEGIN ourselves (SQLAlchemy's documented recipe).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        write = conn.get_execution_options().get("tenantry_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def translate_errors(
    what: str,
    *,
    unavailable: type[TenantryError] = DatabaseUnavailable,
    failed: type[TenantryError] = CatalogError,
) -> Iterator[None]:
    """Turn SQLAlchemy errors met while doing *what* into one-line tenantry errors."""
    try:
        yield
    except TenantryError:
        raise
    except DBAPIError as exc:
        if exc.connection_invalidated or _is_connect_error(exc):
            raise unavailable(f"cannot reach {what}: {describe_error(exc)}") from None
        raise failed(f"{what} failed: {describe_error(exc)}") from None
    except SQLAlchemyError as exc:
        raise failed(f"{what} failed: {describe_error(exc)}") from None


def _is_connect_error(exc: DBAPIError) -> bool:
    text = str(exc.orig)
    return (
        ("connection" in text.lower() and ("failed" in text or "refused" in text))
        or "unable to open database" in text
        or "timeout expired" in text
        or "resolve host" in text
    )
