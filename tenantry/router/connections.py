"""Connections counted as they open and close: per router and per server.

A router may serve hundreds of databases on one server; each database has an engine,
and an engine costs nothing until it connects. What a server runs out of is
connections, so the budget counts real ones: a connection is counted from the moment
it is about to be opened (the dialect's ``do_connect``) until it is closed (the pool's
``close`` event, which invalidation and disposal go through), detached from its pool,
or dropped without a close (a connect listener that raised).

Two limits hold at every moment:

- the router's ``connection_budget``;
- each PostgreSQL server's share: ``(max_connections - superuser_reserved_connections
  - server_connection_reserve) // routers_per_server``, read from the server on a
  connection of its own before the first counted one. Eight routers with the default
  settings then stay within the server's ``max_connections`` together, with room left
  for operators. On the catalog's server, the router's catalog connections come out of
  its share.

A connection that would break a limit first makes room: the least recently used
engines with idle connections (on that server, for the server's limit) are disposed,
which closes those connections. When every connection is in use, it waits for one to
close, up to ``pool_timeout``, and then raises
:class:`~tenantry.errors.ConnectionBudgetExceeded`: the transaction fails alone, rather
than the server refusing everyone with "too many clients".

:class:`DialectStates` spares each new engine of a server SQLAlchemy's first-connect
dialect set-up (several queries): what ``initialize`` found on one database of a server
is given to the next engine of that server and role.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.util import await_only

from tenantry.errors import ConnectionBudgetExceeded
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog.store import CATALOG_CONNECTIONS
from tenantry.urls import mask_url

__all__ = ["ConnectionBudget", "DialectStates", "server_of"]

#: The record key that says a connection was counted, and against which server.
_COUNTED = "tenantry.counted_server"

_LIMITS_SQL = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int"
)


def server_of(url: str) -> str:
    """The server a URL reaches (host and port; the file for SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:{parsed.database}"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


class _Counted:
    """A connection counted against *server*, until released once."""

    __slots__ = ("open", "server")

    def __init__(self, server: str) -> None:
        self.server = server
        self.open = True


class ConnectionBudget:
    """Open connections of one router, in all and per server (see the module's doc)."""

    def __init__(
        self,
        settings: TenantrySettings,
        dispose_idle: Callable[[str | None], bool],
        *,
        catalog_url: str | None = None,
    ) -> None:
        self._settings = settings
        # the router's own catalog connections, when the catalog lives on a shard server
        self._catalog_server = server_of(catalog_url) if catalog_url else None
        self._dispose_idle = dispose_idle
        self._cond = threading.Condition(threading.Lock())
        self._open = 0
        self._per_server: defaultdict[str, int] = defaultdict(int)
        self._server_limits: dict[str, int] = {}
        self._queue: deque[object] = deque()
        self._readers: dict[str, threading.Lock] = {}
        self.waits = 0  # how many connections had to wait for room (for tests, stats)
        self._server_waits: defaultdict[str, int] = defaultdict(int)

    @property
    def open(self) -> int:
        """Connections open now (or being opened)."""
        return self._open

    def server_limit(self, server: str) -> int | None:
        """This router's share of *server*'s connections (None: not read yet)."""
        return self._server_limits.get(server)

    def per_server(self) -> dict[str, int]:
        """Open connections by server."""
        with self._cond:
            return {k: v for k, v in self._per_server.items() if v}

    def server_limits(self) -> dict[str, int]:
        """This router's share of each server read so far."""
        with self._cond:
            return dict(self._server_limits)

    def server_waits(self) -> dict[str, int]:
        """How many connections to each server waited for room."""
        with self._cond:
            return dict(self._server_waits)

    def watch(
        self, engine: Engine, url: str, shard: str | None = None, *, pooled: bool = False
    ) -> None:
        """Count *engine*'s connections (of *shard*) against the router's and its
        server's limits. Through a pooler (*pooled*) the pooler guards the server: only
        the router's limit applies."""
        server = server_of(url)
        shares_server = engine.dialect.name == "postgresql" and not pooled
        is_async = engine.dialect.is_async

        def do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
            if shares_server and server not in self._server_limits:
                self._learn_limits(server, is_async, lambda: dialect.connect(*cargs, **cparams))
            self._reserve(server, url, shard, is_async)
            try:
                connection = dialect.connect(*cargs, **cparams)
            except BaseException:
                self._release(server)
                raise
            counted = _Counted(server)
            record.info[_COUNTED] = counted
            # A connect listener that raises (a refused routing role) leaves the
            # connection to the garbage collector, never to the pool's close event.
            driver = getattr(connection, "_connection", connection)  # asyncio: psycopg's
            with contextlib.suppress(TypeError):  # sqlite3's connections take none
                weakref.finalize(driver, self._forget, counted)
            return connection

        def close(_dbapi_connection: Any, record: Any) -> None:
            counted = record.info.pop(_COUNTED, None) if record is not None else None
            if counted is not None:
                self._forget(counted)

        def detach(_dbapi_connection: Any, record: Any) -> None:
            # no longer the pool's: its owner closes it when it will
            counted = record.info.pop(_COUNTED, None)
            if counted is not None:
                self._forget(counted)

        def checkin(_dbapi_connection: Any, _record: Any) -> None:
            if self._queue:  # an idle connection now: room can be made
                with self._cond:
                    self._cond.notify_all()

        # do_connect runs after the drivers' own listeners (registered when the engine
        # was made) and connects itself, so that a failed connect is released at once.
        event.listen(engine, "do_connect", do_connect)
        event.listen(engine, "close", close)
        event.listen(engine, "detach", detach)
        event.listen(engine, "checkin", checkin)

    def _forget(self, counted: _Counted) -> None:
        """A counted connection closed (or was dropped): release it, once."""
        with self._cond:
            if not counted.open:
                return
            counted.open = False
        self._release(counted.server)

    def _learn_limits(self, server: str, is_async: bool, connect: Callable[[], Any]) -> None:
        """Read *server*'s limits once, on a connection of its own, before the first
        connection to it is counted; one reader per server, the others wait for it. A
        server that cannot be reached raises here what the connection would have."""
        lock = self._readers.setdefault(server, threading.Lock())
        _acquire(lock, is_async)
        try:
            if server in self._server_limits:
                return
            dbapi_connection = connect()
            try:
                self._read_limits(server, dbapi_connection)
            finally:
                dbapi_connection.close()
        finally:
            lock.release()

    def _read_limits(self, server: str, dbapi_connection: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_LIMITS_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None:
            return
        usable = int(row[0]) - int(row[1]) - self._settings.server_connection_reserve
        share = usable // self._settings.routers_per_server
        if server == self._catalog_server:
            share -= CATALOG_CONNECTIONS  # the catalog's connections are the router's too
        share = max(1, share)
        with self._cond:
            self._server_limits[server] = share
            self._cond.notify_all()

    def _fits(self, server: str) -> str | None:
        """None when one more connection to *server* fits, else which limit binds."""
        if self._open >= self._settings.connection_budget:
            return "router"
        limit = self._server_limits.get(server)
        if limit is not None and self._per_server[server] >= limit:
            return "server"
        return None

    def _reserve(self, server: str, url: str, shard: str | None, is_async: bool) -> None:
        deadline = time.monotonic() + self._settings.pool_timeout
        ticket = object()
        with self._cond:
            if not self._queue and self._fits(server) is None:
                self._take(server)
                return
            self._queue.append(ticket)  # first come, first served among those who wait
            self.waits += 1
            self._server_waits[server] += 1
        try:
            while True:
                with self._cond:
                    binding = self._fits(server)
                    if self._queue[0] is ticket and binding is None:
                        self._queue.popleft()
                        self._take(server)
                        self._cond.notify_all()
                        return
                    first = self._queue[0] is ticket
                # The first in line makes room: it closes the idle connections of the
                # least recently used engine (outside the lock: their close events take it).
                if (
                    first
                    and binding is not None
                    and self._dispose_idle(server if binding == "server" else None)
                ):
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionBudgetExceeded(
                        _exceeded(binding or "router", server, url, self), shard=shard
                    )
                if is_async:
                    # SQLAlchemy's greenlet of an asyncio connect: let the event loop run
                    # the coroutines that will close or return connections
                    await_only(asyncio.sleep(min(remaining, 0.005)))
                    continue
                with self._cond:
                    # woken by a connection closed or returned to its pool
                    self._cond.wait(min(remaining, 0.5))
        finally:
            with self._cond:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()

    def _take(self, server: str) -> None:
        self._open += 1
        self._per_server[server] += 1

    def _release(self, server: str) -> None:
        with self._cond:
            if self._per_server[server] > 0:
                self._per_server[server] -= 1
                self._open -= 1
            self._cond.notify_all()


def _exceeded(binding: str, server: str, url: str, budget: ConnectionBudget) -> str:
    if binding == "server":
        return (
            f"no connection to {mask_url(url)} within TENANTRY_POOL_TIMEOUT: this router "
            f"holds its share of server {server} ({budget.server_limit(server)} connections, "
            "from the server's max_connections over TENANTRY_ROUTERS_PER_SERVER) and all are "
            "in use; retry, or raise max_connections on the server"
        )
    return (
        f"no connection to {mask_url(url)} within TENANTRY_POOL_TIMEOUT: all "
        f"{budget.open} connections of the router's budget (TENANTRY_CONNECTION_BUDGET) "
        "are in use; retry, or raise the budget"
    )


class DialectStates:
    """What SQLAlchemy's dialect learned on its first connection to a server, shared
    with the next engines of that server and role.

    ``Dialect.initialize`` runs several queries on an engine's first connection (server
    version, default schema, isolation level, string escaping, hstore); every database
    of a server, reached as one role, answers them alike. The first engine of a
    (server, role, driver) runs it and its findings are kept; later engines take them
    without a query. Assumed alike across the server's databases: its version, the
    role's default schema and isolation level, and whether hstore is installed.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self._key_locks: dict[tuple[str, str | None, str], threading.Lock] = {}
        self.initialized = 0  # dialect set-ups run (the others were taken)

    def share(self, engine: Engine, url: str) -> None:
        """Make *engine*'s dialect take a kept state, or keep the one it finds."""
        parsed = make_url(url)
        key = (server_of(url), parsed.username, parsed.drivername)
        dialect = engine.dialect
        found = dialect.initialize

        def initialize(connection: Any) -> None:
            state = self._states.get(key)
            if state is None:
                # one set-up per key: engines connecting at once wait for the first
                lock = self._key_locks.setdefault(key, threading.Lock())
                _acquire(lock, dialect.is_async)
                try:
                    state = self._states.get(key)
                    if state is None:
                        before = dict(vars(dialect))
                        found(connection)
                        self._states[key] = {
                            name: value
                            for name, value in vars(dialect).items()
                            if name not in _NOT_SHARED
                            and (name not in before or before[name] is not value)
                        }
                        self.initialized += 1
                        return
                finally:
                    lock.release()
            dialect.__dict__.update(state)

        dialect.initialize = initialize  # type: ignore[method-assign]


def _acquire(lock: threading.Lock, is_async: bool) -> None:
    """Take *lock*; in SQLAlchemy's greenlet of an asyncio connect, without blocking the
    event loop (the holder may be another coroutine on it)."""
    if not is_async:
        lock.acquire()
        return
    while not lock.acquire(blocking=False):
        await_only(asyncio.sleep(0.005))


#: Dialect attributes that are caches or this wrapper, not what initialize learned.
_NOT_SHARED = frozenset({"initialize", "_type_memos", "loaded_dbapi"})
