"""Isolation under load through PgBouncer in transaction mode.

Twenty tenants share one shard whose routing URL is PgBouncer (two server connections
for the routing role); fifty clients on eight threads, and a few asyncio tasks, switch
between them. Each transaction reads every row it can see and the server connection it
ran on (``pg_backend_pid()``): no transaction sees a row of another tenant, none fails,
and the few server connections really are shared between tenants.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from tenantry import AsyncRouter
from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.conftest import PROJECT_IDS, TASK_IDS, FleetBuilder

TENANTS = [f"t{i:02d}" for i in range(20)]
CLIENTS = 50
THREADS = 8
TRANSACTIONS = 12  # per client
ASYNC_TASKS = 10

READ = sa.text(
    "SELECT pg_backend_pid(), tenantry.tenant(),"
    " (SELECT array_agg(tenant_id || '/' || name ORDER BY id) FROM projects),"
    " (SELECT array_agg(tenant_id || '/' || title ORDER BY id) FROM tasks)"
)


def check(tenant: str, row: sa.Row[tuple[int, str, list[str], list[str]]]) -> int:
    """The row of one transaction shows *tenant*'s seeded rows and nothing else."""
    pid, fenced, projects, tasks = row
    assert fenced == tenant
    assert projects == [f"{tenant}/{tenant}-p{p}" for p in PROJECT_IDS], projects
    assert tasks == [f"{tenant}/{tenant}-t{t}" for t in TASK_IDS], tasks
    return int(pid)


def test_fifty_clients_twenty_tenants_two_server_connections(
    pg_fleet_builder: FleetBuilder, pgbouncer: TempPgBouncer
) -> None:
    fleet = pg_fleet_builder(pool_size_shared=4, max_overflow=4, pool_timeout=30)
    shard = fleet.add_shard("pooled", routing_port=pgbouncer.port)
    assert shard.pooled
    for tenant in TENANTS:
        fleet.add_tenant(tenant, "pooled")
    router = fleet.new_router()
    lock = threading.Lock()
    tenants_by_pid: dict[int, set[str]] = defaultdict(set)
    done: list[int] = []

    def client(number: int) -> int:
        rng = random.Random(number)
        for _ in range(TRANSACTIONS):
            tenant = rng.choice(TENANTS)
            if rng.random() < 0.5:
                with router.session(tenant) as session:
                    pid = check(tenant, session.execute(READ).one())
            else:
                with router.connection(tenant) as conn:
                    pid = check(tenant, conn.execute(READ).one())
            with lock:
                tenants_by_pid[pid].add(tenant)
        done.append(number)
        return number

    async def async_traffic() -> list[tuple[int, str]]:
        arouter = AsyncRouter(catalog=fleet.catalog, background=False)

        async def task(number: int) -> list[tuple[int, str]]:
            seen = []
            for step in range(TRANSACTIONS):
                tenant = TENANTS[(number * 7 + step) % len(TENANTS)]
                async with arouter.session(tenant) as session:
                    row = (await session.execute(READ)).one()
                    await asyncio.sleep(0)
                seen.append((check(tenant, row), tenant))
            return seen

        try:
            found = await asyncio.gather(*(task(n) for n in range(ASYNC_TASKS)))
        finally:
            await arouter.close()
        return [pair for one in found for pair in one]

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(client, n) for n in range(CLIENTS)]
        # asyncio traffic at the same time, from the main thread
        async_seen = asyncio.run(async_traffic())
        finished = sorted(f.result() for f in futures)  # re-raises any client's error
    assert finished == list(range(CLIENTS))
    for pid, tenant in async_seen:
        tenants_by_pid[pid].add(tenant)

    # The pooler's two server connections carried every transaction ...
    assert 1 <= len(tenants_by_pid) <= 2, dict(tenants_by_pid)
    # ... each of them for many tenants in turn.
    assert max(len(t) for t in tenants_by_pid.values()) >= 15, dict(tenants_by_pid)
    assert set().union(*tenants_by_pid.values()) == set(TENANTS)
    # The client connections the router held were the pooler's, not the server's.
    with router.connection(TENANTS[0]) as conn:
        announced = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        assert announced not in tenants_by_pid
