"""tiers.py's workload and questions 1-2: throughput and latency by tier, and the noisy
neighbour (a victim's latency beside a heavy tenant, servers pinned to their own cores).
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import (
    percentile,
    progress,
    summarize,
)
from _procfs import parent_pid, server_processes
from _tiers_fleet import (
    CONDITIONS,
    HEAVY_TENANTS,
    MIX,
    OPS,
    Config,
    Layout,
    Servers,
    Templates,
    conninfo,
    dedicated_count,
    new_catalog,
    new_shard,
    seed,
)
from sqlalchemy import func, select

from tenantry import (
    Catalog,
    Router,
    TenantryError,
    Tier,
)
from tenantry.demo.models import ChargingSession, User

# -- the workload -------------------------------------------------------------------------

Samples = dict[tuple[str, str], list[int]]  # (op, tenant's tier) -> latencies in ns


class Workload:
    """The operations, each one transaction through ``router.session(t)``."""

    def __init__(self, router: Router, cfg: Config, tenant_tier: dict[str, str], id_base: int = 0):
        self.router = router
        self.cfg = cfg
        self.tenant_tier = tenant_tier
        self.tenants = list(tenant_tier)
        start = id_base + cfg.sessions + 1
        self._next_id = {t: itertools.count(start) for t in self.tenants}

    def read(self, tenant: str, rng: random.Random) -> None:
        wanted = rng.randint(1, self.cfg.sessions)
        with self.router.session(tenant) as session:
            session.execute(
                select(ChargingSession).where(ChargingSession.id == wanted)
            ).scalar_one()

    def write(self, tenant: str, rng: random.Random) -> None:
        new = next(self._next_id[tenant])  # itertools.count is atomic under the GIL
        with self.router.session(tenant) as session:
            session.add(
                ChargingSession(
                    id=new,
                    charger_id=1 + new % self.cfg.chargers,
                    user_id=1 + new % self.cfg.users,
                    started_at=datetime.now(UTC),
                    ended_at=None,
                    energy_kwh=Decimal("12.500"),
                )
            )
            session.commit()

    def aggregate(self, tenant: str, rng: random.Random) -> None:
        with self.router.session(tenant) as session:
            session.execute(
                select(
                    ChargingSession.charger_id,
                    func.count(),
                    func.sum(ChargingSession.energy_kwh),
                ).group_by(ChargingSession.charger_id)
            ).all()

    def run(
        self, seconds: float, seed: int, tenants: Sequence[str] | None = None
    ) -> tuple[Samples, Counter[str], float]:
        """One thread's share of a window: operations until the deadline."""
        rng = random.Random(seed)
        pool = list(tenants) if tenants is not None else self.tenants
        fns = (self.read, self.write, self.aggregate)
        samples: Samples = defaultdict(list)
        errors: Counter[str] = Counter()
        clock = time.perf_counter_ns
        started = clock()
        deadline = started + int(seconds * 1e9)
        now = started
        while now < deadline:
            op = rng.choices(range(3), MIX)[0]
            tenant = rng.choice(pool)
            try:
                fns[op](tenant, rng)
            except (TenantryError, sa.exc.SQLAlchemyError) as exc:
                errors[type(exc).__name__] += 1
                now = clock()
                continue
            end = clock()
            samples[(OPS[op], self.tenant_tier[tenant])].append(end - now)
            now = end
        return samples, errors, (now - started) / 1e9


def run_window(
    executor: ThreadPoolExecutor,
    workload: Workload,
    threads: int,
    seconds: float,
    seed: int,
    tenants: Sequence[str] | None = None,
) -> tuple[Samples, Counter[str], float, int]:
    """*threads* threads for *seconds*: merged samples, errors, wall time, operations."""
    started = time.perf_counter()
    futures = [
        executor.submit(workload.run, seconds, seed * 1000 + i, tenants) for i in range(threads)
    ]
    merged: Samples = defaultdict(list)
    errors: Counter[str] = Counter()
    for future in futures:
        samples, errs, _ = future.result()
        for key, values in samples.items():
            merged[key].extend(values)
        errors.update(errs)
    wall = time.perf_counter() - started
    return merged, errors, wall, sum(len(v) for v in merged.values())


def latency_summary(values: Sequence[int]) -> dict[str, float]:
    """n, p50, p95, p99, mean and max of nanoseconds, in milliseconds."""
    return summarize(values, scale=1e6, stats=("n", "p50", "p95", "p99", "mean", "max"))


def touch_all(router: Router, tenant_ids: Sequence[str]) -> None:
    """One point read per tenant: every engine opened, one connection each."""
    for tenant in tenant_ids:
        with router.session(tenant) as session:
            session.execute(select(User).where(User.id == 1)).scalar_one()


# -- question 1: throughput and latency -----------------------------------------------------


class ConnectCounter:
    """Counts new DBAPI connections of every pool in this process (pool churn)."""

    def __init__(self) -> None:
        self.events: list[int] = []  # list.append is atomic: pools connect from threads

    def __enter__(self) -> ConnectCounter:
        sa.event.listen(sa.pool.Pool, "connect", self._connected)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(sa.pool.Pool, "connect", self._connected)

    def _connected(self, _dbapi: Any, _record: Any) -> None:
        self.events.append(1)

    @property
    def count(self) -> int:
        return len(self.events)


def measure_throughput(
    layouts: Sequence[Layout], cfg: Config, seed: int
) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    workloads = {}
    for layout in layouts:
        assert layout.router is not None
        workloads[layout.key] = Workload(layout.router, cfg, layout.tenant_tier)
    samples: dict[str, Samples] = {k: defaultdict(list) for k in workloads}
    errors: dict[str, Counter[str]] = {k: Counter() for k in workloads}
    per_round: dict[str, list[float]] = {k: [] for k in workloads}
    totals: dict[str, list[float]] = {k: [0.0, 0.0] for k in workloads}  # ops, seconds
    connects: Counter[str] = Counter()
    with (
        ThreadPoolExecutor(cfg.threads) as executor,
        ConnectCounter() as counter,
        progress() as bar,
    ):
        task = bar.add_task("1. throughput by tier", total=len(layouts) * (cfg.rounds + 1))
        for layout in layouts:
            assert layout.router is not None
            touch_all(layout.router, layout.tenants)
            run_window(
                executor, workloads[layout.key], cfg.threads, cfg.warmup_s, rng.randrange(10**9)
            )
            bar.advance(task)
        for _ in range(cfg.rounds):
            order = list(workloads)
            rng.shuffle(order)
            for key in order:
                gc.collect()
                before = counter.count
                got, errs, wall, ops = run_window(
                    executor, workloads[key], cfg.threads, cfg.window_s, rng.randrange(10**9)
                )
                connects[key] += counter.count - before
                for k, values in got.items():
                    samples[key][k].extend(values)
                errors[key].update(errs)
                per_round[key].append(ops / wall)
                totals[key][0] += ops
                totals[key][1] += wall
                bar.advance(task)
    out = {}
    for layout in layouts:
        key = layout.key
        by = samples[key]
        every = [x for values in by.values() for x in values]
        out[key] = {
            "tier": layout.tier,
            "n": layout.n,
            "dedicated_databases": dedicated_count(layout.tier, layout.n),
            "ops": int(totals[key][0]),
            "seconds": totals[key][1],
            "ops_per_s": totals[key][0] / totals[key][1],
            "ops_per_s_rounds": per_round[key],
            "errors": dict(errors[key]),
            "new_connections": connects[key],
            "new_connections_per_1000_ops": connects[key] / totals[key][0] * 1000,
            "latency_ms": latency_summary(every),
            "by_op": {
                op: latency_summary([x for (o, _t), v in by.items() if o == op for x in v])
                for op in OPS
            },
            "by_tenant_tier": {
                t: latency_summary([x for (_o, tt), v in by.items() if tt == t for x in v])
                for t in ("shared", "dedicated")
                if any(tt == t for (_o, tt) in by)
            },
        }
    return out


# -- question 2: noisy neighbour -------------------------------------------------------------


@dataclass
class NoisyFleet:
    catalog: Catalog
    router: Router
    victim: str = "victim"


def build_noisy(servers: Servers, templates: Templates, cfg: Config) -> NoisyFleet:
    catalog = new_catalog(servers, "noisy", cfg)
    shared = new_shard(servers, catalog, templates, 0, "noisy-shared", Tier.SHARED)
    same = new_shard(servers, catalog, templates, 0, "noisy-dedicated-same", Tier.DEDICATED)
    other = new_shard(servers, catalog, templates, 1, "noisy-dedicated-other", Tier.DEDICATED)
    catalog.add_tenant("victim", shard=shared.name)
    catalog.add_tenant("heavy-shared", shard=shared.name)
    catalog.add_tenant("heavy-same", tier=Tier.DEDICATED, shard=same.name)
    catalog.add_tenant("heavy-other", tier=Tier.DEDICATED, shard=other.name)
    seed(shared.operations_url, ["victim"], cfg.users, cfg.chargers, cfg.sessions)
    heavy = (1000, 100, cfg.heavy_rows)
    seed(shared.operations_url, ["heavy-shared"], *heavy)
    seed(same.operations_url, ["heavy-same"], *heavy)
    seed(other.operations_url, ["heavy-other"], *heavy)
    return NoisyFleet(catalog, Router(catalog=catalog))


HEAVY_QUERY = select(
    ChargingSession.charger_id,
    func.count(),
    func.sum(ChargingSession.energy_kwh),
    func.avg(ChargingSession.ended_at - ChargingSession.started_at),
).group_by(ChargingSession.charger_id)


def heavy_loop(router: Router, tenant: str, stop: threading.Event, done: list[float]) -> None:
    """Large aggregates of *tenant* back to back until *stop*; their durations in *done*."""
    while not stop.is_set():
        started = time.perf_counter()
        with router.session(tenant) as session:
            session.execute(HEAVY_QUERY).all()
        done.append(time.perf_counter() - started)


def postmaster_pid(url: str) -> int | None:
    """The server's main process, if it runs on this machine (else None)."""
    with psycopg.connect(conninfo(url)) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        return parent_pid(int(row[0])) if row else None


def _set_affinity(postmaster: int, cpus: set[int]) -> None:
    for pid in server_processes(postmaster):
        with suppress(ProcessLookupError):  # a backend that just ended
            os.sched_setaffinity(pid, cpus)


@contextmanager
def servers_on_own_cores(servers: Servers) -> Iterator[str]:
    """Give each server cores of its own for the block, as if they ran on two hosts
    (new backends inherit the postmaster's affinity); yield what was done, or why not.

    With three cores or more: a third for each server, the rest for this process (the
    client; threads it starts inside the block inherit it). With two: the victim's
    server (server 1) and the client share core 0, server 2 has core 1.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(set(servers.admin)) < 2:
        yield "not pinned: both servers are one server"
        return
    if len(cores) < 2:
        yield "not pinned: one core"
        return
    postmasters = [postmaster_pid(u) for u in servers.admin]
    if None in postmasters or len(set(postmasters)) < 2:
        yield "not pinned: the servers do not run on this machine"
        return
    if len(cores) == 2:
        groups = [{cores[0]}, {cores[1]}, {cores[0]}]
    else:
        k = len(cores) // 3
        groups = [set(cores[:k]), set(cores[k : 2 * k]), set(cores[2 * k :])]
    pinned: list[int] = []
    try:
        for postmaster, cpus in zip(postmasters, groups, strict=False):
            assert postmaster is not None
            pinned.append(postmaster)
            _set_affinity(postmaster, cpus)
    except PermissionError:
        for postmaster in pinned:
            _set_affinity(postmaster, set(cores))
        yield "not pinned: no permission to set the servers' CPU affinity"
        return
    os.sched_setaffinity(0, groups[2])

    def names(cpus: set[int]) -> str:
        return ("core " if len(cpus) == 1 else "cores ") + ", ".join(map(str, sorted(cpus)))

    try:
        yield (
            f"server 1 (the victim's) pinned to {names(groups[0])}, server 2 to "
            f"{names(groups[1])}, the benchmark client to {names(groups[2])}"
        )
    finally:
        os.sched_setaffinity(0, set(cores))
        for postmaster in pinned:
            _set_affinity(postmaster, set(cores))


def measure_noisy(fleet: NoisyFleet, cfg: Config, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    victim = {fleet.victim: "shared"}
    workload = Workload(fleet.router, cfg, victim)
    samples: dict[str, list[int]] = {c: [] for c in CONDITIONS}
    rounds: dict[str, list[float]] = {c: [] for c in CONDITIONS}  # victim p99 per round
    heavy: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    heavy_wall: dict[str, float] = dict.fromkeys(CONDITIONS, 0.0)
    errors: Counter[str] = Counter()
    threads = cfg.victim_threads + cfg.heavy_threads
    with ThreadPoolExecutor(threads) as executor, progress() as bar:
        task = bar.add_task("2. noisy neighbour", total=cfg.noisy_rounds * len(CONDITIONS) + 1)
        # Warm: the victim's rows and each heavy tenant's table in the buffer cache.
        run_window(executor, workload, cfg.victim_threads, cfg.warmup_s, rng.randrange(10**9))
        for tenant in HEAVY_TENANTS.values():
            with fleet.router.session(tenant) as session:
                session.execute(HEAVY_QUERY).all()
        bar.advance(task)
        for _ in range(cfg.noisy_rounds):
            order = list(CONDITIONS)
            rng.shuffle(order)
            for condition in order:
                gc.collect()
                stop = threading.Event()
                durations: list[float] = []
                loops = []
                started = time.perf_counter()
                if condition in HEAVY_TENANTS:
                    loops = [
                        executor.submit(
                            heavy_loop, fleet.router, HEAVY_TENANTS[condition], stop, durations
                        )
                        for _ in range(cfg.heavy_threads)
                    ]
                    time.sleep(0.2)  # the heavy queries are under way
                got, errs, _wall, _ops = run_window(
                    executor, workload, cfg.victim_threads, cfg.noisy_window_s, rng.randrange(10**9)
                )
                stop.set()
                for loop in loops:
                    loop.result()
                heavy_wall[condition] += time.perf_counter() - started
                window = [x for values in got.values() for x in values]
                samples[condition].extend(window)
                rounds[condition].append(percentile(window, 99) / 1e6)
                heavy[condition].extend(durations)
                errors.update(errs)
                bar.advance(task)
    quiet = latency_summary(samples["quiet"])
    out: dict[str, Any] = {"victim": fleet.victim, "errors": dict(errors), "conditions": {}}
    for condition in CONDITIONS:
        lat = latency_summary(samples[condition])
        per_round = [
            loaded / calm for loaded, calm in zip(rounds[condition], rounds["quiet"], strict=True)
        ]
        out["conditions"][condition] = {
            "heavy_tenant": HEAVY_TENANTS.get(condition),
            "victim_ms": lat,
            "p99_ratio": lat["p99"] / quiet["p99"],
            "p50_ratio": lat["p50"] / quiet["p50"],
            "p99_ratio_rounds": per_round,
            "victim_p99_rounds_ms": rounds[condition],
            "heavy_queries": len(heavy[condition]),
            "heavy_queries_per_s": len(heavy[condition]) / heavy_wall[condition],
            "heavy_query_ms": latency_summary([int(d * 1e9) for d in heavy[condition]]),
        }
    return out
