"""Connection poolers between tenantry and a PostgreSQL server: how they are told apart.

A pooler in transaction mode (PgBouncer, RDS Proxy, the poolers of hosted PostgreSQL)
hands each client connection a server connection for one transaction at a time. When a
client connects, the server announces its process id (the BackendKeyData message, kept
by psycopg as ``info.backend_pid``); a pooler announces one of its own, since the client
has no server process of its own. So one query tells: a connection whose announced pid
is not the pid of the server process answering (``pg_backend_pid()``) goes through a
pooler. A plain TCP proxy passes the server's message on unchanged and is not one.

- :func:`through_pooler` — that check on an open psycopg connection;
- :func:`url_through_pooler` — the same for a URL (one connection, one query);
- :func:`require_server` — a connect listener for operations engines: refuses a
  connection that goes through a pooler with :class:`~tenantry.errors.PoolerInTheWay`;
- :func:`unprepared_through_pooler` — a connect listener for the catalog's engine: a
  connection through a pooler prepares nothing on the server.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from tenantry.errors import PoolerInTheWay
from tenantry.urls import libpq_conninfo, mask_url

__all__ = [
    "pooler_message",
    "require_server",
    "through_pooler",
    "unprepared_through_pooler",
    "url_through_pooler",
]

_PID = "SELECT pg_catalog.pg_backend_pid()"


def through_pooler(dbapi_connection: Any) -> bool:
    """Whether a psycopg connection (sync, or SQLAlchemy's adaptation of an async one)
    reaches its server through a pooler; the transaction the query opened is ended."""
    announced = getattr(dbapi_connection, "info", None)
    if announced is None:  # SQLAlchemy's asyncio adaptation
        announced = dbapi_connection.driver_connection.info
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_PID)
        row = cursor.fetchone()
    finally:
        cursor.close()
        dbapi_connection.rollback()
    return bool(row is None or row[0] != announced.backend_pid)


def url_through_pooler(url: str, *, connect_timeout: float = 5.0) -> bool:
    """Whether *url* (PostgreSQL) reaches its server through a pooler; False for SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return False
    with psycopg.connect(
        libpq_conninfo(parsed), connect_timeout=max(1, round(connect_timeout))
    ) as conn:
        return through_pooler(conn)


def pooler_message(shard: str, url: str) -> str:
    """The one line that refuses a pooler as *shard*'s operations URL."""
    return (
        f"shard {shard!r}: its operations URL {mask_url(url)} goes through a connection "
        "pooler; moves, fleet migrations, sizes and gc need the server itself: register "
        "the server's own URL as the shard's operations URL (--admin-url), and keep the "
        "pooler's as its routing URL (--pooled)"
    )


def require_server(engine: Engine, shard: str, url: str) -> None:
    """Refuse every connection of *engine* (an operations engine of *shard*) that goes
    through a pooler: :class:`PoolerInTheWay`, before anything runs on it."""
    if engine.dialect.name != "postgresql":
        return

    def check(dbapi_connection: Any, _record: Any) -> None:
        if through_pooler(dbapi_connection):
            raise PoolerInTheWay(pooler_message(shard, url), shard=shard)

    event.listen(engine, "connect", check, insert=True)


def unprepared_through_pooler(engine: Engine) -> None:
    """Make each connection of *engine* that goes through a pooler prepare nothing on
    the server (psycopg prepares a statement run five times; a pooler in transaction
    mode would run its next execution on another server connection). One query per new
    connection."""
    if engine.dialect.name != "postgresql" or engine.dialect.is_async:
        return

    def check(dbapi_connection: Any, _record: Any) -> None:
        if through_pooler(dbapi_connection):
            dbapi_connection.prepare_threshold = None

    event.listen(engine, "connect", check)
