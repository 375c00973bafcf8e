"""tiers.py's questions 3-4: each layout's footprint (connections, a fresh router
process's RSS), and onboarding, fleet migrations and moves between tiers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    console,
    progress,
    summarize,
)
from _tiers_fleet import (
    CHILD_ID_BASE,
    PLACEMENTS,
    Config,
    Layout,
    Servers,
    Templates,
    conninfo,
    new_catalog,
    new_shard,
    seed,
)
from _tiers_load import (
    Workload,
    run_window,
    touch_all,
)
from sqlalchemy.engine import make_url

from tenantry import (
    Catalog,
    Router,
    TenantryError,
    Tier,
    load_settings,
    migrations,
    moves,
)
from tenantry.demo import MIGRATIONS

# -- question 3: footprint --------------------------------------------------------------------


def _proc_status() -> dict[str, int | None]:
    found: dict[str, int | None] = {"VmRSS": None, "VmHWM": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in found:
                found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def footprint_child(cfg: Config, seconds: float) -> int:
    """In a fresh process: a router over the layout in TENANTRY_CATALOG_URL; report RSS.

    Prints one JSON line, then waits for a line on stdin (while the parent counts this
    process's server connections) before closing the router.
    """
    before = _proc_status()["VmRSS"]
    router = Router(settings=load_settings())
    after_router = _proc_status()["VmRSS"]
    tenant_tier = {t.id: t.tier.value for t in router.snapshot.tenants.values()}
    touch_all(router, list(tenant_tier))
    after_touch = _proc_status()["VmRSS"]
    workload = Workload(router, cfg, tenant_tier, id_base=CHILD_ID_BASE)
    with ThreadPoolExecutor(cfg.threads) as executor:
        _samples, errors, wall, ops = run_window(executor, workload, cfg.threads, seconds, 7)
    status = _proc_status()
    stats = router.engine_stats()
    report = {
        "rss_start_bytes": before,
        "rss_router_bytes": after_router,
        "rss_touched_bytes": after_touch,
        "rss_bytes": status["VmRSS"],
        "rss_peak_bytes": status["VmHWM"],
        "engines": stats.engines,
        "pool_capacity": stats.capacity,
        "workload_ops": ops,
        "workload_ops_per_s": ops / wall,
        "errors": dict(errors),
    }
    print(json.dumps(report), flush=True)
    sys.stdin.readline()
    router.close()
    return 0


def connections_by_app(servers: Servers, app: str) -> dict[str, int]:
    """Backends of *app* (application_name) on each server, by database."""
    counts: Counter[str] = Counter()
    for url in dict.fromkeys(servers.admin):
        with psycopg.connect(conninfo(url)) as conn:
            for datname, count in conn.execute(
                "SELECT datname, count(*) FROM pg_stat_activity"
                " WHERE application_name = %s GROUP BY datname",
                [app],
            ):
                counts[datname] += count
    return dict(counts)


def held_connections(servers: Servers, layout: Layout) -> int:
    """Backends of the routing role on the layout's shard databases now."""
    names = [make_url(u).database for u in layout.databases]
    total = 0
    for url in dict.fromkeys(servers.admin):
        with psycopg.connect(conninfo(url)) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = ANY(%s)",
                [servers.role, names],
            ).fetchone()
        total += int(row[0]) if row else 0
    return total


def footprint_of(
    layout: Layout, servers: Servers, cfg: Config, args: argparse.Namespace
) -> dict[str, Any]:
    """Run a fresh router process over *layout*; its RSS and server connections."""
    app = f"tenantry-bench-{layout.key}"
    env = {
        **os.environ,
        "TENANTRY_CATALOG_URL": layout.catalog.url,
        "TENANTRY_MAX_ENGINES": str(cfg.max_engines),
        "TENANTRY_CONNECTION_BUDGET": str(cfg.connection_budget),
        "TENANTRY_POOL_SIZE_DEDICATED": str(layout.catalog.settings.pool_size_dedicated),
        "PGAPPNAME": app,  # libpq's application_name: tells its backends apart
    }
    script = Path(__file__).resolve().with_name("tiers.py")
    argv = [sys.executable, str(script), "--footprint-child"]
    if args.quick:
        argv.append("--quick")
    child = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"footprint process of {layout.key} died: {child.wait()}")
        report: dict[str, Any] = json.loads(line)
        held = connections_by_app(servers, app)
    finally:
        child.stdin.write("done\n")
        child.stdin.close()
        child.wait(timeout=60)
    catalog_db = make_url(layout.catalog.url).database
    shard_dbs = {make_url(u).database for u in layout.databases}
    report["connections"] = sum(c for d, c in held.items() if d in shard_dbs)
    report["catalog_connections"] = held.get(catalog_db or "", 0)
    report["rss_delta_bytes"] = report["rss_bytes"] - report["rss_start_bytes"]
    return {
        "tier": layout.tier,
        "n": layout.n,
        "databases": len(layout.databases),
        "process": report,
        "disk": layout.disk,
    }


def measure_footprint(
    layouts: Sequence[Layout], servers: Servers, cfg: Config, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    out = {}
    with ThreadPoolExecutor(2) as pool, progress() as bar:
        task = bar.add_task("3. footprint (a router process per layout)", total=len(layouts))
        # Two at a time: RSS and connections are per process, unaffected by the other.
        futures = {
            layout.key: pool.submit(footprint_of, layout, servers, cfg, args) for layout in layouts
        }
        for key, future in futures.items():
            out[key] = future.result()
            bar.advance(task)
    return out


# -- question 4: onboarding and operations ------------------------------------------------------


def seconds_summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, min, max and p95 of seconds, in milliseconds (keys ``median_ms``...)."""
    summary = summarize(values, stats=("n", "median", "min", "max", "p95"))
    return {k if k == "n" else f"{k}_ms": v if k == "n" else v * 1000 for k, v in summary.items()}


def measure_onboarding(
    servers: Servers, templates: Templates, cfg: Config, seed: int
) -> tuple[dict[str, Any], Catalog]:
    """add_tenant in the shared pool against provisioning a dedicated database."""
    rng = random.Random(seed)
    catalog = new_catalog(servers, "ops", cfg)
    for i in range(2):
        new_shard(servers, catalog, templates, i, f"ops-s{i}", Tier.SHARED)
    variants = {
        "shared: add_tenant": None,
        "dedicated: provision from template1 + migrate, add_tenant": {},
        "dedicated: provision from a migrated template, add_tenant": {
            "template": templates.names[0]
        },
    }
    total: dict[str, list[float]] = {v: [] for v in variants}
    provision_part: dict[str, list[float]] = {v: [] for v in variants}
    counter = itertools.count()
    samples = {
        v: cfg.add_tenant_samples if o is None else cfg.provision_samples
        for v, o in variants.items()
    }
    with progress() as bar:
        task = bar.add_task("4. onboarding", total=sum(samples.values()))
        plan = [v for v, k in samples.items() for _ in range(k)]
        rng.shuffle(plan)
        for variant in plan:
            i = next(counter)
            tenant = f"onboard-{i:03d}"
            options = variants[variant]
            started = time.perf_counter()
            if options is None:
                catalog.add_tenant(tenant)
            else:
                database = f"tb{servers.token}_onb{i:03d}"
                shard = migrations.provision(
                    catalog,
                    database,
                    servers.admin[0],
                    tier=Tier.DEDICATED,
                    routing_url=servers.routing[0],
                    alembic_config=MIGRATIONS,
                    **options,
                )
                servers.created.append(shard.operations_url)
                provision_part[variant].append(time.perf_counter() - started)
                catalog.add_tenant(tenant, tier=Tier.DEDICATED, shard=shard.name)
            total[variant].append(time.perf_counter() - started)
            bar.advance(task)
    out = {
        variant: {
            "total": seconds_summary(total[variant]),
            "provision": seconds_summary(provision_part[variant]),
            "samples_s": total[variant],
        }
        for variant in variants
    }
    return out, catalog


def measure_migrations(layouts: Sequence[Layout], cfg: Config, seed: int) -> list[dict[str, Any]]:
    """Each layout's fleet from base to head; downgraded (untimed) before each run."""
    rng = random.Random(seed)
    # dedicated-pool8 has the same databases as dedicated: nothing new to migrate.
    fleets = [layout for layout in layouts if layout.tier != "dedicated-pool8"]
    plan = [(layout, jobs) for layout in fleets for jobs in cfg.migrate_jobs]
    rng.shuffle(plan)
    rows = []
    with progress() as bar:
        task = bar.add_task("4. fleet migrations (base -> head)", total=len(plan))
        for layout, jobs in plan:
            down = migrations.downgrade(layout.catalog, "base", jobs=1, alembic_config=MIGRATIONS)
            if not down.ok:
                raise SystemExit(f"{layout.key}: downgrade failed: {down.failed[:2]}")
            started = time.perf_counter()
            run = migrations.upgrade(layout.catalog, "head", jobs=jobs, alembic_config=MIGRATIONS)
            seconds = time.perf_counter() - started
            if not run.ok:
                raise SystemExit(f"{layout.key}: upgrade failed: {run.failed[:2]}")
            rows.append(
                {
                    "layout": layout.key,
                    "tier": layout.tier,
                    "n": layout.n,
                    "databases": len(layout.databases),
                    "jobs": jobs,
                    "seconds": seconds,
                    "per_database_ms": seconds / len(layout.databases) * 1000,
                }
            )
            bar.advance(task)
    rows.sort(key=lambda r: (PLACEMENTS.index(r["tier"]), r["n"], r["jobs"]))
    return rows


def measure_moves(catalog: Catalog, servers: Servers, cfg: Config) -> list[dict[str, Any]]:
    """Promote a shared tenant to a new dedicated database on the other server, and
    demote it back, offline and online."""
    rows = []
    plan = list(cfg.moves)
    with progress() as bar:
        task = bar.add_task("4. promote and demote", total=len(plan) * 2)
        for size, mode in plan:
            label = f"{size // 1000}k" if size < 1_000_000 else f"{size // 1_000_000}m"
            tenant = f"move-{label}-{mode}"
            catalog.add_tenant(tenant, shard="ops-s0")
            users, chargers = max(1, size // 100), max(1, size // 1000)
            seed(
                catalog.get_shard("ops-s0").operations_url,
                [tenant],
                users,
                chargers,
                size - users - chargers,
            )
            row: dict[str, Any] = {"rows": size, "mode": mode, "tenant": tenant}
            database = f"tb{servers.token}_mv_{label}_{mode}"
            try:
                started = time.perf_counter()
                promoted = moves.promote(
                    catalog,
                    tenant,
                    server=servers.admin[1],
                    database=database,
                    routing_url=servers.routing[1],
                    alembic_config=MIGRATIONS,
                    mode=mode,
                )
                row["promote_s"] = time.perf_counter() - started
                servers.created.append(catalog.get_shard(database).operations_url)
                bar.advance(task)
                started = time.perf_counter()
                demoted = moves.demote(catalog, tenant, to="ops-s0", drop_source=True, mode=mode)
                row["demote_s"] = time.perf_counter() - started
                servers.forget(promoted.artifacts.get("provisioned", {}).get("url", database))
                bar.advance(task)
            except TenantryError as exc:
                row["skipped"] = f"{type(exc).__name__}: {exc}"
                console.print(f"[yellow]{tenant}: {row['skipped']}")
                bar.advance(task, 2 - ("promote_s" in row))
                rows.append(row)
                continue
            for name, move in (("promote", promoted), ("demote", demoted)):
                row[name] = {
                    "ok": move.succeeded,
                    "mode": move.mode.value,
                    "copy_s": move.stats.get("copy_seconds"),
                    "freeze_s": move.stats.get("freeze_seconds"),
                    "bytes": move.stats.get("bytes"),
                    "rows_copied": move.stats.get("rows"),
                }
            rows.append(row)
    return rows
