"""Isolation tiers side by side: a shared pool, dedicated databases and a mix, one workload.

    python benchmarks/tiers.py [--quick] [--pg-url URL ...] [--out DIR] [--seed N]
                               [--sizes N ...] [--max-dedicated N] [--only PART ...]

Questions 1-4 of the tier report (``run_all.py`` lists all five), answered in one run
on the same two PostgreSQL servers:

1. **Throughput and latency by tier.** N tenants (10, 100, 1000) placed in a pool of
   two shared databases (one per server), each in a dedicated database (alternating
   over the servers), or mixed (every tenth tenant dedicated, the rest in a pool of
   two). Dedicated runs twice: with tenantry's default pools (2 connections per
   database, overflow connections closed after use) and with 8 pooled per database.
   One workload through ``router.session(t)`` from 8 threads: 70% point reads, 20%
   small writes (one new charging session, committed), 10% a per-tenant aggregate
   (energy per charger). Every layout exists at once, each with its own catalog and
   router; rounds run each layout for a short window in a fresh random order, so noise
   from the machine hits all alike. Layouts that need more than ``--max-dedicated``
   (100) dedicated databases are skipped and the report says so.
2. **Noisy neighbour.** A victim tenant on a shared database runs the workload from 2
   threads while 2 threads run large aggregates of a heavy tenant placed on the
   victim's database, on a dedicated database of the same server, or on a dedicated
   database of the other server; and with no heavy tenant (quiet). Interleaved rounds.
   Servers on this machine are pinned to separate cores meanwhile, as if on two hosts.
3. **Footprint.** Connections held by each layout's router after question 1; for each
   layout a fresh process runs a router over it (every tenant read, then the workload)
   for its RSS and its own connections (``pg_stat_activity`` by ``application_name``).
   Disk: database and table sizes right after seeding, every tenant of the same size.
4. **Onboarding and operations.** ``catalog.add_tenant`` in the shared pool against
   ``migrations.provision`` of a dedicated database (from ``template1`` and then
   migrated, or from a migrated template) plus its ``add_tenant``; the fleet migration
   of every layout from base to head (``migrations.upgrade``); promoting and demoting
   a tenant of 10k and 1M rows (1M only in the full run), offline and online.

Routers connect as a routing role (NOSUPERUSER NOBYPASSRLS), so the row-level security
of shared databases is paid for as in production; the superuser is the operations role.
Results: ``results/tiers.json`` (every figure), ``results/tiers.md`` and
``results/tiers_*.png``. Without ``--pg-url`` two throwaway servers are started
(``tenantry.testing``, ``max_connections`` 1000); given servers need as many.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, replace
from typing import Any

import psycopg
from _common import (
    Phases,
    add_server_options,
    console,
    finish,
    load_average,
    machine_info,
    progress,
    timed,
)
from _tiers_fleet import (
    FULL,
    MIX,
    NAME,
    OPS,
    PARTS,
    PLACEMENTS,
    QUICK,
    Config,
    Layout,
    Servers,
    bench_servers,
    build_layout,
    conninfo,
    dedicated_count,
    make_templates,
)
from _tiers_load import (
    build_noisy,
    measure_noisy,
    measure_throughput,
    servers_on_own_cores,
)
from _tiers_ops import (
    footprint_child,
    held_connections,
    measure_footprint,
    measure_migrations,
    measure_moves,
    measure_onboarding,
)
from _tiers_report import (
    draw_charts,
    fmt_ratio,
    headline,
    render_markdown,
)

from tenantry import (
    Router,
    load_settings,
    mask_url,
)
from tenantry.demo import MIGRATIONS

# -- the run -------------------------------------------------------------------------------


def planned_layouts(cfg: Config) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """The (tier, N) layouts this machine runs, and the skipped ones with the reason."""
    run, skipped = [], []
    for n in cfg.sizes:
        for tier in PLACEMENTS:
            need = dedicated_count(tier, n)
            if tier == "dedicated-pool8" and n not in cfg.pool8_sizes:
                sizes = ", ".join(map(str, cfg.pool8_sizes))
                reason = f"this {cfg.mode} run measures this variant at N = {sizes} only"
                skipped.append({"tier": tier, "n": n, "reason": reason})
            elif need > cfg.max_dedicated:
                skipped.append(
                    {
                        "tier": tier,
                        "n": n,
                        "reason": f"needs {need} dedicated databases; this run makes at "
                        f"most {cfg.max_dedicated} per layout (--max-dedicated), to stay within "
                        "a small machine's memory, disk and connections",
                    }
                )
            else:
                run.append((tier, n))
    return run, skipped


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    if args.sizes:
        cfg = replace(cfg, sizes=tuple(args.sizes))
    if args.max_dedicated is not None:
        cfg = replace(cfg, max_dedicated=args.max_dedicated)
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    phase = Phases()
    parts = set(args.only or PARTS)
    wanted, skipped = planned_layouts(cfg)
    if parts == {"noisy"}:
        wanted = []
    data: dict[str, Any] = {"benchmark": NAME, "seed": args.seed, "skipped": skipped}
    with bench_servers(args.pg_url) as urls, ExitStack() as stack:
        data["machine"] = machine_info(urls)
        # The command line may carry server passwords (--pg-url): never written out.
        data["machine"]["argv"] = [mask_url(a) if "://" in a else a for a in sys.argv[1:]]
        servers = Servers(urls, throwaway=not args.pg_url)
        stack.callback(servers.close)
        with phase("setup"):
            settings = load_settings(catalog_url="sqlite://", alembic_config=str(MIGRATIONS))
            templates = make_templates(servers, settings)
            layouts: list[Layout] = []
            total = sum(
                dedicated_count(t, n) + (2 if dedicated_count(t, n) < n else 0) for t, n in wanted
            )
            with progress() as bar:
                task = bar.add_task("setup: databases", total=total)
                for tier, n in wanted:
                    layout = build_layout(
                        servers, templates, cfg, tier, n, lambda: bar.advance(task)
                    )
                    stack.callback(layout.catalog.close)
                    layout.router = Router(catalog=layout.catalog)
                    stack.callback(layout.router.close)
                    layouts.append(layout)
            if "noisy" in parts:
                noisy = build_noisy(servers, templates, cfg)
                stack.callback(noisy.catalog.close)
                stack.callback(noisy.router.close)
        if "throughput" in parts:
            with phase("1. throughput"):
                data["throughput"] = measure_throughput(layouts, cfg, args.seed)
            for layout in layouts:
                data["throughput"][layout.key]["connections_held"] = held_connections(
                    servers, layout
                )
        for layout in layouts:  # their pooled connections would count in the footprint
            assert layout.router is not None
            layout.router.close()
        if "noisy" in parts:
            with phase("2. noisy neighbour"), servers_on_own_cores(servers) as pinning:
                data["noisy"] = measure_noisy(noisy, cfg, args.seed)
                data["noisy"]["cpu_pinning"] = pinning
            noisy.router.close()
        if "footprint" in parts:
            with phase("3. footprint"):
                data["footprint"] = measure_footprint(layouts, servers, cfg, args)
            for key, v in data.get("throughput", {}).items():
                data["footprint"][key]["connections_held"] = v["connections_held"]
        if "operations" in parts:
            with phase("4. onboarding"):
                data["onboarding"], ops = measure_onboarding(servers, templates, cfg, args.seed)
                stack.callback(ops.close)
            with phase("4. fleet migrations"):
                data["migrations"] = measure_migrations(layouts, cfg, args.seed)
            with phase("4. promote and demote"):
                data["moves"] = measure_moves(ops, servers, cfg)
        data["postgres_settings"] = server_settings(urls[0])
    data["config"] = {
        **asdict(cfg),
        "layouts": [f"{t}-{n}" for t, n in wanted],
        "mix": dict(zip(OPS, MIX, strict=True)),
        "pool_size_shared": settings.pool_size_shared,
        "pool_size_dedicated": settings.pool_size_dedicated,
        "max_overflow": settings.max_overflow,
        "routing_role": "NOSUPERUSER NOBYPASSRLS, one per run",
    }
    data["load_average_end"] = load_average()
    data["phases_s"] = phase.seconds
    data["headline"] = headline(data)
    return data


def server_settings(url: str) -> dict[str, str]:
    names = [
        "max_connections",
        "shared_buffers",
        "fsync",
        "synchronous_commit",
        "wal_level",
        "max_parallel_workers_per_gather",
    ]
    with psycopg.connect(conninfo(url)) as conn:
        rows = conn.execute(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings"
            " WHERE name = ANY(%s)",
            [names],
        ).fetchall()
    return {name: value for name, value in rows}


# -- main -------------------------------------------------------------------------------------


def print_summary(data: dict[str, Any]) -> None:
    console.rule("isolation tiers: headline ratios")
    for h in data["headline"]:
        console.print(f"{fmt_ratio(h['value']):>8}  {h['figure']}")
    for s in data["skipped"]:
        console.print(f"[yellow]skipped[/] {s['tier']} N={s['n']}: {s['reason']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Isolation tiers compared on one workload.")
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100, short windows")
    add_server_options(parser, default="start two throwaway ones")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="numbers of tenants (default 10 100 1000)"
    )
    parser.add_argument(
        "--max-dedicated", type=int, help="most dedicated databases per layout (default 100)"
    )
    parser.add_argument("--rounds", type=int, help="override the rounds of question 1")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, help="run only these questions (default: all)"
    )
    parser.add_argument("--footprint-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.footprint_child:
        return footprint_child(cfg, cfg.footprint_s)
    data = timed(run, args)
    args.out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(data, args.out)
    data["charts"] = [p.name for p in charts]
    markdown = render_markdown(data, charts)
    finish(NAME, data, markdown, args.out, print_summary, also=f"{len(charts)} charts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
