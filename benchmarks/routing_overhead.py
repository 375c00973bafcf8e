"""What routing costs: router.session(t) against hand-made sessions on the same engine.

    python benchmarks/routing_overhead.py [--quick] [--pg-url URL ...] [--out DIR]

The same transaction (one point select of a TenantScoped row by ``(tenant_id, id)``,
or five of them) runs through

- ``routed``:  ``router.session(t)`` (map lookup, engine lease, residency fence, ORM
  criteria);
- ``setting``: ``Session(engine)`` that first runs
  ``SELECT set_config('tenantry.tenant_id', :t, true)``, the usual row-level-security
  pattern;
- ``bare``:    ``Session(engine)`` with no setting;
- ``plain``:   ``bare`` on a second engine made with the same pool settings but
  without tenantry's engine events (for information; no target).

``routed``, ``setting`` and ``bare`` share ``router.engine_for(t)``, so their pools
are the same pool. Each transaction ends like a typical read (session closed,
so rolled back) or with a commit: psycopg forgets its prepared statements at every
ROLLBACK, so the two endings differ. Tenants (1000 on one shared shard) are drawn at
random for each transaction. Rounds interleave every variant and both thread counts
in a fresh random order, so machine noise (other test suites on the same machine)
hits all variants alike; the per-round ratios show the run's spread.

Also measured: the lookup alone; loading a 100,000-tenant map snapshot from a
PostgreSQL and a SQLite catalog, and its memory (tracemalloc); a map cache's refresh
after one tenant changed (from the catalog's change log); how long a new tenant takes
to reach a second router process by NOTIFY and by polling.

Without ``--pg-url`` a throwaway PostgreSQL server is started (tenantry.testing).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import os
import pstats
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    RESULTS_DIR,
    Phases,
    console,
    fmt_ns,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    percentile,
    pg_servers,
    progress,
    summarize,
    verdict,
    write_results,
)
from sqlalchemy import Engine, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, Shard, TenantScoped, load_settings
from tenantry.router.fence import PG_FENCE
from tenantry.settings import TenantrySettings
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.catalog import shard_admin
from tenantry.shardmap.connect import make_engine
from tenantry.shardmap.schema import residency, tenants
from tenantry.testing import create_database, drop_database

NAME = "routing_overhead"

# -- what is measured ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How much of everything to run."""

    mode: str
    tenants: int = 1000
    rows_per_tenant: int = 20
    rounds: int = 80
    # Transactions per thread per variant per round, by thread count: short batches
    # interleave the variants finely, so a burst of load elsewhere hits them all alike.
    batch: tuple[tuple[int, int], ...] = ((1, 10), (8, 3))
    warmup: int = 20  # transactions per thread per variant before the rounds
    blocks: int = 10  # groups of consecutive rounds: the spread is between blocks
    lookup_calls: int = 200_000
    lookup_repeats: int = 7
    driver_rounds: int = 60
    snapshot_tenants: int = 100_000
    snapshot_repeats: int = 5
    propagation_repeats: int = 10
    poll_interval: float = 0.5

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(n for n, _size in self.batch)


FULL = Config(mode="full")
QUICK = Config(
    mode="quick",
    rounds=12,
    batch=((1, 5), (8, 2)),
    warmup=5,
    blocks=4,
    lookup_calls=50_000,
    lookup_repeats=3,
    driver_rounds=15,
    snapshot_tenants=20_000,
    snapshot_repeats=1,
    propagation_repeats=3,
)

ROUTES = ("routed", "setting", "bare", "plain")
ROUTE_LABELS = {
    "routed": "router.session(t)",
    "setting": "Session + set_config",
    "bare": "bare Session",
    "plain": "bare Session, plain engine",
}
STATEMENTS = (1, 5)
ENDINGS = ("rollback", "commit")

# Targets from DESIGN.md ("hot-path facts") and issue 3.
TARGET_VS_SETTING = 1.05
TARGET_VS_BARE = {1: 1.25, 5: 1.10}
TARGET_LOOKUP_NS = 5_000.0


@dataclass(frozen=True, order=True)
class Variant:
    route: str
    statements: int
    ending: str

    @property
    def key(self) -> str:
        return f"{self.route}/{self.statements}/{self.ending}"


VARIANTS = [Variant(r, s, e) for s in STATEMENTS for e in ENDINGS for r in ROUTES]


class Base(DeclarativeBase):
    pass


class Reading(TenantScoped, Base):
    """A charger's meter reading: the tenant table the point selects read."""

    __tablename__ = "bench_readings"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    charger: Mapped[str] = mapped_column(String(40))
    kwh: Mapped[float]


SET_TENANT = text("SELECT set_config('tenantry.tenant_id', :t, true)")


def point(tenant: str, row: int) -> sa.Select[tuple[Reading]]:
    return select(Reading).where(Reading.tenant_id == tenant, Reading.id == row)


# -- the fleet ------------------------------------------------------------------------


@dataclass
class Fleet:
    catalog: Catalog
    router: Router
    shard: Shard
    tenants: list[str]
    plain: Engine  # same pool settings as the router's engine, no tenantry events
    settings: TenantrySettings

    @property
    def engine(self) -> Engine:
        """The router's own engine of the shard (the hand-made sessions' bind)."""
        return self.router.engine_for(self.tenants[0])


def register_tenants(catalog: Catalog, shard: Shard, ids: Sequence[str], *, fence: bool) -> None:
    """Add many tenants at once (``add_tenant`` opens a connection to the shard for each
    one, which takes minutes for 100,000): residency rows first, then the catalog rows,
    in the order add_tenant uses."""
    now = datetime.now(UTC)
    version = catalog.map_version() + 1
    if fence:
        with shard_admin(shard) as conn:
            conn.execute(
                residency.insert(),
                [
                    {"tenant_id": t, "state": "active", "map_version": version, "updated_at": now}
                    for t in ids
                ],
            )
    with catalog.transaction() as (conn, _version):
        conn.execute(
            tenants.insert(),
            [
                {
                    "id": t,
                    "shard": shard.name,
                    "tier": shard.tier.value,
                    "pinned": False,
                    "state": "active",
                    "created_at": now,
                }
                for t in ids
            ],
        )


def build_fleet(catalog_server: str, shard_server: str, cfg: Config, stack: ExitStack) -> Fleet:
    catalog_url = create_database(catalog_server)
    stack.callback(drop_database, catalog_url)
    shard_url = create_database(shard_server)
    stack.callback(drop_database, shard_url)
    settings = load_settings(catalog_url=catalog_url)
    catalog = stack.enter_context(Catalog(catalog_url, settings=settings))
    catalog.init()
    shard = catalog.add_shard("bench-shared", shard_url)

    admin = make_engine(shard.url, poolclass=NullPool)
    try:
        Base.metadata.create_all(admin)
        ids = [f"t{i:05d}" for i in range(cfg.tenants)]
        with admin.begin() as conn:
            conn.execute(
                sa.insert(Reading),
                [
                    {"tenant_id": t, "id": n, "charger": f"charger-{n % 7}", "kwh": n * 1.5}
                    for t in ids
                    for n in range(1, cfg.rows_per_tenant + 1)
                ],
            )
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE bench_readings")
    finally:
        admin.dispose()
    register_tenants(catalog, shard, ids, fence=True)

    router = Router(catalog=catalog, settings=settings)
    stack.callback(router.close)
    # The same arguments as EngineRegistry._new_engine for a shared shard.
    plain = make_engine(
        shard.url,
        connect_timeout=settings.connect_timeout,
        pool_size=settings.pool_size_shared,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
    )
    stack.callback(plain.dispose)
    return Fleet(catalog, router, shard, ids, plain, settings)


# -- one transaction of each variant ------------------------------------------------

Work = list[tuple[str, list[int]]]
TxFn = Callable[[str, list[int], bool], None]


def transactions(fleet: Fleet) -> dict[str, TxFn]:
    """One function per route: run one transaction for a tenant over some row ids."""
    router = fleet.router
    engine = fleet.engine
    plain = fleet.plain
    assert router.engine_for(fleet.tenants[-1]) is engine

    def routed(tenant: str, rows: list[int], commit: bool) -> None:
        with router.session(tenant) as session:
            for row in rows:
                session.execute(point(tenant, row)).scalar_one()
            if commit:
                session.commit()

    def setting(tenant: str, rows: list[int], commit: bool) -> None:
        with Session(engine) as session:
            session.execute(SET_TENANT, {"t": tenant})
            for row in rows:
                session.execute(point(tenant, row)).scalar_one()
            if commit:
                session.commit()

    def bare_on(bind: Engine) -> TxFn:
        def bare(tenant: str, rows: list[int], commit: bool) -> None:
            with Session(bind) as session:
                for row in rows:
                    session.execute(point(tenant, row)).scalar_one()
                if commit:
                    session.commit()

        return bare

    return {"routed": routed, "setting": setting, "bare": bare_on(engine), "plain": bare_on(plain)}


def make_work(rng: random.Random, fleet: Fleet, cfg: Config, count: int, statements: int) -> Work:
    rows = range(1, cfg.rows_per_tenant + 1)
    return [(rng.choice(fleet.tenants), rng.sample(rows, statements)) for _ in range(count)]


def run_batch(fn: TxFn, work: Work, commit: bool) -> tuple[list[int], int]:
    """Run the transactions one after another; their latencies and this thread's CPU."""
    clock = time.perf_counter_ns
    latencies = []
    cpu = time.thread_time_ns()
    for tenant, rows in work:
        start = clock()
        fn(tenant, rows, commit)
        latencies.append(clock() - start)
    return latencies, time.thread_time_ns() - cpu


@dataclass
class Samples:
    """One variant at one thread count: latencies (ns) and client CPU per round."""

    rounds: list[list[int]] = field(default_factory=list)
    cpu_per_tx: list[float] = field(default_factory=list)  # ns, one per round

    @property
    def latencies(self) -> list[int]:
        return [x for r in self.rounds for x in r]

    def blocks(self, count: int) -> list[list[int]]:
        """The latencies in *count* groups of consecutive rounds."""
        size = max(1, len(self.rounds) // count)
        groups = [self.rounds[i : i + size] for i in range(0, len(self.rounds), size)]
        if len(groups) > count:  # fold a short tail into the last block
            groups[-2] += groups.pop()
        return [[x for r in g for x in r] for g in groups]


def run_rounds(fleet: Fleet, cfg: Config, seed: int) -> dict[int, dict[Variant, Samples]]:
    """Every variant at every thread count, round after round, in a fresh random order."""
    fns = transactions(fleet)
    rng = random.Random(seed)
    sizes = dict(cfg.batch)
    results: dict[int, dict[Variant, Samples]] = {n: defaultdict(Samples) for n in cfg.threads}
    with ExitStack() as stack:
        pools = {n: stack.enter_context(ThreadPoolExecutor(n)) for n in cfg.threads}

        def batch(n: int, variant: Variant, size: int) -> list[tuple[list[int], int]]:
            fn = fns[variant.route]
            commit = variant.ending == "commit"
            works = [make_work(rng, fleet, cfg, size, variant.statements) for _ in range(n)]
            futures = [pools[n].submit(run_batch, fn, work, commit) for work in works]
            return [f.result() for f in futures]

        steps = len(cfg.threads) * len(VARIANTS) * (cfg.rounds + 1)
        with progress() as bar:
            task = bar.add_task("transactions", total=steps)
            for n in cfg.threads:
                for variant in VARIANTS:
                    batch(n, variant, cfg.warmup)
                    bar.advance(task)
            for _round in range(cfg.rounds):
                plan = [(n, v) for n in cfg.threads for v in VARIANTS]
                rng.shuffle(plan)
                gc.collect()
                for n, variant in plan:
                    out = batch(n, variant, sizes[n])
                    merged = [x for latencies, _cpu in out for x in latencies]
                    samples = results[n][variant]
                    samples.rounds.append(merged)
                    samples.cpu_per_tx.append(sum(cpu for _l, cpu in out) / len(merged))
                    bar.advance(task)
    return results


# -- the lookup -----------------------------------------------------------------------


def measure_lookup(fleet: Fleet, cfg: Config, seed: int) -> dict[str, dict[str, float]]:
    """Mean ns per call of the lookups a routed transaction makes, over random tenants."""
    rng = random.Random(seed)
    ids = [rng.choice(fleet.tenants) for _ in range(cfg.lookup_calls)]
    router = fleet.router
    snapshot = router.snapshot

    def noop(_tenant: str) -> None:
        return None

    def dict_lookup(tenant: str) -> Shard:
        return snapshot.shards[snapshot.tenants[tenant].shard]

    probes: dict[str, Callable[[str], object]] = {
        "python call (baseline)": noop,
        "snapshot dict lookup": dict_lookup,
        "router.shard_for(t)": router.shard_for,
        "router.engine_for(t)": router.engine_for,
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in probes.items():
        per_call = []
        for _ in range(cfg.lookup_repeats):
            start = time.perf_counter_ns()
            for tenant in ids:
                fn(tenant)
            per_call.append((time.perf_counter_ns() - start) / len(ids))
        out[name] = {
            "median_ns": statistics.median(per_call),
            "min_ns": min(per_call),
            "max_ns": max(per_call),
            "calls": len(ids),
            "repeats": cfg.lookup_repeats,
        }
    return out


# -- the snapshot -----------------------------------------------------------------------


def measure_snapshot(catalog: Catalog, repeats: int) -> dict[str, Any]:
    """Time ``catalog.snapshot()``, then the memory one snapshot holds and peaks at."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter_ns()
        snapshot = catalog.snapshot()
        times.append(time.perf_counter_ns() - start)
        del snapshot
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        snapshot = catalog.snapshot()
        held, peak = tracemalloc.get_traced_memory()
        count = len(snapshot.tenants)
        del snapshot
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {
        "tenants": count,
        "load_ns": summarize(times),
        "load_ns_all": times,
        "refresh_ns": measure_refresh(catalog, repeats * 4),
        "memory_bytes": held - after,
        "peak_bytes": peak - base,
        "bytes_per_tenant": (held - after) / count,
    }


def measure_refresh(catalog: Catalog, repeats: int) -> dict[str, float]:
    """Time a map cache's refresh after one tenant changed (it reads the change log and
    that tenant, not the whole map)."""
    cache = MapCache(catalog, background=False)
    try:
        tenant = next(iter(cache.snapshot.tenants))
        times = []
        for i in range(repeats):
            catalog.set_pinned(tenant, i % 2 == 0)
            start = time.perf_counter_ns()
            fresh = cache.refresh()
            times.append(time.perf_counter_ns() - start)
            assert fresh.tenant(tenant).pinned == (i % 2 == 0)
    finally:
        cache.close()
    return summarize(times)


@contextmanager
def big_catalog(url: str, shard: Shard, count: int) -> Iterator[Catalog]:
    """A catalog at *url* holding *count* tenants on one shard (no residency rows)."""
    with Catalog(url, settings=load_settings(catalog_url=url)) as catalog:
        catalog.init()
        big = catalog.add_shard("bench-big", shard.url, prepare=False)
        ids = [f"big{i:06d}" for i in range(count)]
        for start in range(0, count, 20_000):
            register_tenants(catalog, big, ids[start : start + 20_000], fence=False)
        yield catalog


# -- propagation to a second process ------------------------------------------------


def propagation_child(mode: str) -> int:
    """The second router process: report when each tenant named on stdin is routable.

    The catalog URL and poll interval come from TENANTRY_* variables (the settings).
    Only the snapshot is watched: ``has_tenant`` would refresh by itself on a miss.
    """
    router = Router(listen=mode == "notify")
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            tenant = line.strip()
            if not tenant:
                break
            print("watching", flush=True)
            deadline = time.monotonic() + 30
            while tenant not in router.snapshot.tenants:
                if time.monotonic() > deadline:
                    print("timeout", flush=True)
                    break
                time.sleep(0.0005)
            else:
                # CLOCK_MONOTONIC is system-wide on Linux: comparable with the parent's.
                print(time.monotonic_ns(), flush=True)
    finally:
        router.close()
    return 0


def measure_propagation(
    catalog: Catalog, shard: str, mode: str, interval: float, repeats: int, rng: random.Random
) -> dict[str, Any]:
    """Add tenants in this process; time until a Router in another process routes them."""
    env = {
        **os.environ,
        "TENANTRY_CATALOG_URL": catalog.url,
        # With NOTIFY the poll is only the fallback: keep it out of the way.
        "TENANTRY_POLL_INTERVAL": str(interval if mode == "poll" else 60.0),
    }
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None

    def expect(word: str) -> None:
        line = child.stdout.readline().strip()  # type: ignore[union-attr]
        if line != word:
            child.kill()
            raise RuntimeError(f"propagation child said {line!r}, expected {word!r}")

    latencies: list[float] = []
    writes: list[float] = []
    missed = 0
    try:
        expect("ready")
        for i in range(repeats):
            tenant = f"prop-{mode}-{i}-{secrets.token_hex(3)}"
            child.stdin.write(tenant + "\n")
            child.stdin.flush()
            expect("watching")
            # A random phase against the child's poll timer (and its LISTEN wake-ups).
            time.sleep(rng.uniform(0, interval) if mode == "poll" else rng.uniform(0.02, 0.2))
            start = time.monotonic_ns()
            catalog.add_tenant(tenant, shard=shard)
            committed = time.monotonic_ns()
            line = child.stdout.readline().strip()
            if line == "timeout":
                missed += 1
                continue
            latencies.append(max(0, int(line) - committed))
            writes.append(committed - start)
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return {
        "mode": mode,
        "poll_interval_s": interval if mode == "poll" else None,
        "tenants_in_map": len(catalog.snapshot().tenants),
        "latency_ns": summarize(latencies),
        "latency_ns_all": latencies,
        "add_tenant_ns": summarize(writes),
        "missed": missed,
    }


# -- the same at the driver level ---------------------------------------------------

DRIVER_FIRST = {
    "none": None,
    "set_config": "SELECT set_config('tenantry.tenant_id', %(t)s, true)",
    "fence": PG_FENCE,
}
DRIVER_SELECT = (
    "SELECT tenant_id, id, charger, kwh FROM bench_readings WHERE tenant_id = %(t)s AND id = %(i)s"
)


def measure_driver(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    """Raw psycopg on the shard, no SQLAlchemy: BEGIN, a first statement (none, the
    tenant setting, or the router's fence), one point select, ROLLBACK. What each first
    statement costs the server and the wire, without any Python above the driver."""
    rng = random.Random(seed)
    record = fleet.plain.raw_connection()
    try:
        conn: Any = record.driver_connection
        rows = range(1, cfg.rows_per_tenant + 1)

        def once(first: str | None, tenant: str) -> int:
            start = time.perf_counter_ns()
            if first is not None:
                conn.execute(first, {"t": tenant}).fetchone()
            conn.execute(DRIVER_SELECT, {"t": tenant, "i": rng.choice(rows)}).fetchone()
            conn.rollback()
            return time.perf_counter_ns() - start

        samples: dict[str, list[int]] = {name: [] for name in DRIVER_FIRST}
        for _ in range(cfg.driver_rounds):
            order = list(DRIVER_FIRST)
            rng.shuffle(order)
            for name in order:
                first = DRIVER_FIRST[name]
                samples[name] += [once(first, rng.choice(fleet.tenants)) for _ in range(10)]
    finally:
        record.close()
    out: dict[str, Any] = {name: summarize(v, scale=1_000) for name, v in samples.items()}
    none = out["none"]["p50"]
    for name in DRIVER_FIRST:
        out[name]["added_p50_us"] = out[name]["p50"] - none
    return out


# -- profile (optional) -----------------------------------------------------------------


def profile_paths(fleet: Fleet, cfg: Config, seed: int, count: int = 3000) -> dict[str, str]:
    """cProfile of the routed and the hand-made-with-setting path (1 select, rollback)."""
    fns = transactions(fleet)
    out = {}
    for route in ("routed", "setting"):
        work = make_work(random.Random(seed), fleet, cfg, count, 1)
        run_batch(fns[route], work[:200], False)
        profiler = cProfile.Profile()
        profiler.enable()
        run_batch(fns[route], work, False)
        profiler.disable()
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        out[route] = buffer.getvalue()
    return out


# -- analysis -----------------------------------------------------------------------------


def ratio_rows(results: dict[int, dict[Variant, Samples]], blocks: int) -> list[dict[str, Any]]:
    """routed/setting and routed/bare (and routed/plain) for every cell, with spread."""
    rows = []
    for n, by_variant in results.items():
        for statements in STATEMENTS:
            for ending in ENDINGS:
                cell = {r: by_variant[Variant(r, statements, ending)] for r in ROUTES}
                routed = cell["routed"]
                routed_all = routed.latencies
                routed_blocks = routed.blocks(blocks)
                row: dict[str, Any] = {"threads": n, "statements": statements, "ending": ending}
                for base in ("setting", "bare", "plain"):
                    other = cell[base]
                    other_all = other.latencies
                    per_block = [
                        percentile(a, 50) / percentile(b, 50)
                        for a, b in zip(routed_blocks, other.blocks(blocks), strict=True)
                    ]
                    row[base] = {
                        "p50": percentile(routed_all, 50) / percentile(other_all, 50),
                        "p99": percentile(routed_all, 99) / percentile(other_all, 99),
                        # CPU: the cheapest round of each, the least disturbed by others.
                        "client_cpu_min": min(routed.cpu_per_tx) / min(other.cpu_per_tx),
                        "blocks_p50": {
                            "median": statistics.median(per_block),
                            "min": min(per_block),
                            "max": max(per_block),
                            "all": per_block,
                        },
                    }
                row["verdicts"] = {
                    "setting_p50": verdict(row["setting"]["p50"], TARGET_VS_SETTING),
                    "bare_p50": verdict(row["bare"]["p50"], TARGET_VS_BARE[statements]),
                }
                rows.append(row)
    return rows


def latency_rows(results: dict[int, dict[Variant, Samples]]) -> list[dict[str, Any]]:
    rows = []
    for n, by_variant in results.items():
        for variant in VARIANTS:
            samples = by_variant[variant]
            cpu = sorted(samples.cpu_per_tx)
            rows.append(
                {
                    "threads": n,
                    "route": variant.route,
                    "statements": variant.statements,
                    "ending": variant.ending,
                    "us": summarize(samples.latencies, scale=1_000),
                    "round_p50_us": [percentile(r, 50) / 1_000 for r in samples.rounds],
                    "round_max_us": [max(r) / 1_000 for r in samples.rounds],
                    # The benchmark process's CPU (all threads) per transaction: the
                    # Python side's cost, without network and server time.
                    "client_cpu_us": {
                        "min": cpu[0] / 1_000,
                        "p25": percentile(cpu, 25) / 1_000,
                        "median": percentile(cpu, 50) / 1_000,
                    },
                }
            )
    return rows


# -- report ---------------------------------------------------------------------------


def _x(value: float) -> str:
    return f"{value:.3f}"


def _spread(d: dict[str, Any]) -> str:
    return f"{d['min']:.2f}-{d['max']:.2f}"


def _cell(r: dict[str, Any]) -> str:
    selects = "1 select" if r["statements"] == 1 else f"{r['statements']} selects"
    return f"{r['threads']} thr, {selects}, {r['ending']}"


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target, cell by cell: value, target, PASS or MISS, and the blocks' spread."""
    out = []
    for base, target_of in (
        ("setting", lambda _r: TARGET_VS_SETTING),
        ("bare", lambda r: TARGET_VS_BARE[r["statements"]]),
    ):
        for r in data["ratios"]:
            target = target_of(r)
            out.append(
                {
                    "figure": f"routed / {base} p50 ({_cell(r)})",
                    "value": _x(r[base]["p50"]),
                    "target": f"<= {target}",
                    "verdict": verdict(r[base]["p50"], target),
                    "spread": _spread(r[base]["blocks_p50"]),
                }
            )
    lookup = data["lookup"]["router.shard_for(t)"]["median_ns"]
    out.append(
        {
            "figure": "lookup alone, router.shard_for(t)",
            "value": fmt_ns(lookup),
            "target": f"<= {fmt_ns(TARGET_LOOKUP_NS)}",
            "verdict": verdict(lookup, TARGET_LOOKUP_NS),
            "spread": "",
        }
    )
    return out


def render_markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    machine = data["machine"]
    batches = ", ".join(
        f"{size} transactions per variant{' per thread' if n > 1 else ''} at {n} "
        f"thread{'s' if n > 1 else ''}"
        for n, size in cfg["batch"]
    )
    misses = sum(t["verdict"] == "MISS" for t in data["targets"])
    lines = [
        "# Routing overhead",
        "",
        f"`python benchmarks/routing_overhead.py {' '.join(machine['argv'])}`".replace(" `", "`")
        + f" — {machine['when']}, {cfg['mode']} run of {data['duration_s']} s on "
        f"{machine['cores']} cores. {cfg['rounds']} rounds; each round runs every variant at "
        f"every thread count in a fresh random order ({batches}); "
        f"{cfg['tenants']} tenants on one shared shard, one drawn at random per transaction. "
        f"Load average {machine['load_average']} at the start, {data['load_average_end']} at "
        "the end: other work shared the machine, so read the spread between blocks "
        f"({cfg['blocks']} blocks of consecutive rounds) next to each ratio.",
        "",
        f"**{len(data['targets']) - misses} of {len(data['targets'])} targets met; "
        f"{misses} missed.**",
        "",
        "## Targets",
        "",
        markdown_table(
            ["figure", "value", "target", "verdict", "blocks min-max"],
            [
                [t["figure"], t["value"], t["target"], f"**{t['verdict']}**", t["spread"]]
                for t in data["targets"]
            ],
            align="lrrcr",
        ),
        "",
        "## Ratios (routed / baseline)",
        "",
        "p50 and p99 over every transaction of the run; *blocks* is the min-max of the p50 "
        "ratio over blocks of consecutive rounds; *CPU* is the ratio of the benchmark "
        "process's CPU time per transaction in each variant's least disturbed round.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "/setting p50",
                "p99",
                "blocks",
                "CPU",
                "/bare p50",
                "p99",
                "blocks",
                "CPU",
                "/plain p50",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    _x(r["setting"]["p50"]),
                    _x(r["setting"]["p99"]),
                    _spread(r["setting"]["blocks_p50"]),
                    f"{r['setting']['client_cpu_min']:.2f}",
                    _x(r["bare"]["p50"]),
                    _x(r["bare"]["p99"]),
                    _spread(r["bare"]["blocks_p50"]),
                    f"{r['bare']['client_cpu_min']:.2f}",
                    _x(r["plain"]["p50"]),
                ]
                for r in data["ratios"]
            ],
            align="rrl" + "r" * 9,
        ),
        "",
        "## Latency per transaction (µs)",
        "",
        "*CPU* is the benchmark process's CPU time per transaction (all threads; min and "
        "median over rounds): the Python side's cost plus the kernel's for the socket.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "route",
                "n",
                "p50",
                "p90",
                "p99",
                "CPU min",
                "median",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    ROUTE_LABELS[r["route"]],
                    r["us"]["n"],
                    f"{r['us']['p50']:.0f}",
                    f"{r['us']['p90']:.0f}",
                    f"{r['us']['p99']:.0f}",
                    f"{r['client_cpu_us']['min']:.0f}",
                    f"{r['client_cpu_us']['median']:.0f}",
                ]
                for r in data["latency"]
            ],
            align="rrllrrrrrr",
        ),
        "",
        "## The first statement at the driver level (µs)",
        "",
        "Raw psycopg on the same shard, no SQLAlchemy: BEGIN, the first statement, one point "
        "select, ROLLBACK (one thread, interleaved).",
        "",
        markdown_table(
            ["first statement", "n", "p50", "p99", "added to p50"],
            [
                [
                    name,
                    d["n"],
                    f"{d['p50']:.0f}",
                    f"{d['p99']:.0f}",
                    f"{d['added_p50_us']:+.0f}",
                ]
                for name, d in data["driver"].items()
            ],
        ),
        "",
        "## Lookup alone",
        "",
        f"Mean per call over {cfg['lookup_calls']:,} random tenants; median of "
        f"{cfg['lookup_repeats']} repeats (min-max).",
        "",
        markdown_table(
            ["call", "median", "min-max"],
            [
                [name, fmt_ns(v["median_ns"]), f"{fmt_ns(v['min_ns'])}-{fmt_ns(v['max_ns'])}"]
                for name, v in data["lookup"].items()
            ],
        ),
        "",
        f"## Map snapshot of {cfg['snapshot_tenants']:,} tenants",
        "",
        "`catalog.snapshot()` timed without tracemalloc; memory from one more call under "
        "tracemalloc (*held*: what the snapshot keeps alive; *peak*: while it loads). "
        "*Refresh after one change*: a `MapCache` refreshing after one tenant was pinned "
        "or unpinned (median; it reads the catalog's change log, the shards and that "
        "tenant, and applies them to its snapshot).",
        "",
        markdown_table(
            [
                "catalog",
                "load median",
                "min-max",
                "refresh after one change",
                "held",
                "per tenant",
                "peak",
            ],
            [
                [
                    backend,
                    fmt_ns(s["load_ns"]["p50"]),
                    f"{fmt_ns(s['load_ns']['min'])}-{fmt_ns(s['load_ns']['max'])}",
                    fmt_ns(s["refresh_ns"]["p50"]) if "refresh_ns" in s else "",
                    f"{s['memory_bytes'] / 2**20:.1f} MiB",
                    f"{s['bytes_per_tenant']:.0f} B",
                    f"{s['peak_bytes'] / 2**20:.1f} MiB",
                ]
                for backend, s in data["snapshot"].items()
            ],
        ),
        "",
        "## A new tenant reaching a second router process",
        "",
        "`catalog.add_tenant()` here; a `Router` in a subprocess watches its snapshot. "
        "Latency from add_tenant's return (the commit) until the other process has the "
        "tenant in its map (CLOCK_MONOTONIC on both sides).",
        "",
        markdown_table(
            ["how", "tenants in map", "n", "median", "max", "missed", "add_tenant itself"],
            [
                [
                    p["label"],
                    f"{p['tenants_in_map']:,}",
                    p["latency_ns"].get("n", 0),
                    fmt_ns(p["latency_ns"].get("p50", math.nan)),
                    fmt_ns(p["latency_ns"].get("max", math.nan)),
                    p["missed"],
                    fmt_ns(p["add_tenant_ns"].get("p50", math.nan)),
                ]
                for p in data["propagation"]
            ],
        ),
        "",
        "## Machine",
        "",
        machine_markdown(machine),
        "",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in data["phases_s"].items()) + ".",
        "",
        "Method: `benchmarks/README.md`. Every figure unrounded, with each round's p50, is "
        "in `routing_overhead.json`.",
    ]
    return "\n".join(lines)


def print_summary(data: dict[str, Any]) -> None:
    console.rule("routing overhead: targets")
    for t in data["targets"]:
        colour = "green" if t["verdict"] == "PASS" else "red"
        spread = f"  blocks {t['spread']}" if t["spread"] else ""
        console.print(
            f"[{colour}]{t['verdict']}[/]  {t['value']:>8} {t['target']:<9} {t['figure']:<52}"
            f"{spread}"
        )
    console.rule("other figures")
    for r in data["ratios"]:
        console.print(
            f"{_cell(r):<32} p99 ratios: /setting {_x(r['setting']['p99'])}, "
            f"/bare {_x(r['bare']['p99'])}"
        )
    driver = data["driver"]
    console.print(
        "driver level, added to a 1-select transaction (p50): "
        + ", ".join(f"{name} {d['added_p50_us']:+.0f} µs" for name, d in driver.items())
    )
    for backend, s in data["snapshot"].items():
        console.print(
            f"snapshot of {s['tenants']:,} tenants ({backend}): {fmt_ns(s['load_ns']['p50'])}, "
            f"refresh after one change {fmt_ns(s['refresh_ns']['p50'])}, "
            f"{s['memory_bytes'] / 2**20:.1f} MiB held, {s['peak_bytes'] / 2**20:.1f} MiB peak"
        )
    for p in data["propagation"]:
        lat = p["latency_ns"]
        console.print(
            f"propagation, {p['label']}: median {fmt_ns(lat.get('p50', math.nan))}, "
            f"max {fmt_ns(lat.get('max', math.nan))} (n={lat.get('n', 0)}, "
            f"missed {p['missed']})"
        )


# -- main -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    rng = random.Random(args.seed)
    phase = Phases()
    snapshot: dict[str, Any] = {}
    propagation: list[dict[str, Any]] = []
    profile = None
    with pg_servers(args.pg_url, count=2) as urls, ExitStack() as stack:
        info = machine_info(urls[:1])
        with phase("setup"):
            fleet = build_fleet(urls[0], urls[1], cfg, stack)
        with phase("lookup"):
            lookup = measure_lookup(fleet, cfg, args.seed)
        with phase("driver"):
            driver = measure_driver(fleet, cfg, args.seed)
        with phase("transactions"):
            results = run_rounds(fleet, cfg, args.seed)
        if args.profile:
            with phase("profile"):
                profile = profile_paths(fleet, cfg, args.seed)
        with phase("propagation"):
            for mode in ("notify", "poll"):
                p = measure_propagation(
                    fleet.catalog,
                    fleet.shard.name,
                    mode,
                    cfg.poll_interval,
                    cfg.propagation_repeats,
                    rng,
                )
                p["label"] = (
                    "NOTIFY" if mode == "notify" else f"polling every {cfg.poll_interval} s"
                )
                propagation.append(p)
        with phase("snapshot, PostgreSQL"):
            big_url = create_database(urls[0])
            stack.callback(drop_database, big_url)
            with big_catalog(big_url, fleet.shard, cfg.snapshot_tenants) as catalog:
                snapshot["postgresql"] = measure_snapshot(catalog, cfg.snapshot_repeats)
                # A change reaches a router with a big map too (it reads only the change).
                p = measure_propagation(
                    catalog,
                    "bench-big",
                    "notify",
                    cfg.poll_interval,
                    max(2, cfg.propagation_repeats // 2),
                    rng,
                )
                p["label"] = f"NOTIFY, {cfg.snapshot_tenants:,}-tenant map"
                propagation.append(p)
        with phase("snapshot, SQLite"), tempfile.TemporaryDirectory(prefix="tenantry-") as folder:
            sqlite_url = f"sqlite:///{Path(folder) / 'catalog.db'}"
            with big_catalog(sqlite_url, fleet.shard, cfg.snapshot_tenants) as catalog:
                snapshot["sqlite"] = measure_snapshot(catalog, cfg.snapshot_repeats)

    data: dict[str, Any] = {
        "benchmark": NAME,
        "config": {**asdict(cfg), "threads": list(cfg.threads)},
        "seed": args.seed,
        "machine": info,
        "load_average_end": load_average(),
        "phases_s": phase.seconds,
        "ratios": ratio_rows(results, cfg.blocks),
        "latency": latency_rows(results),
        "driver": driver,
        "lookup": lookup,
        "snapshot": snapshot,
        "propagation": propagation,
    }
    data["targets"] = targets(data)
    if profile is not None:
        data["profile"] = profile
    if args.raw_samples:
        data["samples_ns"] = {
            str(n): {v.key: s.rounds for v, s in by_variant.items()}
            for n, by_variant in results.items()
        }
    return data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="What routing costs: tenantry's Router against hand-made sessions."
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument(
        "--pg-url",
        nargs="+",
        action="extend",
        metavar="URL",
        help="superuser URL(s) of running PostgreSQL servers (default: start throwaway ones)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile routed and setting (into the JSON)"
    )
    parser.add_argument(
        "--raw-samples", action="store_true", help="also write every latency into the JSON"
    )
    parser.add_argument("--child", choices=["notify", "poll"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return propagation_child(args.child)
    started = time.monotonic()
    data = run(args)
    data["duration_s"] = round(time.monotonic() - started, 1)
    json_path, md_path = write_results(NAME, data, render_markdown(data), args.out)
    print_summary(data)
    for route, report in data.get("profile", {}).items():
        console.rule(f"profile: {route}")
        console.print(report, markup=False)
    console.print(f"wrote {json_path} and {md_path} ({data['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
