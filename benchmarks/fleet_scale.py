"""Fleet scale (issue 19): 1,000 dedicated databases and 100,000 tenants on one server,
one router and many.

    python benchmarks/fleet_scale.py [--quick] [--pg-url URL] [--out DIR]
        [--only PART ...] [--databases N] [--tenants N] [--variant NAME ...] [--keep]
        [--max-connections N] [--roomy N] [--no-preload] [--learn S]
        [--compare-stamp]

``--only`` runs some parts (``miss``: 0, ``dedicated``: 1, ``budget``: 2 and 2b,
``refresh``: 3, ``cli``: 4; the build always runs); ``--databases``/``--tenants``
change the fleet's size; ``--variant`` runs some of question 1's settings variants;
``--keep`` (with ``--pg-url``) leaves the fleet in place and prints its catalog URL;
``--max-connections`` is the throwaway server's (500); ``--roomy N`` runs question 1's
lone router once more, on a second throwaway server with ``max_connections`` N (1100:
a connection for every one of 1,000 databases), built the same way (1b). The throwaway
servers run with ``shared_preload_libraries='plpgsql'`` (README recommends it: each new
backend finds PL/pgSQL loaded; ~1 ms of server CPU less per new connection, part 0);
``--no-preload`` leaves it out.

The dedicated databases are marked dedicated once their residency row is in place, as
``shard add --tier dedicated`` marks one (``mark_tier`` through each one's operations
URL, ``_fleet_scale_constant``): each one's tenant is then a constant (shard revision
s0007), so a routed connection there makes no stamp and its fence verifies no
signature; the constant installed is read back in every one. The shared shards (copies
of the same template, so not marked) keep the stamp.

``--compare-stamp`` runs the dedicated side both ways on the same fleet: *constant*
(marked, the default) and *stamp* (every dedicated database unmarked with
``mark_dedicated(false)``: the design before s0007), the mark restored at the end. A
check shows what the server sees each way (``_fleet_scale_constant.check``); part 0
runs four times on dedicated databases nothing touched before (constant, stamp,
constant, stamp; the load average before each), and part 1's lone router runs twice a
round, ``lone router`` (constant) and ``lone router + stamp``, in the other order the
next round.

0. **What a miss costs** (``_fleet_scale_miss``): a transaction to a database with no
   open connection, step by step, one connection at a time — connect, ``open_session``
   (the stamp, or with the constant none), the first and a warm transaction, close, the
   backend's exit — in wall time,
   client CPU and the server backend's CPU; then a router's miss, hit and new engine.

One throwaway PostgreSQL server with ``max_connections=500`` (unless ``--pg-url``). A
template database is migrated once (tenantry's shard schema and a 10-row-key table
``fleet_items`` under row-level security, granted to a NOSUPERUSER NOBYPASSRLS routing
role); the dedicated databases (1,000) and a few shared shards (4) are copies of it.
The dedicated shards and their tenants are written into the catalog in one
transaction (their residency rows first) and then marked (above); the rest of the
100,000 tenants are registered on the shared shards with :meth:`Catalog.add_tenants`
(the ring places them), timed.

1. **One router, dedicated against shared.** 8 threads route 1-select transactions
   (rolled back) for a fixed window, to a tenant chosen uniformly or Zipf-skewed
   (s=1.1, hot tenants in a random order), among the dedicated tenants or among the
   shared ones, after each router has routed one transaction to every dedicated
   tenant (a router that has run a while, not one just started; the time it took is
   recorded; ``--cold`` leaves this out), then routed Zipf traffic to the dedicated
   tenants for ``learn_s`` seconds (20; ``--learn S``: long enough for its engine
   registry to tell the busiest databases from the rest, as a router that has run a
   while could); each cell's measured window follows a few
   seconds of the same traffic, unmeasured (``cell_warmup_s``: each cell measured with
   the connections its own traffic keeps, not those the cell before it left, a
   uniform one say); the four cells and the settings variants
   (defaults; ``max_engines`` 1000; the only router on its server) are interleaved in
   windows, in a random order each round. Per window: the
   router's engines created and disposed, the server's sessions opened per second
   (``pg_stat_database.sessions``), and ``router.engine_stats()`` at its end.
2. **8 router processes, default settings,** each routing to uniformly chosen
   dedicated tenants from 2 threads: the server's client backends sampled every 0.1 s
   against ``max_connections``, and every failure counted by its message.
3. **Map propagation.** 8 router processes with the background refresh (LISTEN) on the
   catalog of 100,000 tenants; a writer pins or unpins a random tenant 20 times a
   second; each router notes when each version arrives. Propagation is from the
   writer's commit returning to a router seeing the version; refresh CPU per change is
   the routers' process CPU over the writer's run divided by the changes, and
   ``_map_refresh.refresh_cpu`` measures one refresh's CPU in this process.
4. **The CLI at 100,000 tenants:** each command as a real process, timed.

The load average at the start and the end is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
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
from _fleet_scale_constant import CONSTANT, STAMP, check, constants, mark
from _fleet_scale_miss import miss_cost
from _fleet_scale_workers import TABLE, load_process, one, watch_process
from _map_refresh import refresh_cpu
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, Shard, load_settings
from tenantry.migrations.rls import RlsTable, grant_routing_role, install_rls
from tenantry.shardmap.catalog.shards import prepare_shard
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.keys import current_key
from tenantry.shardmap.model import Tier
from tenantry.shardmap.schema import fence_keys, shards, tenants
from tenantry.testing import create_database, drop_database

NAME = "fleet_scale"
MAX_CONNECTIONS = 500
#: Settings variants of question 1 (beyond the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "max_engines=1000": {"max_engines": 1000},
    # What this router is: the only one on its server. Its share is then the whole
    # server less the reserves (routers_per_server=1); its own budget and engine count
    # do not bind below that share; a dedicated database keeps as many idle connections
    # as it has transactions at once (overflow connections close when returned, so a
    # hot database with a smaller pool reconnects on every burst), for as long as that
    # many are needed often enough (the registry values connections one by one). The
    # budget is above
    # any server's share here, --roomy's included (1,100 connections).
    "lone router": {
        "routers_per_server": 1,
        "connection_budget": 2000,
        "max_engines": 2000,
        "pool_size_dedicated": 8,
    },
}
#: ``--compare-stamp``: the variant run both ways, and its twin's suffix (the stamp).
COMPARED = "lone router"
STAMP_TWIN = " + stamp"
#: ``--preload``: each new backend finds PL/pgSQL loaded (forked from the postmaster)
#: instead of loading it on its first PL/pgSQL call (the stamp, the fence).
PRELOAD = {"shared_preload_libraries": "plpgsql"}
#: What a client is told when the server has no connection slot left for it.
SERVER_FULL = ("too many clients", "remaining connection slots are reserved")
CELLS = tuple(itertools.product(("zipf", "uniform"), ("dedicated", "shared")))
#: Goals of issue 19: dedicated p50 / shared p50 at most, throughput ratio at least.
GOALS = {"zipf": (2.0, 0.5), "uniform": (3.0, 0.33)}


@dataclass(frozen=True)
class Config:
    """How much of everything to run."""

    mode: str
    databases: int = 1000
    tenants: int = 100_000
    shared_shards: int = 4
    batch_size: int = 1000
    threads: int = 8
    window_s: float = 6.0
    warmup_s: float = 2.0
    learn_s: float = 20.0
    cell_warmup_s: float = 3.0
    touch_all: bool = True
    rounds: int = 2
    zipf_s: float = 1.1
    processes: int = 8
    threads_per_process: int = 2
    load_window_s: float = 10.0
    changes_per_s: float = 20.0
    writer_s: float = 20.0
    refresh_changes: int = 100


FULL = Config(mode="full")
QUICK = Config(
    mode="quick",
    databases=100,
    tenants=10_000,
    window_s=2.0,
    warmup_s=1.0,
    learn_s=2.0,
    cell_warmup_s=1.0,
    rounds=1,
    load_window_s=4.0,
    writer_s=5.0,
    refresh_changes=40,
)


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def bench_server(
    urls: Sequence[str] | None, max_connections: int = MAX_CONNECTIONS, preload: bool = False
) -> Any:
    """A superuser URL: the given server's, or a throwaway one with *max_connections*
    (and PL/pgSQL loaded by the postmaster when *preload*: ``PRELOAD``)."""
    if urls:
        yield urls[0]
        return
    from tenantry.testing import PostgresServers

    settings = {"max_connections": str(max_connections), **(PRELOAD if preload else {})}
    with PostgresServers(count=1, name="tenantry-bench", settings=settings) as servers:
        yield servers.urls[0]


# -- the fleet ---------------------------------------------------------------------------


@dataclass
class Fleet:
    server: str
    catalog_url: str
    dedicated: list[str]
    shared: list[str]
    figures: dict[str, Any]
    databases: list[str]  # every URL made here, the catalog last
    role: str
    dedicated_admin: list[str] = field(default_factory=list)  # superuser URLs, as dedicated
    dedicated_routing: list[str] = field(default_factory=list)  # the routing role's URLs

    def dedicated_entries(self) -> list[tuple[str, str, str]]:
        """(tenant, routing URL, operations URL) of every dedicated database."""
        return list(zip(self.dedicated, self.dedicated_routing, self.dedicated_admin, strict=True))


def _role(server: str) -> tuple[str, str]:
    name, password = f"fleet_{secrets.token_hex(3)}", secrets.token_hex(12)
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                " NOINHERIT PASSWORD {}"
            ).format(sql.Identifier(name), sql.Literal(password))
        )
    return name, password


def _as_role(url: str, role: tuple[str, str]) -> str:
    return (
        make_url(url).set(username=role[0], password=role[1]).render_as_string(hide_password=False)
    )


def build(server: str, cfg: Config, phase: Phases) -> Fleet:
    """The template, its copies, the catalog, and every tenant (see the docstring)."""
    figures: dict[str, Any] = {}
    role = _role(server)
    token = secrets.token_hex(2)
    with phase("template and copies"):
        template = create_database(server, f"fs_tpl_{token}")
        prepare_shard(Shard(name="template", url=template, admin_url=template))
        engine = make_engine(template, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    f"CREATE TABLE {TABLE} (tenant_id varchar(63) NOT NULL, id int NOT NULL,"
                    " n int NOT NULL, PRIMARY KEY (tenant_id, id))"
                )
                tables = [RlsTable("public", TABLE)]
                install_rls(conn, tables)
                grant_routing_role(conn, role[0], tables)
            with engine.connect() as conn:
                key = current_key(conn)
            assert key is not None, "the template has no fence key"
        finally:
            engine.dispose()
        template_name = make_url(template).database or ""
        names = [f"fs_{token}_d{i:04d}" for i in range(cfg.databases)]
        names += [f"fs_{token}_s{i}" for i in range(cfg.shared_shards)]
        started = time.monotonic()

        def clone(name: str) -> str:
            url = create_database(server, name, template=template_name)
            with psycopg.connect(conninfo(server), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(name)
                    )
                )
            return url

        with ThreadPoolExecutor(4) as pool:
            urls = list(pool.map(clone, names))
        figures["clone_s"] = round(time.monotonic() - started, 1)
        figures["databases"] = len(urls)
        console.print(f"  {len(urls)} databases in {figures['clone_s']} s")
    catalog_url = create_database(server, f"fs_{token}_catalog")
    dedicated = [f"d{i:04d}" for i in range(cfg.databases)]
    with phase("register dedicated"):
        catalog = Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url))
        catalog.init()
        version = catalog.map_version() + 1

        def residency(entry: tuple[str, str]) -> None:
            with psycopg.connect(conninfo(entry[1])) as conn:
                conn.execute(
                    "INSERT INTO tenantry_residency (tenant_id, state, map_version, updated_at)"
                    " VALUES (%s, 'active', %s, now())",
                    (entry[0], version),
                )

        ded_urls = urls[: cfg.databases]
        ded_routing = [_as_role(url, role) for url in ded_urls]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(residency, zip(dedicated, ded_urls, strict=True)))
        now = datetime.now(UTC)
        with catalog.transaction() as (conn, written):
            assert written == version, (written, version)
            conn.execute(
                shards.insert(),
                [
                    {
                        "name": f"ded-{t}",
                        "url": routing,
                        "admin_url": url,
                        "tier": "dedicated",
                        "state": "active",
                        "weight": 1,
                        "created_at": now,
                    }
                    for t, url, routing in zip(dedicated, ded_urls, ded_routing, strict=True)
                ],
            )
            conn.execute(
                tenants.insert(),
                [
                    {
                        "id": t,
                        "shard": f"ded-{t}",
                        "tier": "dedicated",
                        "pinned": False,
                        "state": "active",
                        "created_at": now,
                    }
                    for t in dedicated
                ],
            )
        for i, url in enumerate(urls[cfg.databases :]):
            catalog.add_shard(f"pool-{i}", _as_role(url, role), admin_url=url, prepare=False)
        # Every copy has the template's fence key: the catalog learns it as `shard add`
        # (which prepares the shard) would, rather than each router reading it from each
        # shard on its first transaction there.
        with catalog.journal_transaction() as conn:
            names = [f"ded-{t}" for t in dedicated]
            names += [f"pool-{i}" for i in range(cfg.shared_shards)]
            conn.execute(
                fence_keys.insert(),
                [
                    {"shard": n, "key_id": key.key_id, "secret": key.secret, "updated_at": now}
                    for n in names
                ],
            )
    with phase("mark dedicated"):
        # As `shard add --tier dedicated` does (prepare_shard: mark_tier): each
        # database's tenant becomes a constant. The shared shards and the template
        # stay as copies are, unmarked.
        figures["mark"] = mark(list(zip(dedicated, ded_routing, ded_urls, strict=True)))
        if figures["mark"]["wrong"]:
            raise RuntimeError(f"marked, but not installed as expected: {figures['mark']}")
        others = [template, *urls[cfg.databases :]]
        figures["unmarked_constants"] = constants(others)
        if any(c is not None for c in figures["unmarked_constants"]):
            raise RuntimeError(f"a shared shard has a constant: {figures['unmarked_constants']}")
        console.print(
            f"  {figures['mark']['as_expected']:,} marked in {figures['mark']['seconds']} s"
        )
    shared = [f"s{i:06d}" for i in range(cfg.tenants - cfg.databases)]
    with phase(f"add_tenants ({len(shared):,} shared tenants)"):
        summary = catalog.add_tenants(({"id": t} for t in shared), batch_size=cfg.batch_size)
        figures["add_tenants"] = {
            k: v for k, v in summary.to_record().items() if k != "per_shard"
        } | {"batch_size": cfg.batch_size, "per_shard": summary.to_record()["per_shard"]}
        console.print(
            f"  {summary.added:,} tenants in {summary.seconds:.1f} s ({summary.rate:,.0f}/s)"
        )
        with catalog.read_transaction() as conn:
            conn.execute(sa.text("ANALYZE"))
    catalog.close()
    databases = [template, *urls, catalog_url]
    return Fleet(
        server,
        catalog_url,
        dedicated,
        shared,
        figures,
        databases,
        role[0],
        list(ded_urls),
        ded_routing,
    )


def drop(fleet: Fleet) -> None:
    """Drop every database and the role made here (on a server given with --pg-url)."""
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(drop_database, reversed(fleet.databases)))
    with psycopg.connect(conninfo(fleet.server), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(fleet.role)))


# -- question 0: what a miss costs ----------------------------------------------------------

#: Connections question 0 opens one at a time (half raw, half through a router).
MISS_SAMPLE = 80


def question_0(
    fleet: Fleet, cfg: Config, phase: Phases, picked: Sequence[str] = (), mode: str = CONSTANT
) -> dict[str, Any]:
    """What a transaction to a database with no open connection costs, step by step
    (``_fleet_scale_miss``), on dedicated databases the other parts have not touched
    (*picked*: the last ``MISS_SAMPLE`` unless given). *mode*: how the dedicated
    databases are at the time (``constant``, the default, or ``stamp``:
    ``--compare-stamp``), for the record."""
    catalog = Catalog(fleet.catalog_url, settings=load_settings(catalog_url=fleet.catalog_url))
    try:
        snapshot = catalog.snapshot()
    finally:
        catalog.close()
    picked = picked or fleet.dedicated[-min(MISS_SAMPLE, len(fleet.dedicated)) :]
    shards = []
    for t in picked:
        shard = snapshot.shards[snapshot.tenants[t].shard]
        shards.append((t, shard.name, conninfo(shard.url)))
    with phase(f"question 0: what a miss costs ({mode})"):
        return {
            "load": load_average(),
            "mode": mode,
            **miss_cost(fleet.catalog_url, shards, VARIANTS["lone router"]),
        }


# -- question 1: one router ------------------------------------------------------------------


class Chooser:
    """Uniform or Zipf-skewed picks from *ids* (the hot ones in a random order)."""

    def __init__(self, ids: Sequence[str], kind: str, s: float, seed: int) -> None:
        self.ids = list(ids)
        random.Random(seed).shuffle(self.ids)
        self.kind = kind
        self.cum = list(itertools.accumulate(1.0 / (k**s) for k in range(1, len(self.ids) + 1)))

    def pick(self, rng: random.Random) -> str:
        if self.kind == "uniform":
            return rng.choice(self.ids)
        return rng.choices(self.ids, cum_weights=self.cum)[0]


def _sessions(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def touch_all(router: Router, tenants: Sequence[str], threads: int) -> float:
    """Route one transaction to each of *tenants* (*threads* at a time): a router that
    has run for a while, not one that has just started; return the seconds it took."""
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: one(router, t, 1), tenants))
    return time.monotonic() - started


def run_window(
    router: Router, chooser: Chooser, threads: int, seconds: float, seed: int
) -> tuple[list[int], float, int]:
    """Latencies (ns), wall seconds and failures of *threads* threads for *seconds*."""
    deadline = time.monotonic() + seconds
    failures = [0]
    lock = threading.Lock()

    def worker(n: int) -> list[int]:
        rng = random.Random(seed * 1000 + n)
        out = []
        while time.monotonic() < deadline:
            tenant = chooser.pick(rng)
            t0 = time.perf_counter_ns()
            try:
                one(router, tenant, rng.randint(1, 10))
            except Exception as exc:  # counted, and the first few said
                with lock:
                    failures[0] += 1
                    if failures[0] <= 3:
                        console.print(f"[yellow]  {type(exc).__name__}: {exc}")
                continue
            out.append(time.perf_counter_ns() - t0)
        return out

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        latencies = [x for part in pool.map(worker, range(threads)) for x in part]
    return latencies, time.monotonic() - started, failures[0]


def question_1(
    fleet: Fleet,
    cfg: Config,
    phase: Phases,
    variants: dict[str, dict[str, Any]],
    switch: Any = None,
) -> dict[str, Any]:
    """*switch* (``--compare-stamp``): a callable that makes the dedicated databases
    ``constant`` or ``stamp`` (returns the seconds it took); a variant named ``... +
    stamp`` (``STAMP_TWIN``) runs with them unmarked, every other one marked."""
    choosers = {
        (kind, pool): Chooser(
            fleet.dedicated if pool == "dedicated" else fleet.shared, kind, cfg.zipf_s, 7
        )
        for kind, pool in CELLS
    }
    stats_conn = psycopg.connect(conninfo(fleet.server), autocommit=True)
    cells: dict[tuple[str, str, str], dict[str, Any]] = {
        (v, k, p): {
            "latencies": [],
            "wall": 0.0,
            "failures": 0,
            "created": 0,
            "disposed": 0,
            "sessions": 0,
        }
        for v in variants
        for k, p in CELLS
    }
    rng = random.Random(11)
    order_v = list(variants)
    warm: dict[str, list[float]] = {v: [] for v in variants}
    loads: dict[str, list[Any]] = {v: [] for v in variants}
    switched: list[float] = []
    try:
        with phase("question 1: one router, dedicated vs shared"):
            for round_ in range(cfg.rounds):
                # One router at a time (each has the server to itself, as its settings
                # say), in the other order the next round; its cells interleaved.
                for v in order_v if round_ % 2 == 0 else order_v[::-1]:
                    settings = load_settings(catalog_url=fleet.catalog_url, **variants[v])
                    if switch is not None:
                        switched.append(switch(STAMP if v.endswith(STAMP_TWIN) else CONSTANT))
                    loads[v].append(load_average())
                    with Router(settings=settings) as router:
                        if cfg.touch_all:
                            warm[v].append(touch_all(router, fleet.dedicated, cfg.threads))
                        for pool in ("dedicated", "shared"):
                            # dedicated: long enough for the router to tell which
                            # databases are used most (learn_s)
                            seconds = cfg.learn_s if pool == "dedicated" else cfg.warmup_s
                            run_window(router, choosers[("zipf", pool)], cfg.threads, seconds, 1)
                        order = list(CELLS)
                        rng.shuffle(order)
                        for n, (k, p) in enumerate(order):
                            # Unmeasured: the cell's own traffic first, so that each cell
                            # is measured with the connections its traffic keeps, not
                            # the ones the previous cell (say, uniform) left.
                            run_window(
                                router,
                                choosers[(k, p)],
                                cfg.threads,
                                cfg.cell_warmup_s,
                                round_ * 100 + n + 50,
                            )
                            before = router.engine_stats()
                            sessions = _sessions(stats_conn)
                            lat, wall, failed = run_window(
                                router,
                                choosers[(k, p)],
                                cfg.threads,
                                cfg.window_s,
                                round_ * 100 + n,
                            )
                            after = router.engine_stats()
                            cell = cells[(v, k, p)]
                            cell["latencies"] += lat
                            cell["wall"] += wall
                            cell["failures"] += failed
                            cell["created"] += after.created - before.created
                            cell["disposed"] += after.disposed - before.disposed
                            cell["sessions"] += _sessions(stats_conn) - sessions - 1
                            cell["engine_stats"] = asdict(after)
                            console.print(
                                f"  round {round_ + 1} {v:>16} {k:>7} {p:>9}: "
                                f"{len(lat) / wall:7.0f}/s p50 {fmt_ns(_p(lat, 50))}"
                            )
    finally:
        stats_conn.close()
    out: dict[str, Any] = {
        "cells": [],
        "ratios": [],
        "touch_all_s": {v: [round(x, 1) for x in w] for v, w in warm.items()},
        "settings": variants,
        "load_before": loads,
        "switch_s": [round(x, 1) for x in switched],
    }
    for (v, k, p), cell in cells.items():
        lat = cell["latencies"]
        tx = len(lat)
        out["cells"].append(
            {
                "variant": v,
                "choice": k,
                "pool": p,
                "transactions": tx,
                "failures": cell["failures"],
                "tps": tx / cell["wall"] if cell["wall"] else 0.0,
                "latency_ms": summarize(lat, scale=1e6, stats=("p50", "p90", "p99", "mean")),
                "engines_created": cell["created"],
                "engines_disposed": cell["disposed"],
                "new_engine_share": cell["created"] / tx if tx else None,
                "sessions_per_s": max(0.0, cell["sessions"] / cell["wall"])
                if cell["wall"]
                else 0.0,
                "engine_stats": cell["engine_stats"],
            }
        )
    by = {(c["variant"], c["choice"], c["pool"]): c for c in out["cells"]}
    for v in variants:
        for k in ("zipf", "uniform"):
            ded, sh = by[(v, k, "dedicated")], by[(v, k, "shared")]
            p50 = ded["latency_ms"]["p50"] / sh["latency_ms"]["p50"]
            tps = ded["tps"] / sh["tps"]
            max_p50, min_tps = GOALS[k]
            out["ratios"].append(
                {
                    "variant": v,
                    "choice": k,
                    "p50": p50,
                    "p99": ded["latency_ms"]["p99"] / sh["latency_ms"]["p99"],
                    "tps": tps,
                    "goal_p50": max_p50,
                    "goal_tps": min_tps,
                    "met": p50 <= max_p50 and tps >= min_tps,
                }
            )
    return out


def _p(values: Sequence[int], q: float) -> float:
    return summarize(values, stats=(f"p{q:g}",)).get(f"p{q:g}", float("nan"))


# -- question 2: 8 router processes ----------------------------------------------------------

SAMPLE = (
    "SELECT count(*), count(*) FILTER (WHERE usename <> current_user)"
    " FROM pg_stat_activity WHERE backend_type = 'client backend'"
)


#: Question 2's second run: a reserve that also leaves room for the routers' own catalog
#: connections (the catalog is on this server; each router holds about 3: its map read,
#: its LISTEN and its catalog pool), which the per-server budget does not count.
RESERVE_2B = 40


def question_2(
    fleet: Fleet, cfg: Config, phase: Phases, settings: dict[str, Any]
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(cfg.processes + 1)
    results = ctx.Queue()
    samples: list[tuple[int, int]] = []
    stop = threading.Event()
    with phase(f"question 2: {cfg.processes} router processes {settings or 'default'}"):
        procs = [
            ctx.Process(
                target=load_process,
                args=(
                    fleet.catalog_url,
                    settings,
                    fleet.dedicated,
                    cfg.threads_per_process,
                    cfg.load_window_s,
                    n + 1,
                    barrier,
                    results,
                ),
            )
            for n in range(cfg.processes)
        ]
        for proc in procs:
            proc.start()
        with psycopg.connect(conninfo(fleet.server), autocommit=True) as conn:
            row = conn.execute("SHOW max_connections").fetchone()
            max_connections = int(row[0]) if row is not None else MAX_CONNECTIONS

            def sample() -> None:
                while not stop.is_set():
                    row = conn.execute(SAMPLE).fetchone()
                    if row is not None:
                        samples.append((int(row[0]), int(row[1])))
                    stop.wait(0.1)

            barrier.wait(timeout=300)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            got = [results.get(timeout=cfg.load_window_s + 300) for _ in procs]
            stop.set()
            sampler.join()
        for proc in procs:
            proc.join(timeout=60)
    errors: dict[str, int] = {}
    latencies: list[int] = []
    stats = []
    for r in got:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
            continue
        latencies += r["latencies_ns"]
        stats.append(r["engine_stats"])
        for msg, count in r["errors"].items():
            errors[msg] = errors.get(msg, 0) + count
    too_many = sum(c for m, c in errors.items() if any(f in m for f in SERVER_FULL))
    return {
        "settings": settings,
        "processes": cfg.processes,
        "threads_per_process": cfg.threads_per_process,
        "window_s": cfg.load_window_s,
        "max_connections": max_connections,
        "peak_client_backends": max((a for a, _b in samples), default=0),
        "peak_router_backends": max((b for _a, b in samples), default=0),
        "samples": len(samples),
        "transactions": len(latencies),
        "tps": len(latencies) / cfg.load_window_s,
        "latency_ms": summarize(latencies, scale=1e6, stats=("p50", "p99")),
        "errors": errors,
        "failed": sum(errors.values()),
        "too_many_clients": too_many,
        "engine_stats": stats,
    }


# -- question 3: map propagation ---------------------------------------------------------------


def question_3(fleet: Fleet, cfg: Config, phase: Phases) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(cfg.processes + 1)
    stop = ctx.Event()
    results = ctx.Queue()
    commits: dict[int, float] = {}
    with phase(f"question 3: map propagation to {cfg.processes} routers"):
        procs = [
            ctx.Process(target=watch_process, args=(fleet.catalog_url, barrier, stop, results))
            for _ in range(cfg.processes)
        ]
        for proc in procs:
            proc.start()
        catalog = Catalog(fleet.catalog_url, settings=load_settings(catalog_url=fleet.catalog_url))
        try:
            barrier.wait(timeout=300)
            rng = random.Random(3)
            pinned: dict[str, bool] = {}
            changes = int(cfg.changes_per_s * cfg.writer_s)
            started = time.monotonic()
            for i in range(changes):
                delay = started + i / cfg.changes_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                tenant = rng.choice(fleet.shared)
                pinned[tenant] = not pinned.get(tenant, False)
                catalog.set_pinned(tenant, pinned[tenant])
                done = time.time()
                commits[catalog.map_version()] = done
            writer_s = time.monotonic() - started
            time.sleep(1.0)  # the last change's notifications
            stop.set()
            got = [results.get(timeout=120) for _ in procs]
            for proc in procs:
                proc.join(timeout=60)
            refresh = refresh_cpu(catalog, cfg.refresh_changes)
        finally:
            catalog.close()
    delays: list[float] = []
    missed = 0
    cpu = []
    for r in got:
        if "error" in r:
            raise RuntimeError(f"a watching router failed: {r['error']}")
        seen = sorted(r["seen"])
        cpu.append(r["cpu_s"])
        for version, at in commits.items():
            first = next((t for v, t in seen if v >= version), None)
            if first is None:
                missed += 1
            else:
                delays.append(max(0.0, first - at))
    n = len(commits)
    return {
        "routers": cfg.processes,
        "changes": n,
        "changes_per_s": n / writer_s,
        "tenants": len(fleet.shared) + len(fleet.dedicated),
        "propagation_ms": summarize(
            [d * 1000 for d in delays], stats=("n", "p50", "p90", "p99", "max")
        ),
        "missed": missed,
        "router_cpu_ms_per_change": (sum(cpu) / len(cpu)) / n * 1000 if cpu and n else None,
        "refresh_cpu": refresh,
    }


# -- question 4: the CLI ---------------------------------------------------------------------


def question_4(fleet: Fleet, phase: Phases) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "tenantry"
    env = {**os.environ, "TENANTRY_CATALOG_URL": fleet.catalog_url}
    tenant = fleet.shared[len(fleet.shared) // 2]
    commands = {
        "tenantry --version": ["--version"],
        "tenant list > /dev/null": ["tenant", "list"],
        f"route {tenant}": ["route", tenant],
        f"tenant show {tenant}": ["tenant", "show", tenant],
        "shard list": ["shard", "list"],
        "shard show pool-0": ["shard", "show", "pool-0"],
    }
    out = []
    with phase("question 4: the CLI"):
        for label, args in commands.items():
            times = []
            for _ in range(2):  # best of two: the first may read cold files
                t0 = time.monotonic()
                done = subprocess.run(
                    [str(exe), *args],
                    check=False,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=600,
                )
                times.append(time.monotonic() - t0)
            seconds = min(times)
            out.append({"command": label, "seconds": seconds, "returncode": done.returncode})
            if done.returncode:
                console.print(f"[yellow]  {label}: exit {done.returncode}: {done.stderr[-300:]}")
    return {"commands": out}


# -- report -------------------------------------------------------------------------------------


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in data.get("question_1", {}).get("ratios", []):
        out.append(
            {
                "figure": f"{r['choice']} dedicated / shared p50, one router ({r['variant']})",
                "value": round(r["p50"], 2),
            }
        )
        out.append(
            {
                "figure": f"{r['choice']} dedicated / shared throughput ({r['variant']})",
                "value": round(r["tps"], 2),
            }
        )
    q2 = data.get("question_2")
    if q2 is not None:
        out.append(
            {
                "figure": f"peak client backends of {q2['processes']} routers "
                f"(max_connections {q2['max_connections']})",
                "value": q2["peak_client_backends"],
            }
        )
        out.append(
            {
                "figure": "failures of a full server (too many clients)",
                "value": q2["too_many_clients"],
            }
        )
    if "question_2b" in data:
        out.append(
            {
                "figure": f"failures of a full server, server_connection_reserve={RESERVE_2B}",
                "value": data["question_2b"]["too_many_clients"],
            }
        )
    q3 = data.get("question_3")
    if q3 is not None:
        out.append(
            {
                "figure": "map propagation p99 (ms)",
                "value": round(q3["propagation_ms"].get("p99", 0), 1),
            }
        )
    for c in data.get("question_4", {}).get("commands", []):
        out.append({"figure": f"{c['command']} (s)", "value": round(c["seconds"], 2)})
    out.append(
        {
            "figure": "add_tenants rate (tenants/s)",
            "value": round(data["build"]["add_tenants"]["rate"]),
        }
    )
    return out


def markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    build_f = data["build"]
    at = build_f["add_tenants"]
    lines = [
        "# Fleet scale (issue 19)",
        "",
        f"Mode **{cfg['mode']}**: {cfg['databases']:,} dedicated databases and "
        f"{cfg['shared_shards']} shared shards copied from one template on one server "
        f"(max_connections {_max_conn(data)}"
        + (
            f", shared_preload_libraries '{data['shared_preload_libraries']}'"
            if data.get("shared_preload_libraries")
            else ""
        )
        + f"), {cfg['tenants']:,} "
        f"tenants. Load average "
        f"{data['load_start']} at the start, {data['load_end']} at the end; "
        f"{data['duration_s']} s in all. See the docstring of `benchmarks/fleet_scale.py`."
        + (f" Parts run: {', '.join(data['parts'])}." if "parts" in data else ""),
        "",
        "## Goals of issue 19",
        "",
        markdown_table(["goal", "measured", "met"], goals(data), align="llc"),
        "",
        "## Build",
        "",
        markdown_table(
            ["step", "figure"],
            [
                [
                    "databases copied from the template",
                    f"{build_f['databases']:,} in {build_f['clone_s']} s",
                ],
                *(
                    [
                        [
                            "dedicated databases marked (mark_tier through the operations "
                            "URL, 4 threads); constant read back",
                            f"{build_f['mark']['databases']:,} in {build_f['mark']['seconds']} s;"
                            f" as expected in {build_f['mark']['as_expected']:,}; the template "
                            "and shared shards: "
                            + (
                                "no constant"
                                if not any(build_f.get("unmarked_constants", []))
                                else "**a constant**"
                            ),
                        ]
                    ]
                    if "mark" in build_f
                    else []
                ),
                [
                    f"Catalog.add_tenants, batches of {at['batch_size']}",
                    f"{at['added']:,} tenants in {at['seconds']:.1f} s = {at['rate']:,.0f}/s "
                    f"({at['batches']} map versions)",
                ],
            ],
        ),
        "",
    ]
    if "question_0" in data:
        lines += _q0_lines(data["question_0"])
    if "compare_stamp" in data:
        lines += _compare_lines(data)
    if "question_1" in data:
        lines += _q1_lines(data["question_1"], cfg)
    if "question_1_roomy" in data:
        roomy = data["question_1_roomy"]
        lines += _q1_lines(
            roomy, cfg, f"1b. The same on a server with max_connections {roomy['max_connections']}"
        )
    if "question_2" in data:
        lines += _q2_lines(data["question_2"], "2")
    if "question_2b" in data:
        lines += _q2_lines(data["question_2b"], "2b")
    if "question_3" in data:
        lines += _q3_lines(data["question_3"])
    if "question_4" in data:
        lines += [
            "## 4. The CLI at this map's size (real processes, best of two)",
            "",
            markdown_table(
                ["command", "seconds", "exit"],
                [
                    [c["command"], f"{c['seconds']:.2f}", c["returncode"]]
                    for c in data["question_4"]["commands"]
                ],
            ),
            "",
        ]
    lines += ["## Machine", "", machine_markdown(data["machine"])]
    return "\n".join(lines)


def _max_conn(data: dict[str, Any]) -> Any:
    if "max_connections" in data:
        return data["max_connections"]
    return data.get("question_2", {}).get("max_connections", MAX_CONNECTIONS)


def _q0_lines(q0: dict[str, Any]) -> list[str]:
    raw, bare, rt = q0["raw"], q0["raw_no_stamp"], q0["router"]
    q0 = {"raw_again": raw} | q0  # (results written before the second pass had none)
    # results written before s0007 had no mode: the stamp
    constant = q0.get("mode") == CONSTANT

    def row(name: str, step: dict[str, Any]) -> list[str]:
        return [name, *(f"{step[k]:.2f}" for k in ("wall_ms", "client_ms", "server_ms"))]

    rows = [
        row("connect (TCP, fork, authentication, backend start)", raw["connect"]),
        ["postmaster's fork", "", "", f"{raw['postmaster_fork_ms']:.2f}"],
        row("the connect event's statement, autocommit: "
            + ("no stamp (the tenant is a constant)" if constant else "open_session: the stamp"),
            raw["stamp"]),
        row("... in the second pass" + ("" if constant else
            " (the database has that backend slot's temporary namespace already)"),
            q0["raw_again"]["stamp"]),
        row("first transaction on the new backend (fence, select)", raw["first tx"]),
        row("... in the second pass", q0["raw_again"]["first tx"]),
        row("the same transaction again (warm)", raw["warm tx"]),
        row("close (client)", raw["close"]),
        ["backend exit, after open_session and the transactions"
         + ("" if constant else " (the stamp's temporary namespace dropped)"), "", "",
         f"{raw['backend_exit_ms']:.2f}"],
        ["backend exit, of a connection only opened and closed", "", "",
         f"{bare['backend_exit_ms']:.2f}"],
        row("router: a miss (engine kept, no connection)", rt["miss"]),
        row("router: a hit", rt["hit"]),
        row("router: a new engine's first transaction", rt["new engine"]),
        row("router: closing an engine's idle connection", rt["dispose"]),
    ]  # fmt: skip
    return [
        "## 0. What a miss costs (one connection at a time, medians)",
        "",
        (
            "Dedicated databases marked (their tenant a constant). "
            if constant
            else "Dedicated databases unmarked (the stamp). "
            if "mode" in q0
            else ""
        )
        + f"{q0['connections']} connections each way; client CPU is the calling thread's, server "
        "CPU the backend's (`/proc/<pid>/schedstat`), the exit's from the postmaster's reaped "
        f"children. Dialect set-ups run by the router: {rt['dialects_initialized']}.",
        "",
        markdown_table(["step", "wall ms", "client CPU ms", "server CPU ms"], rows, align="lrrr"),
        "",
    ]


def miss_server_ms(q0: dict[str, Any]) -> dict[str, float]:
    """Part 0's server CPU of one miss, by step (ms): the fork, the backend's start,
    the connect event's statement (the stamp; with the constant, a function call), the cold
    first transaction's extra over a warm one, the exit."""
    raw = q0["raw"]
    out = {
        "fork": raw["postmaster_fork_ms"],
        "start": raw["connect"]["server_ms"],
        "stamp": raw["stamp"]["server_ms"] if "stamp" in raw else 0.0,
        "cold tx": raw["first tx"]["server_ms"] - raw["warm tx"]["server_ms"],
        "exit": raw["backend_exit_ms"],
    }
    out["miss"] = sum(out.values())
    out["warm tx"] = raw["warm tx"]["server_ms"]
    out["router miss wall"] = q0["router"]["miss"]["wall_ms"]
    out["router miss client"] = q0["router"]["miss"]["client_ms"]
    out["router hit wall"] = q0["router"]["hit"]["wall_ms"]
    return out


def _seen(entries: dict[str, Any]) -> str:
    return "; ".join(
        f"{t}: {','.join(v['rows']) or 'nothing'} (tenant() {v['tenant()']})"
        for t, v in entries.items()
    )


def _compare_lines(data: dict[str, Any]) -> list[str]:
    cs = data["compare_stamp"]
    lines = [
        "## Constant against stamp (`--compare-stamp`)",
        "",
        "The same fleet both ways: *constant* (every dedicated database marked dedicated, as "
        "tenantry marks it: its tenant a constant, no stamp; the default) and *stamp* (every "
        "dedicated database unmarked with `mark_dedicated(false)`: the design before shard "
        "revision s0007). The shared shards keep the stamp throughout.",
        "",
        f"### Check: what the server sees ({len(cs['checks'][0]['rows_seen'])} dedicated "
        "databases, a row of another tenant planted in each)",
        "",
    ]
    rows = []
    for c in cs["checks"]:
        ro = c["read_only_transaction"]
        rows.append(
            [
                c["mode"],
                ", ".join(f"{t}: {v}" for t, v in c["constant_installed"].items()),
                _seen(c["fenceless_routing_role"]),
                _seen(c["rows_seen"]),
                sum(c["temporary_relations_while_connected"].values()),
                c["fence_for_another_tenant"],
                f"{c['prepare_transaction']} (max_prepared_transactions "
                f"{c['max_prepared_transactions']})",
                ro.get("error") or ", ".join(f"{k} {v}" for k, v in ro.items()),
            ]
        )
    lines += [
        markdown_table(
            [
                "databases",
                "constant installed",
                "a fence-less routing-role connection sees",
                "a routed transaction sees",
                "temporary relations while the router holds its connections",
                "the fence asked for another tenant",
                "PREPARE TRANSACTION in a routed transaction",
                "a read-only routed transaction",
            ],
            rows,
            align="lllllrll",
        ),
        "",
        "Premises:",
        "",
    ]
    lines += [
        f"- {c['mode']}: {premise}: {'yes' if ok else '**NO**'}"
        for c in cs["checks"]
        for premise, ok in c["premises"].items()
    ]
    lines += [""]
    turns = cs.get("question_0", [])
    if turns:
        steps = ["fork", "start", "stamp", "cold tx", "exit", "miss", "warm tx",
                 "router miss wall", "router miss client", "router hit wall"]  # fmt: skip
        labels = {"stamp": "connect statement"}
        figures = [miss_server_ms(q) for q in turns]
        names = [f"{q['mode']} (load {q['load']})" for q in turns]
        lines += [
            "### Part 0: a miss, one connection at a time (server CPU ms unless said; "
            f"{turns[0]['connections']} connections each, medians)",
            "",
            "Server CPU per miss = fork + backend start + the connect event's statement (the "
            "stamp; with the constant, none) + (first transaction - warm transaction) + "
            "exit. Each turn on dedicated databases nothing had touched.",
            "",
            markdown_table(
                ["step", *names],
                [[labels.get(st, st), *(f"{f[st]:.2f}" for f in figures)] for st in steps],
                align="l" + "r" * len(names),
            ),
            "",
        ]
    q1 = data.get("question_1")
    if q1 and any(v.endswith(STAMP_TWIN) for v in q1["settings"]):
        by = {(c["variant"], c["choice"], c["pool"]): c for c in q1["cells"]}
        met = {(r["variant"], r["choice"]): r["met"] for r in q1["ratios"]}
        rows = []
        for v in (COMPARED, f"{COMPARED}{STAMP_TWIN}"):
            for k in ("zipf", "uniform"):
                ded, sh = by[(v, k, "dedicated")], by[(v, k, "shared")]
                share = ded["sessions_per_s"] / ded["tps"] if ded["tps"] else 0.0
                per_miss = (2 / ded["tps"] - 2 / sh["tps"]) / share * 1000 if share else 0.0
                rows.append(
                    [
                        STAMP if v.endswith(STAMP_TWIN) else CONSTANT,
                        k,
                        f"{ded['tps']:,.0f}",
                        f"{sh['tps']:,.0f}",
                        f"{ded['tps'] / sh['tps']:.2f}x",
                        f"{ded['latency_ms']['p50'] / sh['latency_ms']['p50']:.2f}x",
                        f"{100 * share:.1f}%",
                        f"{per_miss:.1f}" if share >= 0.01 else "",
                        "yes" if met[(v, k)] else "**no**",
                        ", ".join(str(x) for x in q1.get("load_before", {}).get(v, [])),
                    ]
                )
        lines += [
            f"### Part 1: the {COMPARED} both ways (max_connections {_max_conn(data)})",
            "",
            "CPU per miss inside the load = (2 cores / dedicated tx/s - 2 cores / shared "
            "tx/s) / share of dedicated transactions connecting (sessions/s over tx/s; "
            "left blank under 1%). Goals: Zipf p50 ≤ 2x and throughput ≥ 0.5x the shared, "
            "uniform ≤ 3x / ≥ 0.33x.",
            "",
            markdown_table(
                [
                    "databases",
                    "choice",
                    "ded tx/s",
                    "shared tx/s",
                    "tx/s ratio",
                    "p50 ratio",
                    "connecting",
                    "CPU per miss ms",
                    "goal met",
                    "load before each router",
                ],
                rows,
                align="llrrrrrrcl",
            ),
            "",
            f"Switching every dedicated database: {q1.get('switch_s')} s (before each router, "
            "not measured).",
            "",
        ]
    return lines


def _q1_lines(q1: dict[str, Any], cfg: dict[str, Any], title: str | None = None) -> list[str]:
    title = title or f"1. One router, {cfg['threads']} threads: dedicated against shared"
    lines = [f"## {title}", ""]
    if q1.get("settings"):
        lines += [
            "Settings: "
            + "; ".join(
                f"{v}: {', '.join(f'{k}={x}' for k, x in st.items()) or 'the defaults'}"
                for v, st in q1["settings"].items()
            )
            + ".",
            "",
        ]
    if q1.get("touch_all_s"):
        times = "; ".join(f"{v}: {w} s" for v, w in q1["touch_all_s"].items() if w)
        if times:
            lines += [
                "Each router first routed one transaction to every dedicated tenant "
                f"({cfg['threads']} threads; seconds per round: {times}), then "
                f"{cfg.get('learn_s', cfg.get('warmup_s', 0))} s of Zipf traffic to the "
                f"dedicated tenants and {cfg.get('warmup_s', 0)} s to the shared ones; each "
                f"cell's window follows {cfg.get('cell_warmup_s', 0)} s of the same traffic, "
                "unmeasured.",
                "",
            ]
    rows = []
    for c in q1["cells"]:
        es = c["engine_stats"]
        rows.append(
            [
                c["variant"],
                c["choice"],
                c["pool"],
                f"{c['transactions']:,}",
                f"{c['tps']:,.0f}",
                f"{c['latency_ms']['p50']:.2f}",
                f"{c['latency_ms']['p99']:.2f}",
                c["engines_created"],
                c["engines_disposed"],
                f"{100 * (c['new_engine_share'] or 0):.1f}%",
                f"{c['sessions_per_s']:.0f}",
                f"{100 * c['sessions_per_s'] / c['tps']:.1f}%" if c["tps"] else "",
                f"{es['engines']}/{es['connections']}/{es.get('surplus', '')}/{es['waits']}"
                f"/{es['dialects_initialized']}",
                c["failures"],
            ]
        )
    lines += [
        markdown_table(
            [
                "settings",
                "choice",
                "tenants",
                "tx",
                "tx/s",
                "p50 ms",
                "p99 ms",
                "engines created",
                "disposed",
                "tx opening an engine",
                "sessions/s",
                "tx opening a connection",
                "engines/conns/surplus/waits/dialects at end",
                "failed",
            ],
            rows,
            align="lllrrrrrrrrrrr",
        ),
        "",
        markdown_table(
            [
                "settings",
                "choice",
                "p50 ded/shared",
                "p99 ded/shared",
                "tx/s ded/shared",
                "goal",
                "met",
            ],
            [
                [
                    r["variant"],
                    r["choice"],
                    f"{r['p50']:.2f}x",
                    f"{r['p99']:.2f}x",
                    f"{r['tps']:.2f}x",
                    f"≤ {r['goal_p50']:g}x / ≥ {r['goal_tps']:g}x",
                    "yes" if r["met"] else "**no**",
                ]
                for r in q1["ratios"]
            ],
            align="lllrrrl",
        ),
        "",
    ]
    return lines


def _q3_lines(q3: dict[str, Any]) -> list[str]:
    prop = q3["propagation_ms"]
    rc = q3["refresh_cpu"]
    return [
        f"## 3. Map propagation: {q3['routers']} routers, {q3['tenants']:,} tenants, "
        f"{q3['changes_per_s']:.1f} changes/s",
        "",
        markdown_table(
            ["figure", "value"],
            [
                ["changes", q3["changes"]],
                [
                    "propagation p50 / p90 / p99 / max ms",
                    " / ".join(f"{prop.get(k, 0):.1f}" for k in ("p50", "p90", "p99"))
                    + " / "
                    + f"{prop.get('max', 0):.1f} (goal p99 ≤ 100)",
                ],
                ["versions a router never saw", q3["missed"]],
                ["router process CPU per change (ms)", f"{q3['router_cpu_ms_per_change']:.3f}"],
                [
                    "one refresh's CPU (refresh_cpu: total / delta / apply / idle poll, ms)",
                    " / ".join(
                        f"{rc[k]:.3f}" for k in ("total_ms", "delta_ms", "apply_ms", "idle_ms")
                    ),
                ],
            ],
        ),
        "",
    ]


def goals(data: dict[str, Any]) -> list[list[str]]:
    """The issue's goals against this run's figures: (goal, measured, yes/no)."""
    rows = []
    roomy = data.get("question_1_roomy", {})
    for q1, where in (
        (data.get("question_1", {}), f"max_connections {_max_conn(data)}"),
        (roomy, f"max_connections {roomy.get('max_connections')}"),
    ):
        for r in q1.get("ratios", []):
            if r["variant"].endswith(STAMP_TWIN):  # a comparison (--compare-stamp)
                continue
            rows.append(
                [
                    f"one router, {r['choice']}, {r['variant']} ({where}): dedicated p50 <= "
                    f"{r['goal_p50']:g}x shared, throughput >= {r['goal_tps']:g}x",
                    f"{r['p50']:.2f}x, {r['tps']:.2f}x",
                    "yes" if r["met"] else "**no**",
                ]
            )
    for key in ("question_2", "question_2b"):
        if key in data:
            q2 = data[key]
            rows.append(
                [
                    f"{q2['processes']} routers ({_settings_text(q2.get('settings') or {})}) "
                    "never fill the server",
                    f"peak {q2['peak_client_backends']}/{q2['max_connections']}, "
                    f"{q2['too_many_clients']} refused",
                    "yes" if q2["too_many_clients"] == 0 else "**no**",
                ]
            )
    q3 = data.get("question_3")
    if q3 is not None:
        p99 = q3["propagation_ms"].get("p99", float("nan"))
        rows.append(
            ["map propagation p99 <= 100 ms", f"{p99:.1f} ms", "yes" if p99 <= 100 else "**no**"]
        )
        cpu = q3["refresh_cpu"]["total_ms"]
        rows.append(
            [
                "a change costs a router <= 1 ms of CPU (refresh)",
                f"{cpu:.3f} ms",
                "yes" if cpu <= 1 else "**no**",
            ]
        )
    at = data["build"]["add_tenants"]
    projected = 100_000 / at["rate"] if at["rate"] else float("nan")
    rows.append(
        [
            "bulk registration of 100,000 tenants <= 60 s",
            f"{at['added']:,} in {at['seconds']:.1f} s ({projected:.0f} s per 100,000)",
            "yes" if projected <= 60 else "**no**",
        ]
    )
    for c in data.get("question_4", {}).get("commands", []):
        limit = 3.0 if "list" in c["command"] and "shard" not in c["command"] else 1.0
        if c["command"].startswith("tenantry --version"):
            continue
        rows.append(
            [
                f"`{c['command']}` <= {limit:g} s",
                f"{c['seconds']:.2f} s",
                "yes" if c["seconds"] <= limit and c["returncode"] == 0 else "**no**",
            ]
        )
    return rows


def _q2_lines(q2: dict[str, Any], number: str) -> list[str]:
    lines: list[str] = []
    lines += [
        f"## {number}. {q2['processes']} router processes, "
        f"{_settings_text(q2.get('settings') or {})}, "
        f"{q2['threads_per_process']} threads each, uniform over the dedicated tenants",
        "",
        markdown_table(
            ["figure", "value"],
            [
                [
                    "peak client backends (all) / max_connections",
                    f"{q2['peak_client_backends']} / {q2['max_connections']}",
                ],
                ["peak client backends of the routers' roles", q2["peak_router_backends"]],
                ["transactions, tx/s", f"{q2['transactions']:,}, {q2['tps']:,.0f}"],
                [
                    "p50 / p99 ms",
                    f"{q2['latency_ms'].get('p50', 0):.2f} / {q2['latency_ms'].get('p99', 0):.2f}",
                ],
                ["failed transactions", q2["failed"]],
                [
                    "of which the server was full ('too many clients', 'remaining connection slots "
                    "are reserved')",
                    q2["too_many_clients"],
                ],
            ],
        ),
        "",
    ]
    if q2["errors"]:
        lines += ["Failures by message (shard names and the port left out):", ""]
        grouped: dict[str, int] = {}
        for msg, count in q2["errors"].items():
            key = re.sub(r"port \d+", "port N", re.sub(r"shard '[^']+'", "shard '...'", msg))
            grouped[key] = grouped.get(key, 0) + count
        lines += [f"- {count} x `{msg}`" for msg, count in grouped.items()]
        lines += [""]
    return lines


def _settings_text(settings: dict[str, Any]) -> str:
    if not settings:
        return "default settings"
    return "default settings but " + ", ".join(f"{k}={v}" for k, v in settings.items())


def summary(data: dict[str, Any]) -> None:
    for h in data["headline"]:
        console.print(f"  {h['figure']}: {h['value']}")


PARTS = ("miss", "dedicated", "budget", "refresh", "cli")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    sizes = {k: v for k, v in (("databases", args.databases), ("tenants", args.tenants)) if v}
    if sizes:
        cfg = replace(cfg, **sizes)
    if args.cold:
        cfg = replace(cfg, touch_all=False)
    if args.learn is not None:
        cfg = replace(cfg, learn_s=args.learn)
    parts = set(args.only or PARTS)
    variants = {v: VARIANTS[v] for v in args.variant} if args.variant else VARIANTS
    data: dict[str, Any] = {
        "config": asdict(cfg),
        "parts": sorted(parts),
        "load_start": load_average(),
    }
    phase = Phases()
    with ExitStack() as stack:
        server = stack.enter_context(bench_server(args.pg_url, args.max_connections, args.preload))
        data["machine"] = machine_info([server])
        data["max_connections"] = _max_connections(server)
        data["shared_preload_libraries"] = _show(server, "shared_preload_libraries")
        fleet = build(server, cfg, phase)
        data["build"] = fleet.figures
        switch = None
        if args.compare_stamp:
            switch = stack.enter_context(_switcher(fleet))
            data["compare_stamp"] = compare_stamp(fleet, cfg, phase, parts, switch)
            if data["compare_stamp"].get("question_0"):
                data["question_0"] = data["compare_stamp"]["question_0"][0]
            if COMPARED in variants:
                variants = variants | {f"{COMPARED}{STAMP_TWIN}": variants[COMPARED]}
        elif "miss" in parts:
            data["question_0"] = question_0(fleet, cfg, phase)
        if "dedicated" in parts:
            data["question_1"] = question_1(fleet, cfg, phase, variants, switch)
        if switch is not None:
            switch(CONSTANT)
        if "budget" in parts:
            data["question_2"] = question_2(fleet, cfg, phase, {})
            data["question_2b"] = question_2(
                fleet, cfg, phase, {"server_connection_reserve": RESERVE_2B}
            )
        if "refresh" in parts:
            data["question_3"] = question_3(fleet, cfg, phase)
        if "cli" in parts:
            data["question_4"] = question_4(fleet, phase)
        if args.pg_url and args.keep:
            console.print(f"  kept: catalog {fleet.catalog_url}")
        elif args.pg_url:
            with phase("drop the databases"):
                drop(fleet)
    if args.roomy and "dedicated" in parts:
        # Part 1 again, the lone router only, on a server that has a connection for
        # every database (built the same way, after the first server has stopped).
        with bench_server(None, args.roomy, args.preload) as roomy:
            data["question_1_roomy"] = {
                "max_connections": _max_connections(roomy),
                **question_1(
                    build(roomy, cfg, phase), cfg, phase, {"lone router": VARIANTS["lone router"]}
                ),
            }
    data["phases_s"] = phase.seconds
    data["load_end"] = load_average()
    data["headline"] = headline(data)
    return data


@contextmanager
def _switcher(fleet: Fleet) -> Any:
    """``--compare-stamp``: a callable that makes every dedicated database ``constant``
    (marked dedicated) or ``stamp`` (unmarked), when it is not so already, and returns
    the seconds it took; the marks are restored at the end whatever happens."""
    entries = fleet.dedicated_entries()
    state = [CONSTANT]

    def switch(mode: str) -> float:
        if state[0] == mode:
            return 0.0
        done = mark(entries, Tier.DEDICATED if mode == CONSTANT else Tier.SHARED)
        if done["wrong"]:
            raise RuntimeError(f"switched to {mode}, but not installed as expected: {done}")
        state[0] = mode
        console.print(f"  every dedicated database {mode}: {done['seconds']:.1f} s")
        return float(done["seconds"])

    try:
        yield switch
    finally:
        switch(CONSTANT)


def compare_stamp(
    fleet: Fleet, cfg: Config, phase: Phases, parts: set[str], switch: Any
) -> dict[str, Any]:
    """``--compare-stamp``: the check each way, then part 0 constant and stamp in turn,
    each on dedicated databases nothing has touched (from the end of the list)."""
    out: dict[str, Any] = {"checks": []}
    settings = VARIANTS[COMPARED]
    entries = fleet.dedicated_entries()
    probe = entries[:3]
    modes = [CONSTANT, STAMP]
    with phase("compare-stamp: check"):
        for mode in modes:
            switch(mode)
            out["checks"].append(check(fleet.catalog_url, probe, settings, mode, TABLE))
            failed = [k for k, ok in out["checks"][-1]["premises"].items() if not ok]
            if failed:
                console.print(f"[red]  {mode}: premise not held: {'; '.join(failed)}")
    if "miss" in parts:
        n = min(MISS_SAMPLE, len(fleet.dedicated) // (4 * len(modes)))
        rounds = 2 if len(fleet.dedicated) - len(probe) >= 2 * len(modes) * n else 1
        out["question_0"] = []
        for i in range(rounds * len(modes)):
            mode = modes[i % len(modes)]
            picked = fleet.dedicated[len(fleet.dedicated) - (i + 1) * n :][:n]
            switch(mode)
            out["question_0"].append(question_0(fleet, cfg, phase, picked, mode))
    return out


def _max_connections(server: str) -> int:
    return int(_show(server, "max_connections") or MAX_CONNECTIONS)


def _show(server: str, name: str) -> str:
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
    return str(row[0]) if row is not None else ""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 databases, 10,000 tenants")
    add_server_options(parser, default="start a throwaway one with max_connections=500")
    parser.add_argument(
        "--from-json", type=Path, help="only write the Markdown again from this results JSON"
    )
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, help="run these parts only (the build always runs)"
    )
    parser.add_argument("--databases", type=int, help="dedicated databases (default: the mode's)")
    parser.add_argument("--tenants", type=int, help="tenants in all (default: the mode's)")
    parser.add_argument(
        "--variant", nargs="+", choices=list(VARIANTS), help="question 1's settings variants"
    )
    parser.add_argument(
        "--keep", action="store_true", help="with --pg-url: leave the fleet in place"
    )
    parser.add_argument(
        "--cold", action="store_true", help="question 1 without touching every database first"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"the throwaway server's max_connections (default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--learn",
        type=float,
        metavar="S",
        help="seconds of Zipf traffic to the dedicated tenants before part 1's cells "
        "(default: the mode's, 20 in full mode)",
    )
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="throwaway servers with shared_preload_libraries='plpgsql', as README "
        "recommends (each new backend finds PL/pgSQL loaded); default: yes",
    )
    parser.add_argument(
        "--compare-stamp",
        action="store_true",
        help="also run the dedicated side with every dedicated database unmarked (the "
        "stamp, as before shard revision s0007): a check each way, part 0 in turns, and "
        f"part 1's {COMPARED!r} twice a round (see the docstring)",
    )
    parser.add_argument(
        "--roomy",
        type=int,
        metavar="N",
        help="also run part 1 (the lone router) on a second throwaway server with "
        "max_connections N, e.g. 1100: a connection for every database",
    )
    args = parser.parse_args(argv)
    if args.learn is not None and not args.learn >= 0:
        parser.error("--learn S takes seconds of traffic: 0 or more")
    if args.roomy is not None and (args.pg_url or args.roomy < 10):
        parser.error("--roomy starts a throwaway server of its own: not with --pg-url, N >= 10")
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        finish(NAME, data, markdown(data), args.out, summary)
        return
    data = timed(run, args)
    finish(NAME, data, markdown(data), args.out, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
