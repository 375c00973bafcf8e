"""No router can exhaust a server: 8 router processes, 200 dedicated databases on a
server with ``max_connections=100``, default settings.

Each router takes at most its share of the server, (100 - 3 reserved for superusers -
10 left to operators) // 8 routers = 10 connections, whatever the number of databases;
with more threads than that, transactions wait for a connection (closing idle ones of
other databases to make room) instead of the server refusing "too many clients" to
everyone. A sampler on the server counts client connections while the routers run.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry import Router, load_settings
from tenantry.router.connections import server_of
from tenantry.shardmap.catalog.store import CATALOG_CONNECTIONS
from tenantry.testing import TempPostgres
from tests.router.conftest import ensure_app_role
from tests.router.test_engines import DedicatedFleet, dedicated_databases

ROUTERS = 8
THREADS = 12  # per router: more than its share of 10 connections
TRANSACTIONS = 150  # per router
MAX_CONNECTIONS = 100
SHARE = (MAX_CONNECTIONS - 3 - 10) // ROUTERS


@pytest.fixture(scope="module")
def small_server() -> Iterator[TempPostgres]:
    server = TempPostgres.start(name="tenantry-budget", settings={"max_connections": "100"})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def crowded_fleet(
    small_server: TempPostgres, pg_servers: list[str], app: Any
) -> Iterator[DedicatedFleet]:
    ensure_app_role(small_server.url)
    ensure_app_role(pg_servers[0])
    # the catalog lives elsewhere: the small server's connections are the routers' alone
    with dedicated_databases([small_server.url], pg_servers[0], "app", app) as fleet:
        yield fleet


def route(catalog_url: str, tenants: dict[str, str], seed: int) -> dict[str, Any]:
    """One router process: TRANSACTIONS random routed transactions from THREADS threads;
    what went wrong, and how many connections it held at most."""
    settings = load_settings(catalog_url=catalog_url)  # the defaults, but the catalog
    wrong: list[str] = []
    peak = 0
    lock = threading.Lock()
    order = random.Random(seed).choices(sorted(tenants), k=TRANSACTIONS)
    with Router(settings=settings, background=False) as router:

        def one(tenant: str) -> None:
            nonlocal peak
            try:
                with router.session(tenant) as session:
                    found = session.scalar(sa.text("SELECT current_database()"))
                    if found != tenants[tenant]:
                        wrong.append(f"{tenant} served by {found}")
            except Exception as exc:  # every failure is reported, none is expected
                wrong.append(f"{tenant}: {type(exc).__name__}: {exc}")
            with lock:
                peak = max(peak, router.engine_stats().connections)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, order))
        stats = router.engine_stats()
    return {"wrong": wrong, "peak": peak, "waits": stats.waits, "created": stats.created}


def test_eight_routers_never_exhaust_a_server(
    crowded_fleet: DedicatedFleet, small_server: TempPostgres
) -> None:
    watcher = sa.create_engine(small_server.url, poolclass=NullPool)
    stop = threading.Event()
    seen: list[int] = []

    def sample() -> None:
        with watcher.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not stop.is_set():
                count = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND usename = 'app'"
                    )
                ).scalar_one()
                seen.append(int(count))
                stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    context = multiprocessing.get_context("spawn")
    try:
        with context.Pool(ROUTERS) as pool:
            results = pool.starmap(
                route,
                [(crowded_fleet.catalog.url, crowded_fleet.databases, n) for n in range(ROUTERS)],
            )
    finally:
        stop.set()
        sampler.join(10)
        watcher.dispose()
    problems = [w for r in results for w in r["wrong"]]
    assert problems == []  # no "too many clients", no timeout, no wrong database
    peaks = [r["peak"] for r in results]
    assert all(1 <= peak <= SHARE for peak in peaks), peaks  # each router within its share
    assert sum(r["waits"] for r in results) > 0  # the share bound: threads waited
    # each router: its share, and once the connection that read the server's limits (a
    # backend also lingers in pg_stat_activity a moment after its client hung up)
    assert len(seen) > 10 and 1 <= max(seen) <= ROUTERS * (SHARE + 1), max(seen)
    assert ROUTERS * (SHARE + 1) < MAX_CONNECTIONS - 3  # never "too many clients"


def test_the_catalogs_connections_come_out_of_its_servers_share(pg_fleet_builder: Any) -> None:
    # the test fleet's catalog lives on server 0: a router's share there is smaller by
    # what its catalog may hold
    fleet = pg_fleet_builder()
    fleet.add_shard("near", server=0)
    fleet.add_shard("far", server=1)
    fleet.add_tenant("t-near", "near")
    fleet.add_tenant("t-far", "far")
    router = fleet.new_router()
    for tenant in ("t-near", "t-far"):
        with router.session(tenant) as session:
            session.execute(sa.text("SELECT 1"))
    budget = router._engines._budget
    near, far = (server_of(fleet.shard(name).url) for name in ("near", "far"))
    if near == far:  # one server given for both (TENANTRY_TEST_PG_URLS): nothing to compare
        assert budget.server_limit(near) is not None
        return
    with router.session("t-near") as session:
        limits = session.execute(
            sa.text(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
            )
        ).scalar_one()
    share = (limits - 10) // 8
    assert budget.server_limit(far) == share
    assert budget.server_limit(near) == share - CATALOG_CONNECTIONS
