"""Database URLs: parsed with one-line errors, normalised, masked (no password is ever
shown), and pointed at another database of the same server.

A base module: it imports nothing of tenantry but :mod:`tenantry.errors`, so that
settings, the shard map and everything above can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tenantry.errors import InvalidShardUrl

__all__ = [
    "absolute_sqlite_path",
    "libpq_conninfo",
    "mask_url",
    "normalize_url",
    "parse_url",
    "with_database",
]


def _parse(url: str | URL) -> URL:
    return parse_url(url, error=InvalidShardUrl)


def parse_url(url: str | URL, *, error: type[Exception] = InvalidShardUrl) -> URL:
    """Parse a database URL, or raise *error* with one line that says what is wrong,
    shows the URL masked, and holds no fragment of its password.

    Refused: text that is no URL, a port that is no number, and an authority with two
    ``@`` (an unescaped ``@`` in the password, which would otherwise be read as part of
    the host and end up in "cannot resolve host" errors).
    """
    if isinstance(url, URL):
        return url
    text = str(url)
    _scheme, sep, rest = text.partition("://")
    userinfo, at, _host = rest.rpartition("@") if sep else ("", "", "")
    if at and "@" in userinfo and "/" not in userinfo:
        raise error(
            f"database URL {mask_url(text)} has an '@' in its user name or password: "
            "write it as %40 (and ':' as %3A, '/' as %2F)"
        )
    try:
        return make_url(text)
    except (ArgumentError, ValueError) as exc:
        port = "invalid literal for int()" in str(exc)
        hint = (
            "its port is not a number"
            if port
            else "write it as postgresql://user@host:port/dbname or sqlite:///path/to/file.db"
        )
        raise error(f"not a database URL: {mask_url(text)}: {hint}") from None


def absolute_sqlite_path(database: str) -> str:
    """*database* (a SQLite URL's path) made absolute against the working directory;
    ``file:`` URIs and ``:memory:`` are left as they are."""
    if database == ":memory:" or database.startswith("file:"):
        return database
    return os.path.abspath(os.path.expanduser(database))


def normalize_url(url: str | URL) -> str:
    """Check that *url* is SQLite or PostgreSQL and pin PostgreSQL to psycopg 3.

    ``postgres://`` and ``postgresql://`` become ``postgresql+psycopg://``, so that
    every engine of the fleet uses the same driver; a relative SQLite path is made
    absolute, so that the map means the same from any working directory.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
        if not parsed.database:
            raise InvalidShardUrl(f"{mask_url(parsed)} names no database: add /dbname")
    elif backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise InvalidShardUrl(
                "an in-memory SQLite database cannot be shared: use sqlite:///path/to/file.db"
            )
        # A relative path would mean another file in every working directory.
        parsed = parsed.set(database=absolute_sqlite_path(parsed.database))
    else:
        raise InvalidShardUrl(
            f"{backend!r} databases are not supported: use postgresql:// or sqlite:///"
        )
    return parsed.render_as_string(hide_password=False)


def mask_url(url: str | URL) -> str:
    """Render *url* with its password replaced by ``***``; never fails.

    Text is masked as written, whether it parses or not: everything between the first
    ``:`` of the user information and its last ``@`` is the password, so an unescaped
    ``@`` in a password never leaves a piece of it in sight.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "***"
    end = len(rest)
    for stop in ("?", "#"):
        if stop in rest:
            end = min(end, rest.index(stop))
    at = rest.rfind("@", 0, end)
    if at < 0:
        try:
            make_url(text)
        except (ArgumentError, ValueError):
            return f"{scheme}://***"  # garbage: no telling what in it is secret
        return text
    user, colon, _password = rest[:at].partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{rest[at + 1 :]}"


def libpq_conninfo(url: str | URL, **extra: Any) -> str:
    """*url* (PostgreSQL) as a libpq connection string, for psycopg used directly or a
    server that connects onwards (``CREATE SUBSCRIPTION``): its host, port, user,
    password, database and query parameters (``sslmode``...), then *extra*; parameters
    that are None are left out. It holds the password: never show it."""
    from psycopg.conninfo import make_conninfo

    parsed = url if isinstance(url, URL) else make_url(url)
    params: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
        **dict(parsed.query),
        **extra,
    }
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def with_database(url: URL, database: str) -> URL:
    """*url* naming another *database* on the same server (SQLite: another file in the
    same folder)."""
    if url.get_backend_name() == "sqlite":
        folder = Path(url.database or ".")
        return url.set(database=str(folder / f"{database}.db"))
    return url.set(database=database)
