"""A routed ROLLBACK that keeps psycopg's prepared statements, against psycopg's own.

    python benchmarks/_routing_rollback.py [--pg-url URL] [--rounds N] [--out FILE]

The routing benchmark's fleet (``_routing_fleet.build_fleet``), one thread, tenants
drawn at random, transactions of one or five ORM point selects that end in a rollback
(leaving ``router.session(t)``, as a read-only request does):

- ``routed, keeping prepared``: the router as it is (``fence.rollback_keeping_prepared``
  is the engine dialect's ``do_rollback``);
- ``routed, psycopg's rollback``: the same router with ``do_rollback`` back to
  psycopg's ``rollback()``, which forgets every prepared statement;
- ``bare``: a plain ``Session`` on the table without a policy (psycopg's rollback).

The routed variants share one engine and connection; each batch begins with one
unrecorded transaction so that the mode just switched to has taken effect. Per
variant: wall p50, and medians over rounds of the client's CPU and the server
backend's CPU per transaction (``/proc/<pid>/schedstat``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import load_average, markdown_table, pg_servers
from _procfs import schedstat_ns
from _routing_fleet import QUICK, OpenReading, build_fleet, point
from sqlalchemy.orm import Session

from tenantry.router import fence

BATCH = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pg-url", help="superuser URL of a running PostgreSQL server")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here (else stdout)")
    args = parser.parse_args()
    cfg = replace(QUICK, tenants=200)
    rng = random.Random(args.seed)
    with pg_servers([args.pg_url] if args.pg_url else None, count=2) as urls, ExitStack() as st:
        fleet = build_fleet(urls[0], urls[1], cfg, st)
        router, plain = fleet.router, fleet.plain
        dialect: Any = router.engine_for(fleet.tenants[0]).dialect

        def psycopg_rollback(dbapi_connection: Any) -> None:
            dbapi_connection.rollback()

        def routed(keep: bool, count: int) -> Callable[[str, int], None]:
            def tx(tenant: str, row: int) -> None:
                dialect.do_rollback = fence.rollback_keeping_prepared if keep else psycopg_rollback
                with router.session(tenant) as session:
                    for _ in range(count):
                        session.execute(point(tenant, row)).scalar_one()

            return tx

        def bare(count: int) -> Callable[[str, int], None]:
            def tx(tenant: str, row: int) -> None:
                with Session(plain) as session:
                    for _ in range(count):
                        session.execute(point(tenant, row, OpenReading)).scalar_one()

            return tx

        def pid_of(engine: Any) -> int:
            with engine.connect() as conn:
                return int(conn.connection.driver_connection.info.backend_pid)

        routed_pid = pid_of(router.engine_for(fleet.tenants[0]))
        plain_pid = pid_of(plain)
        variants: dict[tuple[str, int], tuple[int, Callable[[str, int], None]]] = {}
        for count in (1, 5):
            variants["routed, keeping prepared", count] = (routed_pid, routed(True, count))
            variants["routed, psycopg's rollback", count] = (routed_pid, routed(False, count))
            variants["bare", count] = (plain_pid, bare(count))
        walls: dict[Any, list[int]] = {k: [] for k in variants}
        cpu: dict[Any, list[float]] = {k: [] for k in variants}
        server: dict[Any, list[float]] = {k: [] for k in variants}
        load = load_average()
        for round_no in range(args.rounds + 2):
            order = list(variants)
            rng.shuffle(order)
            for key in order:
                pid, tx = variants[key]
                work = [
                    (rng.choice(fleet.tenants), rng.randint(1, cfg.rows_per_tenant))
                    for _ in range(BATCH + 1)
                ]
                tx(*work[0])  # the mode switched to takes effect
                s0, c0 = schedstat_ns(pid), time.thread_time_ns()
                laps = []
                for tenant, row in work[1:]:
                    began = time.perf_counter_ns()
                    tx(tenant, row)
                    laps.append(time.perf_counter_ns() - began)
                c1, s1 = time.thread_time_ns(), schedstat_ns(pid)
                if round_no >= 2:
                    walls[key] += laps
                    cpu[key].append((c1 - c0) / BATCH / 1000)
                    server[key].append((s1 - s0) / BATCH / 1000)
        dialect.do_rollback = fence.rollback_keeping_prepared
    rows = []
    for key in sorted(variants, key=lambda k: (k[1], k[0])):
        name, count = key
        rows.append(
            [
                name,
                count,
                f"{statistics.median(walls[key]) / 1000:.0f}",
                f"{statistics.median(cpu[key]):.0f}",
                f"{statistics.median(server[key]):.0f}",
            ]
        )
    report = (
        "# A routed ROLLBACK that keeps psycopg's prepared statements\n\n"
        "`python benchmarks/_routing_rollback.py` (see its docstring). Load average "
        f"{load} at the start, {load_average()} at the end; {args.rounds} rounds of "
        f"{BATCH} transactions per variant, interleaved; every transaction ends in a "
        "rollback.\n\n"
        + markdown_table(
            ["transaction", "selects", "wall p50 µs", "client CPU µs", "server CPU µs"], rows
        )
        + "\n"
    )
    if args.out:
        args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
