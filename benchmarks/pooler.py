"""Behind a connection pooler: routed transactions through PgBouncer (transaction mode)
against the same transactions straight to the server, and the server connections held.

    python benchmarks/pooler.py [--quick] [--pg-url URL] [--out DIR]

One PostgreSQL server (throwaway, with room for 1500 connections, unless ``--pg-url``)
and PgBouncer in transaction mode in front of it (``tenantry.testing.TempPgBouncer``:
Debian's ``pgbouncer``, which ``make bench`` installs when missing). Routing roles are
NOSUPERUSER NOBYPASSRLS roles made here; every operations URL is the server's own.

**Question 1 — what the pooler costs a routed transaction.** Two shared shards with the
same rows under tenantry's row-level security, registered with ``add_shard(name, url,
admin_url=server_url)``: one whose routing URL is the server, one whose routing URL goes
through PgBouncer (``add_shard`` finds the pooler itself; routers then sign the fence
per transaction, two round trips, and prepare nothing on the server). Beside each, a
database with the same rows without row-level security, read by a bare SQLAlchemy
``Session`` on an engine with the same pool (through PgBouncer: no prepared statements
either): ``bare pooled / bare direct`` is what the pooler costs anyone,
``routed pooled / routed direct`` what it costs tenantry's routed transactions. The
transaction is one point select (rolled back: the session closed), or that select and
one update of the same row (committed). Client threads: 8 and 64; the router's pool and
the bare engines' pools have 64 connections (+8 overflow), so the direct runs hold one
server connection per thread, and PgBouncer holds at most ``default_pool_size`` (20)
per database. Rounds interleave all cells (route x path x transaction x threads) in a
fresh random order, in short batches, so a burst of other work hits all alike; p50 and
p99 are over every transaction of the run, the throughput is transactions per second
of batch wall time. The server's client backends are sampled every 0.1 s (by database:
each variant has its own), held (all) and busy (not idle).

**Question 2 — the server connections of many dedicated databases.** 200 databases
copied from one template (tenantry's shard schema, a 10-row table), one tenant each, on
the dedicated tier, registered twice: in one catalog with routing URLs to the server
(routing role A), in another through PgBouncer (routing role B; ``default_pool_size``
2 per database, ``max_user_connections`` 40 for the role: PgBouncer closes the idlest
server connection of another database when a database needs one beyond that). For
each, 4 OS processes with a Router each (max_engines 512, so no engine is evicted)
first route one transaction to every tenant (each opens its pools on every database),
then route 1-select transactions to random tenants from 4 threads each for a fixed
window, started together; the server's client backends of each role are sampled during
the window. Direct and pooled windows alternate, twice (once with ``--quick``, which
also has 40 databases, not 200).

The load average at the start and the end is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any

import _pooler_fleet as fleet_module
from _common import (
    Phases,
    add_server_options,
    console,
    finish,
    fmt_ns,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    timed,
)
from _pooler_fleet import (
    FULL,
    KIND_LABELS,
    KINDS,
    NAME,
    PATH_LABELS,
    PATHS,
    PATHS_2,
    QUICK,
    ROUTES,
    Config,
    Sampler,
    SharedFleet,
    bench_server,
    build_dedicated,
    build_shared,
    by_database,
    by_user,
    connection_figures,
    routing_role,
    start_pgbouncer,
    transaction,
    wait_for_no_backends,
)

Cell = tuple[str, str, str, int]  # route, path, kind, threads


# -- question 1 ------------------------------------------------------------------------------


def run_batch(
    fleet: SharedFleet,
    pool: ThreadPoolExecutor,
    cell: Cell,
    per_thread: int,
    cfg: Config,
    seed: int,
) -> tuple[list[int], float]:
    route, path, kind, threads = cell

    def worker(n: int) -> list[int]:
        rng = random.Random(seed * 1000 + n)
        out = []
        for _ in range(per_thread):
            t0 = time.perf_counter_ns()
            transaction(fleet, route, path, kind, rng, cfg)
            out.append(time.perf_counter_ns() - t0)
        return out

    started = time.perf_counter()
    parts = list(pool.map(worker, range(threads)))
    wall = time.perf_counter() - started
    return [x for part in parts for x in part], wall


def question_1(
    fleet: SharedFleet, server: str, cfg: Config, seed: int, phase: Phases
) -> dict[str, Any]:
    cells: list[Cell] = [
        (r, p, k, n) for n in cfg.threads for k in KINDS for r in ROUTES for p in PATHS
    ]
    batch = dict(cfg.batch)
    pools = {n: ThreadPoolExecutor(n) for n in cfg.threads}
    latencies: dict[Cell, list[int]] = defaultdict(list)
    walls: dict[Cell, float] = defaultdict(float)
    rng = random.Random(seed)
    sampler = Sampler(server, cfg.sample_interval_s)
    try:
        with phase("question 1: warm-up (pools grow to 64)"):
            for i in range(cfg.warmup_batches):
                for cell in cells:
                    run_batch(fleet, pools[cell[3]], cell, batch[cell[3]], cfg, seed + i)
        with phase(f"question 1: {cfg.rounds} interleaved rounds of {len(cells)} cells"):
            sampler.start()
            for r in range(cfg.rounds):
                order = list(cells)
                rng.shuffle(order)
                for cell in order:
                    lat, wall = run_batch(
                        fleet, pools[cell[3]], cell, batch[cell[3]], cfg, seed * 7919 + r
                    )
                    latencies[cell] += lat
                    walls[cell] += wall
            samples = sampler.stop()
    finally:
        for pool in pools.values():
            pool.shutdown()
        sampler.close()
    per_database = by_database(samples)
    connections = {
        f"{route}/{path}": connection_figures(per_database.get(fleet.databases[(route, path)], []))
        for route in ROUTES
        for path in PATHS
    }
    rows = []
    for cell in cells:
        route, path, kind, threads = cell
        figures = summarize(latencies[cell], stats=("n", "p50", "p90", "p99", "mean"))
        rows.append(
            {
                "route": route,
                "path": path,
                "kind": kind,
                "threads": threads,
                "latency_ns": figures,
                "throughput_tps": len(latencies[cell]) / walls[cell],
            }
        )
    return {
        "cells": rows,
        "ratios": ratio_rows(rows),
        "server_connections": connections,
        "pooled": fleet.pooled,
    }


def _find(rows: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any]:
    return next(r for r in rows if all(r[k] == v for k, v in keys.items()))


def ratio_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """pooled / direct of p50, p99 and throughput, per route, transaction and threads."""
    out = []
    for kind in KINDS:
        for threads in sorted({r["threads"] for r in rows}):
            for route in ROUTES:
                direct = _find(rows, route=route, path="direct", kind=kind, threads=threads)
                pooled = _find(rows, route=route, path="pooled", kind=kind, threads=threads)
                out.append(
                    {
                        "route": route,
                        "kind": kind,
                        "threads": threads,
                        "p50": pooled["latency_ns"]["p50"] / direct["latency_ns"]["p50"],
                        "p99": pooled["latency_ns"]["p99"] / direct["latency_ns"]["p99"],
                        "throughput": pooled["throughput_tps"] / direct["throughput_tps"],
                    }
                )
    return out


# -- question 2 ------------------------------------------------------------------------------


def question_2(
    dedicated: fleet_module.DedicatedFleet, server: str, cfg: Config, seed: int, phase: Phases
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    sampler = Sampler(server, cfg.sample_interval_s)
    windows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rng = random.Random(seed)
    try:
        for r in range(cfg.rounds_2):
            order = list(PATHS_2)
            rng.shuffle(order)
            for path in order:
                with phase(f"question 2: round {r + 1}, {path}"):
                    windows[path].append(
                        one_window(ctx, dedicated, sampler, path, cfg, seed * 31 + r)
                    )
    finally:
        sampler.close()
    out: dict[str, Any] = {}
    for path in PATHS_2:
        latencies = [x for w in windows[path] for x in w["latencies_ns"]]
        held = [c for w in windows[path] for c in w["counts"]]
        out[path] = {
            "windows": len(windows[path]),
            "transactions": len(latencies),
            "throughput_tps": statistics.fmean(w["throughput_tps"] for w in windows[path]),
            "throughput_by_window": [w["throughput_tps"] for w in windows[path]],
            "latency_ns": summarize(latencies, stats=("n", "p50", "p90", "p99", "mean")),
            "server_connections": connection_figures(held),
            "held_before_window": [w["held_before"] for w in windows[path]],
            "sessions_opened_per_s": statistics.fmean(w["sessions_per_s"] for w in windows[path]),
        }
    direct = out["direct"]
    out["ratios"] = {
        path: {
            "held_peak": out[path]["server_connections"]["held_peak"]
            / direct["server_connections"]["held_peak"],
            "p50": out[path]["latency_ns"]["p50"] / direct["latency_ns"]["p50"],
            "p99": out[path]["latency_ns"]["p99"] / direct["latency_ns"]["p99"],
            "throughput": out[path]["throughput_tps"] / direct["throughput_tps"],
        }
        for path in PATHS_2[1:]
    }
    return out


def one_window(
    ctx: Any,
    dedicated: fleet_module.DedicatedFleet,
    sampler: Sampler,
    path: str,
    cfg: Config,
    seed: int,
) -> dict[str, Any]:
    user = dedicated.users[path]
    # Every window starts with no server connection of any variant: the last one's
    # routers have exited, PgBouncer's idle server connections are ended.
    for other in dedicated.users.values():
        sampler.terminate(other)
        wait_for_no_backends(sampler, other)
    barrier = ctx.Barrier(cfg.processes + 1)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=fleet_module.router_process,
            args=(
                dedicated.catalog_urls[path],
                dedicated.settings,
                dedicated.tenants,
                cfg.threads_per_process,
                cfg.window_s,
                seed * 10 + i,
                barrier,
                results,
            ),
        )
        for i in range(cfg.processes)
    ]
    for p in processes:
        p.start()
    try:
        barrier.wait(timeout=300)
        held_before = sum(h for (_d, u), (h, _b) in sampler.sample().items() if u == user)
        sessions_before = sampler.sessions()
        sampler.start()
        outcomes = [results.get(timeout=cfg.window_s + 120) for _ in processes]
        samples = sampler.stop()
        sessions = sampler.sessions() - sessions_before
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"a router process failed: {errors[0]}")
    latencies = [x for o in outcomes for x in o["latencies_ns"]]
    wall = max(o["wall_s"] for o in outcomes)
    counts = by_user(samples).get(user, [])
    console.print(
        f"  {path}: {len(latencies) / wall:.0f} tx/s, server connections held: "
        f"peak {max((h for h, _b in counts), default=0)}"
    )
    return {
        "latencies_ns": latencies,
        "throughput_tps": len(latencies) / wall,
        "counts": counts,
        "held_before": held_before,
        "sessions_per_s": sessions / wall,
    }


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    phase = Phases()
    with bench_server(args.pg_url) as server, ExitStack() as stack:
        fleet_module.DROP["databases"] = bool(args.pg_url)
        info = machine_info([server])
        role_1 = routing_role(server, "shared", stack)
        roles_2 = {p: routing_role(server, p.replace("-", "_"), stack) for p in PATHS_2}
        with phase("question 1: set-up"), ExitStack() as stack_1:
            bouncer = start_pgbouncer(server, [role_1], cfg.pool_size_1, {}, stack_1)
            fleet = build_shared(server, role_1, bouncer, cfg, stack_1)
            pgbouncer_version = _pgbouncer_version(bouncer)
            q1 = question_1(fleet, server, cfg, args.seed, phase)
        capped = {"max_user_connections": str(cfg.user_cap_2), "max_db_connections": "0"}
        with phase(f"question 2: set-up ({cfg.databases} databases)"):
            bouncers = {
                "pooled": start_pgbouncer(
                    server, [roles_2["pooled"]], cfg.pool_size_2, capped, stack
                ),
                "pooled-1": start_pgbouncer(
                    server, [roles_2["pooled-1"]], cfg.pool_size_2b, {}, stack
                ),
            }
            dedicated = build_dedicated(server, roles_2, bouncers, cfg, stack)
        q2 = question_2(dedicated, server, cfg, args.seed, phase)
    return {
        "benchmark": NAME,
        "config": {**asdict(cfg), "threads": list(cfg.threads)},
        "seed": args.seed,
        "machine": info,
        "pgbouncer": {
            "version": pgbouncer_version,
            "pool_mode": "transaction",
            "question_1": {"default_pool_size": cfg.pool_size_1, "max_db_connections": 0},
            "question_2": {
                "pooled": {
                    "default_pool_size": cfg.pool_size_2,
                    "max_user_connections": cfg.user_cap_2,
                    "max_db_connections": 0,
                },
                "pooled-1": {
                    "default_pool_size": cfg.pool_size_2b,
                    "max_user_connections": 0,
                    "max_db_connections": 0,
                },
            },
        },
        "load_average_end": load_average(),
        "phases_s": phase.seconds,
        "question_1": q1,
        "question_2": q2,
    }


def _pgbouncer_version(bouncer: Any) -> str | None:
    import subprocess

    from tenantry.testing.pgbouncer import find_pgbouncer

    binary = find_pgbouncer()
    if binary is None:
        return None
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else None


# -- report ----------------------------------------------------------------------------------


def _x(value: float) -> str:
    return f"{value:.2f}x"


def render_markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    q1, q2 = data["question_1"], data["question_2"]
    bouncer = data["pgbouncer"]
    lines = [
        "# Behind a connection pooler (PgBouncer, transaction mode)",
        "",
        f"Mode: {cfg['mode']}; {bouncer['version']}; load average at start "
        f"{data['machine']['load_average']}, at end {data['load_average_end']}; "
        f"{data['duration_s']} s.",
        "",
        "## 1. Routed transactions through PgBouncer vs direct",
        "",
        f"One shared shard ({cfg['tenants']} tenants x {cfg['rows_per_tenant']} rows, "
        "tenantry's row-level security) routed directly and one routed through PgBouncer "
        f"(`default_pool_size` {bouncer['question_1']['default_pool_size']}); `bare` is "
        "a plain SQLAlchemy Session on a copy without row-level security, direct and "
        f"through the same PgBouncer. Client pools: {cfg['router_pool']} "
        f"(+{cfg['router_overflow']}). {cfg['rounds']} interleaved rounds.",
        "",
        "Ratios pooled / direct (latency: below 1 is faster through the pooler; "
        "throughput: above 1 is more through the pooler):",
        "",
    ]
    rows = [
        [
            KIND_LABELS[r["kind"]],
            r["threads"],
            r["route"],
            _x(r["p50"]),
            _x(r["p99"]),
            _x(r["throughput"]),
        ]
        for r in q1["ratios"]
    ]
    lines.append(
        markdown_table(
            ["transaction", "threads", "route", "p50", "p99", "throughput"], rows, align="lrlrrr"
        )
    )
    lines += [
        "",
        "What tenantry adds, direct and through the pooler: routed / bare p50 on each "
        "path (the pooled fence is two round trips, the direct one one); their ratio is "
        "tenantry's own extra cost behind the pooler:",
        "",
    ]
    rows = []
    for kind in KINDS:
        for threads in cfg["threads"]:

            def p50(route: str, path: str, kind: str = kind, threads: int = threads) -> float:
                cell = _find(q1["cells"], route=route, path=path, kind=kind, threads=threads)
                return float(cell["latency_ns"]["p50"])

            direct = p50("routed", "direct") / p50("bare", "direct")
            pooled = p50("routed", "pooled") / p50("bare", "pooled")
            rows.append([KIND_LABELS[kind], threads, _x(direct), _x(pooled), _x(pooled / direct)])
    lines.append(
        markdown_table(
            ["transaction", "threads", "routed / bare, direct", "routed / bare, pooled", "ratio"],
            rows,
        )
    )
    lines += ["", "Every cell:", ""]
    rows = [
        [
            KIND_LABELS[c["kind"]],
            c["threads"],
            c["route"],
            c["path"],
            c["latency_ns"]["n"],
            fmt_ns(c["latency_ns"]["p50"]),
            fmt_ns(c["latency_ns"]["p99"]),
            f"{c['throughput_tps']:.0f}",
        ]
        for c in q1["cells"]
    ]
    lines.append(
        markdown_table(
            ["transaction", "threads", "route", "path", "n", "p50", "p99", "tx/s"],
            rows,
            align="lrllrrrr",
        )
    )
    lines += [
        "",
        "Server connections (client backends of each variant's database, sampled every "
        f"{cfg['sample_interval_s']} s through the rounds; both thread counts):",
        "",
    ]
    rows = [
        [
            key,
            f"{f.get('held_peak', 0)}",
            f"{f.get('held_mean', 0):.1f}",
            f"{f.get('busy_peak', 0)}",
            f"{f.get('busy_mean', 0):.1f}",
        ]
        for key, f in q1["server_connections"].items()
    ]
    lines.append(
        markdown_table(["route/path", "held peak", "held mean", "busy peak", "busy mean"], rows)
    )
    lines += [
        "",
        f"## 2. Server connections: {cfg['processes']} router processes, "
        f"{cfg['databases']} dedicated databases",
        "",
        f"One tenant per database; each process routes 1-select transactions to every "
        f"tenant from {cfg['threads_per_process']} threads for {cfg['window_s']} s per "
        "window, after one transaction to each tenant (its pools open on every "
        f"database); {cfg['rounds_2']} window(s) per variant, in turn. Server "
        "connections: the client backends of the variant's routing role, sampled every "
        f"{cfg['sample_interval_s']} s in the window; sessions opened: new server "
        "connections per second in the window.",
        "",
    ]
    rows = []
    for path in PATHS_2:
        f = q2[path]
        c = f["server_connections"]
        rows.append(
            [
                PATH_LABELS[path],
                f"{c.get('held_peak', 0)}",
                f"{c.get('held_mean', 0):.1f}",
                f"{c.get('busy_peak', 0)}",
                f"{f['sessions_opened_per_s']:.0f}",
                f"{f['throughput_tps']:.0f}",
                fmt_ns(f["latency_ns"]["p50"]),
                fmt_ns(f["latency_ns"]["p99"]),
            ]
        )
    for path in PATHS_2[1:]:
        r = q2["ratios"][path]
        rows.append(
            [
                f"{PATH_LABELS[path]} / direct",
                _x(r["held_peak"]),
                "",
                "",
                "",
                _x(r["throughput"]),
                _x(r["p50"]),
                _x(r["p99"]),
            ]
        )
    lines.append(
        markdown_table(
            [
                "variant",
                "held peak",
                "held mean",
                "busy peak",
                "sessions opened/s",
                "tx/s",
                "p50",
                "p99",
            ],
            rows,
        )
    )
    lines += ["", "## Machine", "", machine_markdown(data["machine"])]
    return "\n".join(lines)


def print_summary(data: dict[str, Any]) -> None:
    for r in data["question_1"]["ratios"]:
        console.print(
            f"{r['route']:>6} {r['kind']:>6} x{r['threads']:<2} pooled/direct: "
            f"p50 {_x(r['p50'])}, p99 {_x(r['p99'])}, throughput {_x(r['throughput'])}"
        )
    q2 = data["question_2"]
    for path in PATHS_2:
        c = q2[path]["server_connections"]
        console.print(
            f"{path}: {c.get('held_peak')} server connections at peak, "
            f"{q2[path]['throughput_tps']:.0f} tx/s, p50 {fmt_ns(q2[path]['latency_ns']['p50'])}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Routed transactions through PgBouncer (transaction mode) vs direct."
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, about a minute")
    add_server_options(parser, default="start a throwaway one")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = timed(run, args)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
