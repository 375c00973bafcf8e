"""Throwaway databases on running PostgreSQL servers: created (optionally from a
template), dropped (connections to them ended first), and a factory that drops all it
made."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Literal, Self

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from tenantry.testing.server import DRIVER, safe_url

__all__ = ["DatabaseFactory", "create_database", "drop_database"]

_MAX_IDENTIFIER_BYTES = 63  # NAMEDATALEN - 1; longer names are silently truncated
_RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})


def _admin_engine(url: URL) -> sa.Engine:
    return sa.create_engine(
        url,
        # CREATE/DROP DATABASE refuse to run inside a transaction block
        isolation_level="AUTOCOMMIT",
        # without parameters psycopg leaves '%' alone: names may contain it
        execution_options={"no_parameters": True},
        poolclass=NullPool,
        connect_args={"connect_timeout": 10},
    )


def _quote(name: str) -> str:
    # SQLAlchemy's quote_identifier doubles '%' for the driver's paramstyle, which
    # no_parameters execution then sends as is: quote the plain PostgreSQL way instead.
    return '"' + name.replace('"', '""') + '"'


def _check_database_name(name: str) -> None:
    if not name or len(name.encode()) > _MAX_IDENTIFIER_BYTES or "\x00" in name:
        raise ValueError(
            f"database name must be 1 to {_MAX_IDENTIFIER_BYTES} bytes without NUL: {name!r}"
        )


def create_database(
    server_url: str,
    name: str | None = None,
    *,
    template: str | None = None,
    strategy: Literal["wal_log", "file_copy"] | None = "file_copy",
) -> str:
    """Create a database on the server of ``server_url``; return its URL.

    ``name`` defaults to a random ``t_<hex>``. ``template`` is a database name or URL;
    nothing may be connected to it. ``strategy`` applies on PostgreSQL 15 and later:
    ``file_copy`` copies the template's files at a checkpoint, much faster than
    ``wal_log`` for small databases on a server with ``fsync`` off.
    """
    name = f"t_{secrets.token_hex(6)}" if name is None else name
    _check_database_name(name)
    if template is not None and "://" in template:
        template = make_url(template).database or ""
    if template is not None:
        _check_database_name(template)
    url = make_url(server_url).set(drivername=DRIVER)
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            sql = f"CREATE DATABASE {_quote(name)}"
            if template is not None:
                sql += f" TEMPLATE {_quote(template)}"
            version = conn.dialect.server_version_info or (0,)
            if strategy is not None and version >= (15,):
                sql += f" STRATEGY = {strategy.upper()}"
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop the database of ``url``, disconnecting its sessions; missing is fine."""
    target = make_url(url).set(drivername=DRIVER)
    name = target.database
    if not name:
        raise ValueError(f"no database named in {safe_url(target)}")
    if name in _RESERVED_DATABASES:
        raise ValueError(f"refusing to drop the system database {name!r}")
    engine = _admin_engine(target.set(database="postgres"))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
    finally:
        engine.dispose()


class DatabaseFactory:
    """Create fresh databases on the given servers; :meth:`close` drops all of them."""

    def __init__(self, servers: Sequence[str]) -> None:
        if not servers:
            raise ValueError("DatabaseFactory needs at least one server URL")
        self.servers = list(servers)
        self.created: list[str] = []

    def __call__(
        self, server: int = 0, *, name: str | None = None, template: str | None = None
    ) -> str:
        """A new database on server number ``server``; its URL."""
        if not 0 <= server < len(self.servers):
            raise IndexError(f"server {server} out of range: there are {len(self.servers)}")
        url = create_database(self.servers[server], name, template=template)
        self.created.append(url)
        return url

    def close(self) -> None:
        """Drop every database created here, newest first (clones before templates)."""
        while self.created:
            drop_database(self.created.pop())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
