"""routing_overhead.py's measurements: one transaction of each variant in interleaved
rounds, the lookup, the map snapshot, propagation to a second process, the first statement
at the driver level, and the optional profile.
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import random
import secrets
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    progress,
    summarize,
)
from _routing_fleet import (
    LEGACY_FENCE,
    LEGACY_SHARD,
    SET_TENANT,
    SHARD_NAME,
    VARIANTS,
    ClassicReading,
    Config,
    Fleet,
    OpenReading,
    Variant,
    point,
    register_tenants,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, Shard, load_settings
from tenantry.router.fence import PG_FENCE
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.drivers import make_engine

# -- one transaction of each variant ------------------------------------------------

#: The script a propagation child runs (``--child``).
SCRIPT = Path(__file__).resolve().with_name("routing_overhead.py")

Work = list[tuple[str, list[int]]]
TxFn = Callable[[str, list[int], bool], None]


def transactions(fleet: Fleet) -> dict[str, TxFn]:
    """One function per route: run one transaction for a tenant over some row ids."""
    router = fleet.router
    engine = fleet.engine
    plain = fleet.plain
    assert router.engine_for(fleet.tenants[-1]) is engine
    assert router.engine_for(fleet.legacy_tenants[0]) is not engine

    def routed(tenant: str, rows: list[int], commit: bool) -> None:
        # routed and legacy alike: the tenant's shard decides the fence and the policy
        with router.session(tenant) as session:
            for row in rows:
                session.execute(point(tenant, row)).scalar_one()
            if commit:
                session.commit()

    def setting(tenant: str, rows: list[int], commit: bool) -> None:
        with Session(engine) as session:
            session.execute(SET_TENANT, {"t": tenant})
            for row in rows:
                session.execute(point(tenant, row, ClassicReading)).scalar_one()
            if commit:
                session.commit()

    def bare_on(bind: Engine) -> TxFn:
        def bare(tenant: str, rows: list[int], commit: bool) -> None:
            with Session(bind) as session:
                for row in rows:
                    session.execute(point(tenant, row, OpenReading)).scalar_one()
                if commit:
                    session.commit()

        return bare

    return {
        "routed": routed,
        "legacy": routed,
        "setting": setting,
        "bare": bare_on(engine),
        "plain": bare_on(plain),
    }


def make_work(
    rng: random.Random, tenants: Sequence[str], cfg: Config, count: int, statements: int
) -> Work:
    rows = range(1, cfg.rows_per_tenant + 1)
    return [(rng.choice(tenants), rng.sample(rows, statements)) for _ in range(count)]


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
            tenants = fleet.tenants_for(variant.route)
            works = [make_work(rng, tenants, cfg, size, variant.statements) for _ in range(n)]
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
        big = catalog.add_shard("bench-big", shard.url, admin_url=shard.admin_url, prepare=False)
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
        [sys.executable, str(SCRIPT), "--child", mode],
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

DRIVER_SELECT = (
    "SELECT tenant_id, id, charger, kwh FROM {table} WHERE tenant_id = %(t)s AND id = %(i)s"
)
#: name -> (shard, first statement, table the point select reads)
DRIVER_FIRST: dict[str, tuple[str, str | None, str]] = {
    "none, no policy": (SHARD_NAME, None, "bench_readings_open"),
    "set_config, classic policy": (
        SHARD_NAME,
        "SELECT set_config('tenantry.tenant_id', %(t)s, true)",
        "bench_readings_classic",
    ),
    "old fence, classic policy": (LEGACY_SHARD, LEGACY_FENCE, "bench_readings"),
    "signed fence, signed policy": (SHARD_NAME, PG_FENCE, "bench_readings"),
}


def measure_driver(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    """Raw psycopg as the routing role, no SQLAlchemy: BEGIN, a first statement (none,
    the tenant setting, the old fence, the signed fence), one point select of the table
    that goes with it, ROLLBACK. What each costs the server and the wire, without any
    Python above the driver (but the signature's HMAC, which the router computes too)."""
    rng = random.Random(seed)
    key = fleet.catalog.fence_key(SHARD_NAME)
    legacy_engine = make_engine(fleet.legacy_shard.url, poolclass=NullPool)
    records = {SHARD_NAME: fleet.plain.raw_connection()}
    try:
        records[LEGACY_SHARD] = legacy_engine.raw_connection()
        conns: dict[str, Any] = {name: r.driver_connection for name, r in records.items()}
        # What a router does for each new connection: the fence's stamp, made once.
        conns[SHARD_NAME].execute("SELECT tenantry.open_session()")
        conns[SHARD_NAME].commit()
        rows = range(1, cfg.rows_per_tenant + 1)

        def once(name: str, tenant: str) -> int:
            shard, first, table = DRIVER_FIRST[name]
            conn = conns[shard]
            select_sql = DRIVER_SELECT.format(table=table)
            start = time.perf_counter_ns()
            if first is PG_FENCE:
                signature = key.sign(tenant, conn.info.backend_pid)
                conn.execute(first, {"t": tenant, "s": signature}).fetchone()
            elif first is not None:
                conn.execute(first, {"t": tenant}).fetchone()
            found = conn.execute(select_sql, {"t": tenant, "i": rng.choice(rows)}).fetchone()
            conn.rollback()
            elapsed = time.perf_counter_ns() - start
            if found is None:
                raise RuntimeError(f"driver level, {name}: the point select found no row")
            return elapsed

        samples: dict[str, list[int]] = {name: [] for name in DRIVER_FIRST}
        for _ in range(cfg.driver_rounds):
            order = list(DRIVER_FIRST)
            rng.shuffle(order)
            for name in order:
                legacy = DRIVER_FIRST[name][0] == LEGACY_SHARD
                pool = fleet.legacy_tenants if legacy else fleet.tenants
                samples[name] += [once(name, rng.choice(pool)) for _ in range(10)]
    finally:
        for record in records.values():
            record.close()
        legacy_engine.dispose()
    out: dict[str, Any] = {name: summarize(v, scale=1_000) for name, v in samples.items()}
    none = out["none, no policy"]["p50"]
    for name in DRIVER_FIRST:
        out[name]["added_p50_us"] = out[name]["p50"] - none
    return out


# -- profile (optional) -----------------------------------------------------------------


def profile_paths(fleet: Fleet, cfg: Config, seed: int, count: int = 3000) -> dict[str, str]:
    """cProfile of the routed, legacy and hand-made-with-setting paths (1 select, rollback)."""
    fns = transactions(fleet)
    out = {}
    for route in ("routed", "legacy", "setting"):
        work = make_work(random.Random(seed), fleet.tenants_for(route), cfg, count, 1)
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
