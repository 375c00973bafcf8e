"""Dead pooled connections: a restarted shard server, terminated backends, a stopped one.

The shard lives on a PostgreSQL server of this module's own (the catalog stays on the
suite's). Its routing URL carries a password (trust authentication ignores it), which
must never show in an error or a log line. The pool is filled first, so that the
transactions after a restart or a ``pg_terminate_backend`` really meet dead
connections: the log says each time the router began a transaction again, and the
server's backends are all new afterwards. While the server is up, no transaction
fails; when it is down, the caller gets ``ShardUnavailable`` naming the shard, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
import sqlalchemy as sa
from sqlalchemy import select, update
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tenantry import AsyncRouter, Router
from tenantry.errors import ShardUnavailable
from tenantry.router.middleware import TenantMiddleware, WSGITenantMiddleware
from tenantry.router.resolvers import header_resolver

PASSWORD = "hunter2-very-secret"
SHARD = "own"
TENANTS = ("acme", "globex")
POOL = 6  # pool_size_shared; the fleet's settings below
CONNECT_TIMEOUT = 2.0
RETRIED = "beginning the transaction again on a fresh connection"


@pytest.fixture
def own_fleet(pg_fleet_builder: Any, own_pg_server: Any) -> Any:
    fleet = pg_fleet_builder(
        pool_size_shared=POOL, max_overflow=2, connect_timeout=CONNECT_TIMEOUT, pool_timeout=10
    )
    fleet.add_shard(SHARD, admin_url=own_pg_server.new_database(), password=PASSWORD)
    for tenant in TENANTS:
        fleet.add_tenant(tenant, SHARD)
    fleet.server = own_pg_server
    fleet.database = fleet.location(SHARD)
    return fleet


@pytest.fixture
def retries(caplog: pytest.LogCaptureFixture) -> Callable[[], int]:
    """How many transactions the router has begun again so far."""
    caplog.set_level(logging.INFO, logger="tenantry.router")
    return lambda: sum(RETRIED in r.getMessage() for r in caplog.records)


@pytest.fixture
def no_password_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()


def fill_pool(router: Router, n: int = POOL) -> None:
    """Hold *n* routed connections at once, so that the pool keeps *n* when they end."""
    with contextlib.ExitStack() as stack:
        for i in range(n):
            stack.enter_context(router.connection(TENANTS[i % 2]))


def session_round_trip(router: Router, tenant: str, n: int) -> None:
    """A read and a committed write through ``router.session``, checked."""
    projects = sa.table("projects", sa.column("tenant_id"), sa.column("id"), sa.column("name"))
    with router.session(tenant) as session:
        names = session.execute(select(projects.c.name).order_by(projects.c.id)).scalars()
        assert [name.split("@")[0] for name in names] == [f"{tenant}-p1", f"{tenant}-p2"]
        session.execute(update(projects).where(projects.c.id == 1).values(name=f"{tenant}-p1@{n}"))
        session.commit()


def connection_round_trip(router: Router, tenant: str) -> None:
    with router.connection(tenant) as conn:
        found = conn.exec_driver_sql("SELECT tenantry.tenant()").scalar_one()
        assert found == tenant


def test_sync_router_survives_a_restart_and_terminated_backends(
    own_fleet: Any, retries: Callable[[], int], no_password_logged: None
) -> None:
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()
    for cut in (server.restart, lambda: server.terminate(database)):
        fill_pool(router)
        before = server.backends(database)
        assert len(before) == POOL
        retried = retries()
        cut()
        # No failure allowed from here on: every routed path, one after the other.
        session_round_trip(router, "acme", 1)
        connection_round_trip(router, "globex")
        for n in range(2, 12):
            session_round_trip(router, TENANTS[n % 2], n)
            connection_round_trip(router, TENANTS[n % 2])
        # The dead connections were met (and the transaction begun again) once: the
        # pool replaced the others when they were next checked out, without a ping.
        assert retries() == retried + 1
        assert not set(server.backends(database)) & set(before)


def test_eight_threads_see_no_failure_after_a_restart_or_terminations(
    own_fleet: Any, retries: Callable[[], int]
) -> None:
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()
    threads = 8

    def work(index: int) -> list[BaseException]:
        errors: list[BaseException] = []
        for n in range(15):
            tenant = TENANTS[(index + n) % 2]
            try:
                if n % 2:
                    connection_round_trip(router, tenant)
                else:
                    with router.session(tenant) as session:
                        found = session.connection().exec_driver_sql("SELECT tenantry.tenant()")
                        assert found.scalar_one() == tenant
            except BaseException as exc:  # every failure is collected and reported
                errors.append(exc)
        return errors

    with ThreadPoolExecutor(threads) as pool:
        for cut in (server.restart, lambda: server.terminate(database)):
            fill_pool(router, POOL + 2)  # the pool keeps POOL of them
            retried = retries()
            cut()
            # All threads start together, on a pool of dead connections.
            failures = [e for errors in pool.map(work, range(threads)) for e in errors]
            assert failures == [], failures[:3]
            assert retries() > retried


def test_async_router_survives_a_restart_and_terminated_backends(
    own_fleet: Any, retries: Callable[[], int], no_password_logged: None
) -> None:
    server, database = own_fleet.server, own_fleet.database

    async def main() -> None:
        router = AsyncRouter(catalog=own_fleet.catalog, background=False)
        try:
            for cut in (server.restart, lambda: server.terminate(database)):
                await fill(router)
                before = server.backends(database)
                assert len(before) == POOL
                retried = retries()
                await asyncio.to_thread(cut)
                for n in range(6):
                    tenant = TENANTS[n % 2]
                    async with router.session(tenant) as session:
                        conn = await session.connection()
                        found = await conn.exec_driver_sql("SELECT tenantry.tenant()")
                        assert found.scalar_one() == tenant
                    async with router.connection(tenant) as conn:
                        found = await conn.exec_driver_sql("SELECT tenantry.tenant()")
                        assert found.scalar_one() == tenant
                # and many at once, on the event loop
                results = await asyncio.gather(*(one(router, TENANTS[i % 2]) for i in range(20)))
                assert results == [TENANTS[i % 2] for i in range(20)]
                assert retries() == retried + 1
                assert not set(server.backends(database)) & set(before)
        finally:
            await router.close()

    async def fill(router: AsyncRouter) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(POOL):
                await stack.enter_async_context(router.connection(TENANTS[i % 2]))

    async def one(router: AsyncRouter, tenant: str) -> str:
        async with router.connection(tenant) as conn:
            found = await conn.exec_driver_sql("SELECT tenantry.tenant()")
            return str(found.scalar_one())

    asyncio.run(main())


def test_a_stopped_server_is_shard_unavailable_at_once(
    own_fleet: Any, no_password_logged: None
) -> None:
    server = own_fleet.server
    router = own_fleet.new_router()
    fill_pool(router)
    failures: list[tuple[str, ShardUnavailable, float]] = []

    def expect_unavailable(path: str, call: Callable[[], Any]) -> None:
        start = time.monotonic()
        with pytest.raises(ShardUnavailable) as info:
            call()
        failures.append((path, info.value, time.monotonic() - start))

    def use_session() -> None:
        with router.session("acme") as session:
            session.connection()

    def use_connection() -> None:
        with router.connection("acme"):
            pass

    async def use_async(kind: str) -> None:
        router = AsyncRouter(catalog=own_fleet.catalog, background=False)
        try:
            if kind == "session":
                async with router.session("acme") as session:
                    await session.connection()
            else:
                async with router.connection("acme"):
                    pass
        finally:
            await router.close()

    server.stop()
    try:
        # The first on a pool of dead connections, the others on an empty pool.
        expect_unavailable("session", use_session)
        expect_unavailable("session", use_session)
        expect_unavailable("connection", use_connection)
        expect_unavailable("async session", lambda: asyncio.run(use_async("session")))
        expect_unavailable("async connection", lambda: asyncio.run(use_async("connection")))
        answers = through_middleware(router)
    finally:
        server.start()
    # Behind the middleware, the same outage is a 503 to retry, never a 500.
    for status, retry_after, body in answers:
        assert (status, retry_after, body["retryable"]) == (503, "5", True)
        assert SHARD not in body["error"] and PASSWORD not in body["error"]
    for path, error, elapsed in failures:
        message = str(error)
        assert error.shard == SHARD, (path, message)
        assert f"shard {SHARD!r}" in message, (path, message)
        assert "\n" not in message, (path, message)
        assert PASSWORD not in message, (path, message)
        assert elapsed < CONNECT_TIMEOUT, (path, elapsed)
    # Back up: the same router routes again, without a failure.
    session_round_trip(router, "acme", 1)
    connection_round_trip(router, "globex")


def through_middleware(router: Router) -> list[tuple[int, str, Any]]:
    """One request through a Starlette app and one through a WSGI app, each of whose
    endpoints opens a routed session: (status, Retry-After, JSON body) of each."""

    def endpoint(request: Request) -> JSONResponse:
        with router.session() as session:  # the tenant the middleware made current
            return JSONResponse({"projects": len(session.execute(select(1)).all())})

    app = Starlette(
        routes=[Route("/projects", endpoint)],
        middleware=[Middleware(TenantMiddleware, resolver=header_resolver(), router=router)],
    )
    answers = []
    with TestClient(app) as client:  # raises any error that reaches the server
        response = client.get("/projects", headers={"X-Tenant-Id": "acme"})
        answers.append((response.status_code, response.headers["retry-after"], response.json()))

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with router.session() as session:
            session.connection()
        start_response("200 OK", [])
        return [b"{}"]

    middleware = WSGITenantMiddleware(wsgi_app, resolver=header_resolver(), router=router)
    environ: dict[str, Any] = {"HTTP_X_TENANT_ID": "acme", "PATH_INFO": "/projects"}
    setup_testing_defaults(environ)
    started: list[Any] = []
    body = b"".join(middleware(environ, lambda *args: started.append(args)))  # type: ignore[arg-type]
    status, headers = started[-1][0], dict(started[-1][1])
    answers.append((int(status[:3]), headers["Retry-After"], json.loads(body)))
    return answers


def test_a_dead_connection_met_again_on_the_retry_is_shard_unavailable(
    own_fleet: Any, retries: Callable[[], int]
) -> None:
    """The retry happens once: a fresh connection that dies before its fence too (here
    its backend is terminated from the connect event) gives ShardUnavailable."""
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()
    fill_pool(router)
    engine = router.engine_for("acme")
    killed = threading.Event()

    def kill_new_connection(dbapi_connection: Any, _record: Any) -> None:
        server.terminate(database)  # this new connection's backend too
        killed.set()

    server.terminate(database)
    sa.event.listen(engine, "connect", kill_new_connection)
    try:
        with pytest.raises(ShardUnavailable) as info, router.session("acme") as session:
            session.connection()
    finally:
        sa.event.remove(engine, "connect", kill_new_connection)
    assert killed.is_set()
    assert info.value.shard == SHARD
    assert "connection was lost" in str(info.value)
    assert retries() == 1
    connection_round_trip(router, "acme")  # and the next one is fine


def test_a_later_transaction_of_a_session_meets_a_dead_connection(own_fleet: Any) -> None:
    """Only the transaction the router opens is begun again; a later one of the same
    session (after a commit) that meets a dead connection raises ShardUnavailable
    naming the shard, never a raw driver error, and the session works after rollback."""
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()
    with router.session("acme") as session:
        session.execute(select(1))
        session.commit()  # the connection goes back to the pool
        server.terminate(database)
        with pytest.raises(ShardUnavailable) as info:
            session.execute(select(1))
        assert info.value.shard == SHARD
        assert "\n" not in str(info.value) and PASSWORD not in str(info.value)
        session.rollback()
        found = session.connection().exec_driver_sql("SELECT tenantry.tenant()").scalar_one()
        assert found == "acme"


class Partition:
    """A TCP proxy to a server that can partition it: :meth:`cut` closes every proxied
    connection and leaves new ones accepted but never answered, as a lost network
    route or a dead host behind a load balancer does."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.sockets.append(client)
                if self.cut_off.is_set():
                    continue  # held open, never answered
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with self.lock:
            self.cut_off.set()
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_partitioned_shard_is_unavailable_within_the_connect_timeout(
    pg_fleet_builder: Any, own_pg_server: Any, no_password_logged: None
) -> None:
    admin = own_pg_server.new_database()
    port = sa.make_url(admin).port
    assert port is not None
    partition = Partition(port)
    try:
        fleet = pg_fleet_builder(pool_size_shared=POOL, connect_timeout=CONNECT_TIMEOUT)
        fleet.add_shard(SHARD, admin_url=admin, password=PASSWORD, routing_port=partition.port)
        for tenant in TENANTS:
            fleet.add_tenant(tenant, SHARD)
        router = fleet.new_router()
        fill_pool(router)
        connection_round_trip(router, "acme")
        partition.cut()
        for _ in range(2):  # on a pool of cut connections, then on an empty one
            start = time.monotonic()
            with pytest.raises(ShardUnavailable) as info, router.session("acme") as session:
                session.connection()
            elapsed = time.monotonic() - start
            assert info.value.shard == SHARD
            message = str(info.value)
            assert f"shard {SHARD!r}" in message and "\n" not in message
            assert PASSWORD not in message
            # Not at once (the host accepts and says nothing), but within the timeout.
            assert CONNECT_TIMEOUT - 0.5 < elapsed < CONNECT_TIMEOUT + 1.5, elapsed
    finally:
        partition.close()


def test_a_restart_under_load_only_fails_transactions_begun_while_it_was_down(
    own_fleet: Any, no_password_logged: None
) -> None:
    """Eight threads route without pause while the server restarts: a transaction
    that meets the outage fails with ShardUnavailable (never a raw driver error), and
    none begun once the restart returned fails."""
    server = own_fleet.server
    router = own_fleet.new_router()
    fill_pool(router, POOL + 2)
    up, stop, warmed, enough = (threading.Event() for _ in range(4))
    lock = threading.Lock()
    results: list[tuple[bool, BaseException | None]] = []  # (begun once up, error)

    def record(after_up: bool, error: BaseException | None) -> None:
        with lock:
            results.append((after_up, error))
            if len(results) >= 16:
                warmed.set()
            if sum(after and e is None for after, e in results) >= 160:
                enough.set()

    def work(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            tenant = TENANTS[(index + n) % 2]
            after_up = up.is_set()
            try:
                if n % 2:
                    session_round_trip(router, tenant, index * 100_000 + n)
                else:
                    connection_round_trip(router, tenant)
            except BaseException as exc:  # every failure is recorded and judged below
                record(after_up, exc)
            else:
                record(after_up, None)

    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(work, i) for i in range(8)]
        try:
            assert warmed.wait(timeout=30)
            server.restart()
            up.set()
            assert enough.wait(timeout=60)
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    during = [e for after, e in results if not after and e is not None]
    after = [e for after, e in results if after and e is not None]
    assert after == [], after[:3]
    unexpected = [e for e in during if not isinstance(e, ShardUnavailable)]
    assert unexpected == [], unexpected[:3]
    for error in during:
        assert error.shard == SHARD and "\n" not in str(error)  # type: ignore[attr-defined]


def test_a_connection_lost_inside_the_block_is_shard_unavailable(own_fleet: Any) -> None:
    """Past the fence nothing is begun again: a connection cut while the application's
    block runs leaves every routed path as ShardUnavailable, not a driver error."""
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()
    errors: list[BaseException] = []

    def cut_inside(block: Any) -> None:
        with pytest.raises(ShardUnavailable) as info:
            block()
        errors.append(info.value)

    def sync_session() -> None:
        with router.session("acme") as session:
            server.terminate(database)
            session.execute(select(1))

    def sync_connection() -> None:
        with router.connection("acme") as conn:
            server.terminate(database)
            conn.exec_driver_sql("SELECT 1")

    async def async_paths() -> None:
        router = AsyncRouter(catalog=own_fleet.catalog, background=False)
        try:
            with pytest.raises(ShardUnavailable) as info:
                async with router.session("acme") as session:
                    await asyncio.to_thread(server.terminate, database)
                    await session.execute(select(1))
            errors.append(info.value)
            with pytest.raises(ShardUnavailable) as info:
                async with router.connection("acme") as conn:
                    await asyncio.to_thread(server.terminate, database)
                    await conn.exec_driver_sql("SELECT 1")
            errors.append(info.value)
        finally:
            await router.close()

    cut_inside(sync_session)
    cut_inside(sync_connection)
    asyncio.run(async_paths())
    assert len(errors) == 4
    for error in errors:
        message = str(error)
        assert error.shard == SHARD, message  # type: ignore[attr-defined]
        assert "lost during the transaction" in message and "\n" not in message
        assert PASSWORD not in message
    connection_round_trip(router, "acme")  # and the router goes on
