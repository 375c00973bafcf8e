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
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from tenantry.errors import CatalogError, ConfigurationError, TenantryError
from tenantry.shardmap.model import parse_url

if TYPE_CHECKING:  # the asyncio extension (and SQLAlchemy's ORM) only when asked for
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "WRITE",
    "DatabaseUnavailable",
    "describe_error",
    "make_async_engine",
    "make_engine",
    "mark_error",
    "raised_by",
    "translate_errors",
]

#: Execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE = {"tenantry_write": True}

#: user:password@ in a URL inside a message; to the last "@" of the URL, so that an
#: unescaped "@" in a password leaves nothing of it.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")


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
    parsed = parse_url(url, error=ConfigurationError)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = kwargs.pop("connect_args", {})
    if poolclass is not None:
        kwargs["poolclass"] = poolclass
    if backend == "sqlite":
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
    else:
        _mark_errors(engine)
    return engine


def _mark_errors(engine: Engine) -> None:
    @event.listens_for(engine, "handle_error")
    def _handle_error(context: Any) -> None:
        mark_error(context.original_exception, engine.url)


def make_async_engine(url: str, *, connect_timeout: float = 5.0, **kwargs: Any) -> AsyncEngine:
    """The asyncio twin of :func:`make_engine`: psycopg's async driver, or aiosqlite."""
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = parse_url(url, error=ConfigurationError)
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
    @event.listens_for(engine, "do_connect")
    def _folder(_dialect: Any, _record: Any, cargs: Any, _cparams: Any) -> None:
        # The file's folder, made on the first connection (not when the engine is
        # made: a catalog looked for and not found leaves nothing behind). If it cannot
        # be made, connecting says so, as one tenantry error.
        database = str(engine.url.database or "")
        if database and database != ":memory:" and not database.startswith("file:"):
            with suppress(OSError):
                Path(database).parent.mkdir(parents=True, exist_ok=True)

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
    url: str | None = None,
) -> Iterator[None]:
    """Turn database errors met while doing *what* into one-line tenantry errors.

    SQLAlchemy's errors and the driver's own (psycopg's COPY, for one, raises them
    unwrapped) alike. With *url*, an error raised on a connection to another
    PostgreSQL database is not claimed: it passes on, for the block that opened that
    connection to name its own database (a move holds one to each end).
    """
    try:
        yield
    except TenantryError:
        raise
    except (DBAPIError, psycopg.Error) as exc:
        if url is not None and not raised_by(exc, url):
            raise
        if _is_connect_error(exc):
            raise unavailable(f"cannot reach {what}: {describe_error(exc)}") from None
        raise failed(f"{what} failed: {describe_error(exc)}") from None
    except SQLAlchemyError as exc:
        raise failed(f"{what} failed: {describe_error(exc)}") from None


def raised_by(exc: BaseException, url: str) -> bool:
    """Whether *exc* could come from a connection to *url*'s database: False only when
    the error is known to come from a connection to another database (or server); an
    error that says nothing of its connection is anyone's.

    Engines of :func:`make_engine` mark the errors of the statements they run with
    their URL (:func:`mark_error` does it for raw driver calls); otherwise psycopg's
    own record of the connection, while it is open, tells.
    """
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    try:
        wanted = make_url(url)
        marked = getattr(orig, _MARK, None)
        if marked is not None:
            there = make_url(marked)
            return _same_place(
                (there.host or "", str(there.port or 5432), there.database or ""), wanted
            )
        pgconn = getattr(orig, "pgconn", None)
        if pgconn is None:
            return True
        place = (pgconn.host.decode(), pgconn.port.decode() or "5432", pgconn.db.decode())
    except Exception:  # a closed connection says nothing more
        return True
    return _same_place(place, wanted)


def mark_error(exc: BaseException, url: object) -> None:
    """Note on *exc* the database it was raised on (for :func:`raised_by`), unless a
    closer caller noted it already. *url* is the connection's URL (its password is
    never kept)."""
    if getattr(exc, _MARK, None) is None:
        with suppress(AttributeError, TypeError):
            parsed = make_url(url)  # type: ignore[arg-type]
            setattr(exc, _MARK, parsed.set(password=None).render_as_string())


_MARK = "tenantry_database"


def _same_place(place: tuple[str, str, str], wanted: Any) -> bool:
    host, port, db = place
    if wanted.get_backend_name() not in ("postgresql", "postgres"):
        return False
    if db != (wanted.database or "") or port != str(wanted.port or 5432):
        return False
    local = {"", "localhost", "127.0.0.1", "::1"}
    want = wanted.host or ""
    return host == want or (
        (host in local or host.startswith("/")) and (want in local or want.startswith("/"))
    )


def _is_connect_error(exc: DBAPIError | psycopg.Error) -> bool:
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig: BaseException | None = exc.orig
    else:
        orig = exc
    if isinstance(orig, psycopg.OperationalError) and orig.pgconn is not None:
        # The server went away under a statement (shut down, terminated, the network).
        with suppress(Exception):
            if orig.pgconn.status != psycopg.pq.ConnStatus.OK:
                return True
    text = str(orig)
    return (
        ("connection" in text.lower() and ("failed" in text or "refused" in text))
        or "unable to open database" in text
        or "timeout expired" in text
        or "resolve host" in text
    )
