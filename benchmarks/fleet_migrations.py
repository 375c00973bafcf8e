"""How long a fleet migration takes, serial and parallel; how long provisioning takes.

    python benchmarks/fleet_migrations.py [--quick] [--databases N] [--jobs 1 4 8]
                                          [--rounds R] [--work-ms MS] [--pg-url URL ...]

Fleet: ``--databases`` (default 50) dedicated databases, alternating over two PostgreSQL
servers, registered in a SQLite catalog. Each round migrates all of them from base to
head with ``tenantry.migrations.upgrade(jobs=N)`` for every N in ``--jobs`` (in a fresh
random order each round, downgrading to base untimed between runs), then times a re-run
at head, where every database is checked and skipped (the fixed cost of a run: worker
processes, one connection, lock and version check per database).

Two schemas:

- ``demo``: the demo app's migrations (three tables with foreign keys, one index), the
  cheapest real migration there is: what dominates is per-database overhead;
- ``demo+work``: the same plus a revision that spends ``--work-ms`` (default 200) on the
  server (``pg_sleep``), standing in for an index build or a backfill: what dominates is
  the migration itself, the case parallel runs are for.

Provisioning: one dedicated database created, migrated to head and registered, median
of several, from ``template1`` (then migrated) and from a migrated template (copied;
nothing left to migrate), and created and registered without migrating.

Worker start-up: how long a pool of N processes takes to start and import tenantry's
fleet module, with spawn (what ``upgrade`` uses) and, for comparison, forkserver with
the module preloaded.

Without ``--pg-url`` two throwaway servers are started (tenantry.testing). Results go to
``benchmarks/results/fleet_migrations.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    add_server_options,
    console,
    finish,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    pg_servers,
    progress,
    timed,
)
from sqlalchemy.engine import make_url

from tenantry import Catalog, Shard, load_settings, migrations
from tenantry.demo import MIGRATIONS
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.testing import create_database, drop_database

NAME = "fleet_migrations"

WORK_REVISION = '''"""Server-side work standing in for an index build or a backfill.

Revision ID: w0003
Revises: d0002
"""

from alembic import op

revision = "w0003"
down_revision = "d0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT pg_sleep({seconds})")


def downgrade() -> None:
    pass
'''


def work_scripts(folder: Path, work_ms: int) -> Path:
    """The demo app's script directory plus one revision that works *work_ms* ms."""
    target = folder / "demo_work"
    (target / "versions").mkdir(parents=True)
    (target / "env.py").write_text((MIGRATIONS / "env.py").read_text())
    for script in (MIGRATIONS / "versions").glob("*.py"):
        (target / "versions" / script.name).write_text(script.read_text())
    (target / "versions" / "0003_work.py").write_text(
        WORK_REVISION.replace("{seconds}", f"{work_ms / 1000:.3f}")
    )
    return target


def build_fleet(servers: Sequence[str], count: int, folder: Path) -> tuple[Catalog, list[str]]:
    url = f"sqlite:///{folder / 'catalog.db'}"
    catalog = Catalog(url, settings=load_settings(catalog_url=url))
    catalog.init()
    databases = []
    with progress() as bar:
        task = bar.add_task(f"create {count} databases", total=count)
        for i in range(count):
            database = create_database(servers[i % len(servers)])
            databases.append(database)
            catalog.add_shard(f"tenant-{i:03d}", database, tier="dedicated")
            bar.advance(task)
    return catalog, databases


def timed_run(catalog: Catalog, scripts: Path, jobs: int, expect: str) -> float:
    started = time.perf_counter()
    run = migrations.upgrade(catalog, jobs=jobs, alembic_config=scripts)
    seconds = time.perf_counter() - started
    results = {r.result for r in run.results}
    if not run.ok or results != {expect}:
        failed = [(r.shard, r.result, r.error) for r in run.results if r.result != expect]
        raise SystemExit(f"jobs {jobs}: expected every database {expect}, got {failed[:3]}")
    return seconds


def fleet_benchmark(
    catalog: Catalog, scripts: Path, label: str, jobs_list: Sequence[int], rounds: int
) -> dict[str, Any]:
    upgrade: dict[int, list[float]] = {j: [] for j in jobs_list}
    rerun: dict[int, list[float]] = {j: [] for j in jobs_list}
    rng = random.Random(len(label))
    with progress() as bar:
        task = bar.add_task(f"{label}: base -> head", total=rounds * len(jobs_list))
        for _ in range(rounds):
            order = list(jobs_list)
            rng.shuffle(order)
            for jobs in order:
                migrations.downgrade(catalog, "base", jobs=1, alembic_config=scripts)
                upgrade[jobs].append(timed_run(catalog, scripts, jobs, "upgraded"))
                rerun[jobs].append(timed_run(catalog, scripts, jobs, "skipped"))
                bar.advance(task)
    count = len(catalog.list_shards())
    serial = statistics.median(upgrade[jobs_list[0]])
    rows = []
    for jobs in jobs_list:
        median = statistics.median(upgrade[jobs])
        rows.append(
            {
                "jobs": jobs,
                "seconds": round(median, 3),
                "min_s": round(min(upgrade[jobs]), 3),
                "max_s": round(max(upgrade[jobs]), 3),
                "speedup": round(serial / median, 2),
                "databases_per_s": round(count / median, 1),
                "rerun_at_head_s": round(statistics.median(rerun[jobs]), 3),
                "samples_s": [round(s, 3) for s in upgrade[jobs]],
            }
        )
    return {"schema": label, "databases": count, "rounds": rounds, "runs": rows}


def _touch(_: int) -> bool:
    import tenantry.migrations.fleet  # noqa: F401  (what every fleet worker imports)

    return True


def worker_startup(jobs_list: Sequence[int], rounds: int) -> dict[str, Any]:
    """Seconds to start a pool of N workers that import tenantry's fleet module.

    ``spawn`` is what ``upgrade(jobs=N)`` uses; ``forkserver`` with the module preloaded
    is measured for comparison (its server imports once per parent process, then forks).
    """
    spawn = multiprocessing.get_context("spawn")
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(["tenantry.migrations.fleet"])
    found: dict[str, dict[int, list[float]]] = {"spawn": {}, "forkserver+preload": {}}
    contexts = {"spawn": spawn, "forkserver+preload": forkserver}
    # the forkserver's own start (one import, once per parent process) is paid here
    with ProcessPoolExecutor(1, mp_context=forkserver) as pool:
        started = time.perf_counter()
        list(pool.map(_touch, range(1)))
        first = time.perf_counter() - started
    for _ in range(rounds):
        for name, context in contexts.items():
            for jobs in jobs_list:
                if jobs == 1:
                    continue
                started = time.perf_counter()
                with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                    assert all(pool.map(_touch, range(jobs * 2)))
                found[name].setdefault(jobs, []).append(time.perf_counter() - started)
    return {
        "forkserver_first_start_s": round(first, 3),
        "pools": [
            {"context": name, "workers": jobs, "seconds": round(statistics.median(ts), 3)}
            for name, by_jobs in found.items()
            for jobs, ts in by_jobs.items()
        ],
    }


def provision_benchmark(servers: Sequence[str], folder: Path, samples: int) -> dict[str, Any]:
    url = f"sqlite:///{folder / 'provision.db'}"
    catalog = Catalog(url, settings=load_settings(catalog_url=url, alembic_config=str(MIGRATIONS)))
    catalog.init()
    server = servers[0]
    template = create_database(server, f"bench_template_{secrets.token_hex(3)}")
    template_name = make_url(template).database
    migrated = migrate_shard(
        Shard("template", template), app_config(MIGRATIONS), settings=catalog.settings
    )
    assert migrated.result == "upgraded", migrated
    variants: dict[str, dict[str, Any]] = {
        "from template1, then migrated": {},
        "from a migrated template": {"template": template_name},
        "created and registered, not migrated": {"migrate": False},
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        with progress() as bar:
            task = bar.add_task("provision one database", total=samples * len(variants))
            for _ in range(samples):
                order = list(variants)
                random.shuffle(order)
                for variant in order:
                    name = f"bench-{secrets.token_hex(4)}"
                    started = time.perf_counter()
                    shard = migrations.provision(catalog, name, server, **variants[variant])
                    times[variant].append(time.perf_counter() - started)
                    if variants[variant].get("migrate", True):
                        status = migrations.status(catalog, shards=[name])
                        assert status.in_step, status
                    catalog.remove_shard(name)
                    drop_database(shard.url)
                    bar.advance(task)
    finally:
        drop_database(template)
        catalog.close()
    return {
        "samples": samples,
        "variants": [
            {
                "variant": variant,
                "median_ms": round(statistics.median(ts) * 1000, 1),
                "min_ms": round(min(ts) * 1000, 1),
                "max_ms": round(max(ts) * 1000, 1),
            }
            for variant, ts in times.items()
        ],
    }


def notes(data: dict[str, Any]) -> list[str]:
    """Sentences that say what the figures show (not what one hoped they would)."""
    found = []
    for fleet in data["fleet"]:
        serial, parallel = fleet["runs"][0], fleet["runs"][1:]
        if not parallel:
            continue
        best = max(parallel, key=lambda r: r["speedup"])
        if best["speedup"] < 1:
            found.append(
                f"`{fleet['schema']}`: no parallel run beat `--jobs {serial['jobs']}` "
                f"({serial['seconds']:.2f} s); the best, `--jobs {best['jobs']}`, ran at "
                f"{best['speedup']:.2f}x: starting workers cost more than running databases "
                "side by side saved."
            )
        else:
            found.append(
                f"`{fleet['schema']}`: `--jobs {best['jobs']}` was fastest, "
                f"{best['speedup']:.2f}x `--jobs {serial['jobs']}`."
            )
    return found


def render_markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Fleet migrations",
        "",
        f"{data['config']['databases']} dedicated databases on {data['config']['servers']} "
        "PostgreSQL servers, migrated from base to head by `tenantry.migrations.upgrade` "
        "(what `tenantry migrate upgrade --jobs N` runs). Median of "
        f"{data['config']['rounds']} round(s); speed-up against `--jobs "
        f"{data['config']['jobs'][0]}`. 're-run at head' is a second run that finds every "
        "database at head and skips it: the fixed cost of a run.",
        "",
    ]
    for fleet in data["fleet"]:
        lines += [f"## Schema `{fleet['schema']}`", ""]
        lines.append(
            markdown_table(
                ["jobs", "seconds", "min-max s", "speed-up", "databases/s", "re-run at head s"],
                [
                    [
                        r["jobs"],
                        f"{r['seconds']:.2f}",
                        f"{r['min_s']:.2f}-{r['max_s']:.2f}",
                        f"{r['speedup']:.2f}x",
                        f"{r['databases_per_s']:.1f}",
                        f"{r['rerun_at_head_s']:.2f}",
                    ]
                    for r in fleet["runs"]
                ],
            )
        )
        lines.append("")
    prov = data["provision"]
    lines += [
        "## Provisioning one dedicated database",
        "",
        f"`tenantry.migrations.provision` (what `tenantry shard create` runs): create, "
        f"migrate to head, register; median of {prov['samples']}.",
        "",
        markdown_table(
            ["variant", "median ms", "min ms", "max ms"],
            [
                [v["variant"], f"{v['median_ms']:.0f}", f"{v['min_ms']:.0f}", f"{v['max_ms']:.0f}"]
                for v in prov["variants"]
            ],
            align="lrrr",
        ),
        "",
        "## What a worker costs",
        "",
        "`--jobs N` > 1 runs a spawn `ProcessPoolExecutor` (Alembic keeps its state in "
        "module globals, so one migration per process at a time); every spawned worker "
        "imports tenantry, Alembic and SQLAlchemy before its first database. Median seconds "
        "to start a pool whose workers import `tenantry.migrations.fleet` (spawn, as "
        "`upgrade` does; forkserver with the module preloaded, for comparison: its server "
        f"started once in {data['workers']['forkserver_first_start_s']:.2f} s):",
        "",
        markdown_table(
            ["start method", "workers", "seconds"],
            [[p["context"], p["workers"], f"{p['seconds']:.2f}"] for p in data["workers"]["pools"]],
            align="lrr",
        ),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in notes(data)],
        "- `demo+work` adds `pg_sleep` on the server: it stands for work that does not use "
        "the client's CPU (an index build, a backfill on the server).",
        f"- Load average at the start {data['machine']['load_average']}, at the end "
        f"{data['load_average_end']}, on {data['machine']['cores_usable']} usable cores: "
        "other work shared the machine.",
        f"- The whole run took {data['duration_s']} s.",
        "",
        "## Machine",
        "",
        machine_markdown(data["machine"]),
    ]
    return "\n".join(lines)


def print_summary(data: dict[str, Any]) -> None:
    for fleet in data["fleet"]:
        for r in fleet["runs"]:
            console.print(
                f"{fleet['schema']:>10} jobs {r['jobs']}: {r['seconds']:.2f} s "
                f"({r['speedup']:.2f}x), re-run at head {r['rerun_at_head_s']:.2f} s"
            )
    for v in data["provision"]["variants"]:
        console.print(f"provision {v['variant']}: {v['median_ms']:.0f} ms")
    for p in data["workers"]["pools"]:
        console.print(f"pool start-up {p['context']} x{p['workers']}: {p['seconds']:.2f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fleet migration and provisioning times.")
    parser.add_argument("--quick", action="store_true", help="10 databases, 1 round, 3 samples")
    parser.add_argument("--databases", type=int, help="databases in the fleet (default 50)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8], help="default 1 4 8")
    parser.add_argument("--rounds", type=int, help="rounds per schema (default 3)")
    parser.add_argument("--samples", type=int, help="provisioning samples (default 7)")
    parser.add_argument("--work-ms", type=int, default=200, help="0 skips demo+work")
    add_server_options(parser, default="start two throwaway ones")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = args.databases or (10 if args.quick else 50)
    rounds = args.rounds or (1 if args.quick else 3)
    samples = args.samples or (3 if args.quick else 7)
    jobs_list = list(dict.fromkeys(args.jobs))
    data: dict[str, Any] = {
        "config": {
            "databases": count,
            "servers": 2,
            "jobs": jobs_list,
            "rounds": rounds,
            "provision_samples": samples,
            "work_ms": args.work_ms,
            "quick": args.quick,
        }
    }
    with pg_servers(args.pg_url, count=2) as servers, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data["machine"] = machine_info(servers)
        catalog, databases = build_fleet(servers, count, folder)
        try:
            schemas = [("demo", MIGRATIONS)]
            if args.work_ms > 0:
                schemas.append(("demo+work", work_scripts(folder, args.work_ms)))
            data["fleet"] = [
                fleet_benchmark(catalog, scripts, label, jobs_list, rounds)
                for label, scripts in schemas
            ]
        finally:
            catalog.close()
            for database in databases:
                drop_database(database)
        data["provision"] = provision_benchmark(servers, folder, samples)
    data["workers"] = worker_startup(jobs_list, rounds)
    data["load_average_end"] = load_average()
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = timed(run, args)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
