"""cProfile of one routed one-statement transaction against the hand-written one.

    python benchmarks/profile_routed.py [--pg-url URL] [--count N] [--out FILE]

The routing benchmark's fleet (``_routing_fleet.build_fleet``: a NOSUPERUSER
NOBYPASSRLS routing role, 1,000 tenants of 20 rows, the signed fence and policies),
then, one thread, tenants drawn at random:

- ``routed``: ``router.session(t)``, one ORM SELECT by primary key, then close (which
  rolls back);
- ``hand-written``: ``Session`` on a plain engine (same routing role, same database,
  same pool settings, none of tenantry's events) that runs ``SELECT
  set_config('tenantry.tenant_id', :t, true)`` then the same SELECT on the table with
  the classic policy;
- ``bare``: ``Session`` on the plain engine, the same SELECT on the table without a
  policy.

With ``--asyncio``, the same three on the event loop: ``AsyncRouter.session(t)``
against ``AsyncSession``s on the router's own async engine (as ``_routing_async.py``).

Each is timed unprofiled first (median of 5 batches of *count* / 5), then profiled
over *count* transactions after 500 of warm-up; the table is the top 40 by cumulative
time. Function calls per transaction are the profile's count divided by *count*.
Without ``--pg-url`` throwaway PostgreSQL servers are started.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import load_average, pg_servers
from _routing_fleet import QUICK, SET_TENANT, ClassicReading, OpenReading, build_fleet, point
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from tenantry import AsyncRouter

Tx = Callable[[str, int], None]
#: Runs a list of (tenant, row) transactions.
Run = Callable[[list[tuple[str, int]]], None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pg-url", help="superuser URL of a running PostgreSQL server")
    parser.add_argument("--count", type=int, default=5000, help="transactions profiled")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here (else stdout)")
    parser.add_argument("--dump", type=Path, help="also save each raw profile in this folder")
    parser.add_argument("--asyncio", action="store_true", help="AsyncRouter and AsyncSession")
    args = parser.parse_args()
    cfg = replace(QUICK, tenants=1000)
    with pg_servers([args.pg_url] if args.pg_url else None, count=2) as urls, ExitStack() as st:
        fleet = build_fleet(urls[0], urls[1], cfg, st)
        router, plain = fleet.router, fleet.plain

        def routed(tenant: str, row: int) -> None:
            with router.session(tenant) as session:
                session.execute(point(tenant, row)).scalar_one()

        def hand(tenant: str, row: int) -> None:
            with Session(plain) as session:
                session.execute(SET_TENANT, {"t": tenant})
                session.execute(point(tenant, row, ClassicReading)).scalar_one()

        def bare(tenant: str, row: int) -> None:
            with Session(plain) as session:
                session.execute(point(tenant, row, OpenReading)).scalar_one()

        load = load_average()
        paths: list[tuple[str, Run]] = [
            ("routed", _sync(routed)),
            ("hand-written", _sync(hand)),
            ("bare", _sync(bare)),
        ]
        loop = asyncio.new_event_loop()
        st.callback(loop.close)
        if args.asyncio:
            paths = _async_paths(fleet, loop, st)
        sections = [
            _profile(
                name, run, fleet.tenants, cfg.rows_per_tenant, args.count, args.seed, args.dump
            )
            for name, run in paths
        ]
    report = f"load average {load} at the start, {load_average()} at the end\n\n" + "\n\n".join(
        text for text, _calls in sections
    )
    calls = ", ".join(
        f"{name}: {c:.0f}" for (name, _run), (_t, c) in zip(paths, sections, strict=True)
    )
    report = f"Function calls per transaction: {calls}.\n{report}"
    if args.out:
        args.out.write_text(report)
    print(report)


def _sync(fn: Tx) -> Run:
    def run(work: list[tuple[str, int]]) -> None:
        for tenant, row in work:
            fn(tenant, row)

    return run


def _async_paths(
    fleet: Any, loop: asyncio.AbstractEventLoop, st: ExitStack
) -> list[tuple[str, Run]]:
    """The three paths on the event loop *loop* (each run of work one coroutine)."""
    router = AsyncRouter(catalog=fleet.catalog, settings=fleet.settings)
    st.callback(loop.run_until_complete, router.close())
    engine = loop.run_until_complete(router.engine_for(fleet.tenants[0]))

    async def routed(tenant: str, row: int) -> None:
        async with router.session(tenant) as session:
            (await session.execute(point(tenant, row))).scalar_one()

    async def hand(tenant: str, row: int) -> None:
        async with AsyncSession(engine) as session:
            await session.execute(SET_TENANT, {"t": tenant})
            (await session.execute(point(tenant, row, ClassicReading))).scalar_one()

    async def bare(tenant: str, row: int) -> None:
        async with AsyncSession(engine) as session:
            (await session.execute(point(tenant, row, OpenReading))).scalar_one()

    def on_loop(fn: Callable[[str, int], Awaitable[None]]) -> Run:
        async def all_of(work: list[tuple[str, int]]) -> None:
            for tenant, row in work:
                await fn(tenant, row)

        def run(work: list[tuple[str, int]]) -> None:
            loop.run_until_complete(all_of(work))

        return run

    return [
        ("async routed", on_loop(routed)),
        ("async hand-written", on_loop(hand)),
        ("async bare", on_loop(bare)),
    ]


def _profile(
    name: str, run: Run, tenants: list[str], rows: int, count: int, seed: int, dump: Path | None
) -> tuple[str, float]:
    rng = random.Random(seed)
    work = [(rng.choice(tenants), rng.randint(1, rows)) for _ in range(count + 500)]
    run(work[:500])
    work = work[500:]
    batch = max(1, count // 5)
    times = []
    cpu = []
    for start in range(0, count, batch):
        began, cpu_began = time.perf_counter_ns(), time.thread_time_ns()
        run(work[start : start + batch])
        cpu.append((time.thread_time_ns() - cpu_began) / batch / 1000)
        times.append((time.perf_counter_ns() - began) / batch / 1000)
    profiler = cProfile.Profile()
    profiler.enable()
    run(work)
    profiler.disable()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(dump / f"{name}.prof")
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(40)
    header = (
        f"=== {name}: {count} transactions, {statistics.median(times):.1f} us each "
        f"unprofiled, {statistics.median(cpu):.1f} us of client CPU (median of 5 batches "
        f"of {batch:,}) ==="
    )
    calls: float = stats.total_calls / count  # type: ignore[attr-defined]
    return f"{header}\n{buffer.getvalue()}", calls


if __name__ == "__main__":
    main()
