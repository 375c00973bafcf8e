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

Each is timed unprofiled first (median of 5 batches of *count* / 5), then profiled
over *count* transactions after 500 of warm-up; the table is the top 40 by cumulative
time. Function calls per transaction are the profile's count divided by *count*.
Without ``--pg-url`` throwaway PostgreSQL servers are started.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from _common import load_average, pg_servers
from _routing_fleet import QUICK, SET_TENANT, ClassicReading, OpenReading, build_fleet, point
from sqlalchemy.orm import Session

Tx = Callable[[str, int], None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pg-url", help="superuser URL of a running PostgreSQL server")
    parser.add_argument("--count", type=int, default=5000, help="transactions profiled")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here (else stdout)")
    parser.add_argument("--dump", type=Path, help="also save each raw profile in this folder")
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
        sections = [
            _profile(name, fn, fleet.tenants, cfg.rows_per_tenant, args.count, args.seed, args.dump)
            for name, fn in (("routed", routed), ("hand-written", hand), ("bare", bare))
        ]
    report = f"load average {load} at the start, {load_average()} at the end\n\n" + "\n\n".join(
        text for text, _calls in sections
    )
    calls = ", ".join(
        f"{name}: {c:.0f}"
        for name, (_t, c) in zip(("routed", "hand-written", "bare"), sections, strict=True)
    )
    report = f"Function calls per transaction: {calls}.\n{report}"
    if args.out:
        args.out.write_text(report)
    print(report)


def _profile(
    name: str, fn: Tx, tenants: list[str], rows: int, count: int, seed: int, dump: Path | None
) -> tuple[str, float]:
    rng = random.Random(seed)
    work = [(rng.choice(tenants), rng.randint(1, rows)) for _ in range(count + 500)]
    for tenant, row in work[:500]:
        fn(tenant, row)
    work = work[500:]
    batch = max(1, count // 5)
    times = []
    for start in range(0, count, batch):
        began = time.perf_counter_ns()
        for tenant, row in work[start : start + batch]:
            fn(tenant, row)
        times.append((time.perf_counter_ns() - began) / batch / 1000)
    profiler = cProfile.Profile()
    profiler.enable()
    for tenant, row in work:
        fn(tenant, row)
    profiler.disable()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(dump / f"{name}.prof")
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(40)
    header = (
        f"=== {name}: {count} transactions, {statistics.median(times):.1f} us each "
        f"unprofiled ({batch:,}; a shared, loaded machine) ==="
    )
    calls: float = stats.total_calls / count  # type: ignore[attr-defined]
    return f"{header}\n{buffer.getvalue()}", calls


if __name__ == "__main__":
    main()
