"""The routing benchmark's asyncio part: ``AsyncRouter.session(t)`` against hand-written
``AsyncSession``s on the same pool.

The same three routes as the threaded part, on the same fleet and tables, through
SQLAlchemy's asyncio extension (psycopg's async connection):

- ``routed``: ``async with router.session(t)`` on ``bench_readings`` (signed fence);
- ``setting``: ``AsyncSession(engine)`` that first runs ``set_config`` on
  ``bench_readings_classic``: the standard pattern written by hand;
- ``bare``: ``AsyncSession(engine)`` with no setting on ``bench_readings_open``.

One event loop in the benchmark's process runs 1 or 8 tasks at once; rounds
interleave every variant in a fresh random order. The CPU column is the process's CPU
time per transaction (one thread runs the loop; the router's map refreshes are
idle), the Python side's cost without the server's.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from _common import percentile, progress, summarize
from _routing_fleet import (
    ENDINGS,
    SET_TENANT,
    STATEMENTS,
    ClassicReading,
    Config,
    Fleet,
    OpenReading,
    Variant,
    point,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tenantry import AsyncRouter

#: The routes measured on the event loop.
ASYNC_ROUTES = ("routed", "setting", "bare")
#: Concurrent tasks, and transactions per task per variant per round.
TASKS = ((1, 10), (8, 3))

AsyncTx = Callable[[str, list[int], bool], Awaitable[None]]


def async_transactions(router: AsyncRouter, engine: AsyncEngine) -> dict[str, AsyncTx]:
    async def routed(tenant: str, rows: list[int], commit: bool) -> None:
        async with router.session(tenant) as session:
            for row in rows:
                (await session.execute(point(tenant, row))).scalar_one()
            if commit:
                await session.commit()

    async def setting(tenant: str, rows: list[int], commit: bool) -> None:
        async with AsyncSession(engine) as session:
            await session.execute(SET_TENANT, {"t": tenant})
            for row in rows:
                (await session.execute(point(tenant, row, ClassicReading))).scalar_one()
            if commit:
                await session.commit()

    async def bare(tenant: str, rows: list[int], commit: bool) -> None:
        async with AsyncSession(engine) as session:
            for row in rows:
                (await session.execute(point(tenant, row, OpenReading))).scalar_one()
            if commit:
                await session.commit()

    return {"routed": routed, "setting": setting, "bare": bare}


async def _measure(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    router = AsyncRouter(catalog=fleet.catalog, settings=fleet.settings)
    try:
        engine = await router.engine_for(fleet.tenants[0])
        fns = async_transactions(router, engine)
        rng = random.Random(seed)
        rows = range(1, cfg.rows_per_tenant + 1)
        variants = [Variant(r, s, e) for s in STATEMENTS for e in ENDINGS for r in ASYNC_ROUTES]
        latencies: dict[tuple[int, Variant], list[int]] = defaultdict(list)
        cpu: dict[tuple[int, Variant], list[float]] = defaultdict(list)

        async def task(fn: AsyncTx, v: Variant, count: int, out: list[int] | None) -> None:
            for _ in range(count):
                tenant = rng.choice(fleet.tenants)
                picked = rng.sample(rows, v.statements)
                start = time.perf_counter_ns()
                await fn(tenant, picked, v.ending == "commit")
                if out is not None:
                    out.append(time.perf_counter_ns() - start)

        async def batch(n: int, size: int, v: Variant, record: bool) -> None:
            out: list[int] = []
            started = time.process_time_ns()
            await asyncio.gather(
                *(task(fns[v.route], v, size, out if record else None) for _ in range(n))
            )
            if record:
                latencies[(n, v)] += out
                cpu[(n, v)].append((time.process_time_ns() - started) / len(out))

        rounds = max(6, cfg.rounds // 2)
        plan = [(n, size, v) for n, size in TASKS for v in variants]
        with progress() as bar:
            job = bar.add_task("asyncio", total=rounds)
            for n, size, v in plan:
                await batch(n, max(size, cfg.warmup // n), v, record=False)
            for _round in range(rounds):
                rng.shuffle(plan)
                gc.collect()
                for n, size, v in plan:
                    await batch(n, size, v, record=True)
                bar.advance(job)
    finally:
        await router.close()
    rows_out = []
    for (n, v), values in sorted(latencies.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rows_out.append(
            {
                "tasks": n,
                "route": v.route,
                "statements": v.statements,
                "ending": v.ending,
                "us": summarize(values, scale=1_000),
                "cpu_us": percentile(cpu[(n, v)], 50) / 1_000,
            }
        )
    return {"rounds": rounds, "latency": rows_out}


def measure_async(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    """p50 and CPU per transaction of the three routes on an event loop."""
    return asyncio.run(_measure(fleet, cfg, seed))
