"""What seeing the fleet costs: routed transactions with metrics, traces and statement
comments on, against the same router with all of them off.

    python benchmarks/observability.py [--quick] [--pg-url URL ...] [--out DIR]

The fleet is routing_overhead.py's (``_routing_fleet``): a shared shard whose routing
role row-level security binds, 1,000 tenants of 20 rows. Four routers of one catalog
route the same transaction — one point select by ``(tenant_id, id)`` through
``router.session(t)``, then the session closed (rolled back), or five selects and a
commit — each with an engine and pool of its own:

- ``off``: metrics, traces and comments off (the default);
- ``metrics``: Prometheus metrics on (a registry of its own; the per-tenant top 100);
- ``traces``: OpenTelemetry spans on, with the API only (no SDK: no-op spans, what an
  application that has not set an SDK up pays);
- ``comments``: sqlcommenter comments on every statement, with a route set.

Rounds interleave the variants in a fresh random order, so machine noise hits all of
them alike; per-round p50 ratios to ``off`` show the run's spread, and the client's
CPU time per transaction (this thread's, less sensitive to a busy machine than the
latency) what the hooks themselves cost. Target: metrics at most 3% over ``off`` on the
routed p50.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

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
    percentile,
    pg_servers,
    progress,
    summarize,
    timed,
    verdict,
)
from _routing_fleet import Config, build_fleet, point
from _routing_measure import make_work, run_batch
from prometheus_client import CollectorRegistry

from tenantry import Router, Shard
from tenantry.observability import statement_route
from tenantry.observability.metrics import Metrics
from tenantry.observability.routing import RouterObserver
from tenantry.router.fence import TENANT_KEY

NAME = "observability"
VARIANTS = ("off", "metrics", "traces", "comments")
STATEMENTS = (1, 5)
TARGET_METRICS = 1.03


@dataclass(frozen=True)
class Run:
    """How much to run: rounds of *batch* transactions per variant and shape."""

    mode: str
    rounds: int
    batch: int
    warmup: int
    hook_calls: int


FULL = Run("full", rounds=400, batch=20, warmup=50, hook_calls=200_000)
QUICK = Run("quick", rounds=15, batch=10, warmup=10, hook_calls=50_000)
FLEET = Config(mode="observability", tenants=1000, rows_per_tenant=20)

TxFn = Callable[[str, list[int], bool], None]


def transaction(router: Router) -> TxFn:
    def routed(tenant: str, rows: list[int], commit: bool) -> None:
        with router.session(tenant) as session:
            for row in rows:
                session.execute(point(tenant, row)).scalar_one()
            if commit:
                session.commit()

    return routed


class _Entered:
    __slots__ = ("info",)

    def __init__(self, tenant: str) -> None:
        self.info = {TENANT_KEY: tenant}


class _Transaction:
    """A stand-in for a routed session: what the observer wraps, minus the database."""

    __slots__ = ("_entered",)

    def __init__(self, entered: _Entered) -> None:
        self._entered = entered

    def __enter__(self) -> _Entered:
        return self._entered

    def __exit__(self, *exc: object) -> None:
        return None


def measure_hooks(
    shard: Shard, tenants: Sequence[str], calls: int, repeats: int
) -> dict[str, float]:
    """The observer's own cost per transaction (ns), without the database: a wrapped
    stand-in transaction against the bare one, best of *repeats*."""
    metrics = Metrics(CollectorRegistry())
    observer = RouterObserver(
        metrics=metrics,
        tracer=None,
        comments=False,
        tenant_key=TENANT_KEY,
        shard_for=lambda _t: shard,
        map_version=lambda: 1,
    )
    entered = [_Entered(t) for t in tenants]
    clock = time.perf_counter_ns

    def bare() -> int:
        start = clock()
        for i in range(calls):
            with _Transaction(entered[i % len(entered)]):
                pass
        return clock() - start

    def observed() -> int:
        start = clock()
        for i in range(calls):
            e = entered[i % len(entered)]
            with observer.wrap(_Transaction(e), None):
                pass
        return clock() - start

    best_bare = min(bare() for _ in range(repeats)) / calls
    best_observed = min(observed() for _ in range(repeats)) / calls
    return {
        "bare_ns": best_bare,
        "observed_ns": best_observed,
        "hooks_ns": best_observed - best_bare,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    rng = random.Random(args.seed)
    phase = Phases()
    samples: dict[tuple[str, int], list[list[int]]] = {
        (v, s): [] for v in VARIANTS for s in STATEMENTS
    }
    cpu: dict[tuple[str, int], list[float]] = {(v, s): [] for v in VARIANTS for s in STATEMENTS}
    with pg_servers(args.pg_url, count=2) as urls, ExitStack() as stack:
        info = machine_info(urls[:1])
        with phase("setup"):
            fleet = build_fleet(urls[0], urls[1], FLEET, stack)
            routers = {
                "off": fleet.router,
                "metrics": Router(catalog=fleet.catalog, metrics=Metrics(CollectorRegistry())),
                "traces": Router(catalog=fleet.catalog, traces=True),
                "comments": Router(catalog=fleet.catalog, statement_comments=True),
            }
            for name, router in routers.items():
                if name != "off":
                    stack.callback(router.close)
            fns = {name: transaction(router) for name, router in routers.items()}
            stack.enter_context(statement_route("/bench/readings"))
        with phase("transactions"):
            plan = [(v, s) for v in VARIANTS for s in STATEMENTS]
            with progress() as bar:
                task = bar.add_task("rounds", total=cfg.rounds + 1)
                for variant, statements in plan:  # warm every pool and cache
                    work = make_work(rng, fleet.tenants, FLEET, cfg.warmup, statements)
                    run_batch(fns[variant], work, statements > 1)
                bar.advance(task)
                for _round in range(cfg.rounds):
                    rng.shuffle(plan)
                    gc.collect()
                    for variant, statements in plan:
                        work = make_work(rng, fleet.tenants, FLEET, cfg.batch, statements)
                        latencies, used = run_batch(fns[variant], work, statements > 1)
                        samples[variant, statements].append(latencies)
                        cpu[variant, statements].append(used / len(latencies))
                    bar.advance(task)
        with phase("hooks"):
            hooks = measure_hooks(fleet.shard, fleet.tenants, cfg.hook_calls, 5)
        metrics_router = routers["metrics"]
        assert metrics_router._observer is not None
        scraped = metrics_router._observer.metrics
        assert scraped is not None
        series = len(scraped.tenants.busiest())

    rows = []
    for statements in STATEMENTS:
        base = [x for r in samples["off", statements] for x in r]
        base_p50 = percentile(base, 50)
        base_cpu = statistics.median(cpu["off", statements])
        for variant in VARIANTS:
            flat = [x for r in samples[variant, statements] for x in r]
            per_round = [
                percentile(mine, 50) / percentile(off, 50)
                for mine, off in zip(
                    samples[variant, statements], samples["off", statements], strict=True
                )
            ]
            p50 = percentile(flat, 50)
            rows.append(
                {
                    "variant": variant,
                    "statements": statements,
                    "latency_ns": summarize(flat, stats=("n", "p50", "p90", "p99", "mean")),
                    "p50_ratio": p50 / base_p50,
                    "cpu_per_tx_ns": statistics.median(cpu[variant, statements]),
                    "cpu_ratio": statistics.median(cpu[variant, statements]) / base_cpu,
                    "round_ratio_median": statistics.median(per_round),
                    "round_ratio_p10": percentile(per_round, 10),
                    "round_ratio_p90": percentile(per_round, 90),
                }
            )
    worst = max(r["p50_ratio"] for r in rows if r["variant"] == "metrics")
    return {
        "benchmark": NAME,
        "config": {**cfg.__dict__, "tenants": FLEET.tenants},
        "seed": args.seed,
        "machine": info,
        "load_average_end": load_average(),
        "phases_s": phase.seconds,
        "rows": rows,
        "tenant_series": series,
        "hooks": hooks,
        "hooks_vs_off_p50": hooks["hooks_ns"]
        / percentile([x for r in samples["off", 1] for x in r], 50),
        "targets": {
            "metrics_p50_ratio": {
                "value": worst,
                "target": TARGET_METRICS,
                "verdict": verdict(worst, TARGET_METRICS),
            }
        },
    }


def render_markdown(data: dict[str, Any]) -> str:
    table = markdown_table(
        [
            "variant",
            "statements",
            "p50",
            "p99",
            "p50 / off",
            "per-round p50 / off (p10-p90)",
            "client CPU / tx",
            "CPU / off",
        ],
        [
            [
                r["variant"],
                r["statements"],
                fmt_ns(r["latency_ns"]["p50"]),
                fmt_ns(r["latency_ns"]["p99"]),
                f"{r['p50_ratio']:.3f}",
                f"{r['round_ratio_median']:.3f} ({r['round_ratio_p10']:.3f}-"
                f"{r['round_ratio_p90']:.3f})",
                fmt_ns(r["cpu_per_tx_ns"]),
                f"{r['cpu_ratio']:.3f}",
            ]
            for r in data["rows"]
        ],
    )
    target = data["targets"]["metrics_p50_ratio"]
    return "\n\n".join(
        [
            "# What seeing the fleet costs",
            f"Metrics on, routed p50 over off (worst shape): {target['value']:.3f} "
            f"(target <= {target['target']}: {target['verdict']})",
            table,
            f"Per-tenant series exposed: {data['tenant_series']}.",
            f"The metrics hooks alone (no database): {fmt_ns(data['hooks']['hooks_ns'])} per "
            f"transaction, {100 * data['hooks_vs_off_p50']:.2f}% of the routed p50 (one "
            "statement).",
            machine_markdown(data["machine"]),
        ]
    )


def print_summary(data: dict[str, Any]) -> None:
    for r in data["rows"]:
        console.print(
            f"{r['variant']:>9} x{r['statements']}: p50 {fmt_ns(r['latency_ns']['p50']):>9}"
            f"  {r['p50_ratio']:.3f} of off (rounds {r['round_ratio_p10']:.3f}-"
            f"{r['round_ratio_p90']:.3f}); client CPU {fmt_ns(r['cpu_per_tx_ns'])}"
            f" ({r['cpu_ratio']:.3f})"
        )
    target = data["targets"]["metrics_p50_ratio"]
    console.print(f"metrics: {target['value']:.3f} <= {target['target']}: {target['verdict']}")
    console.print(
        f"metrics hooks alone: {fmt_ns(data['hooks']['hooks_ns'])} per transaction "
        f"({100 * data['hooks_vs_off_p50']:.2f}% of the routed p50)"
    )
    console.print(f"load average at the end: {data['load_average_end']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, about a minute")
    add_server_options(parser)
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = timed(run, args)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
