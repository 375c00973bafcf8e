"""Isolation tiers side by side: a shared pool, dedicated databases and a mix, one workload.

    python benchmarks/tiers.py [--quick] [--pg-url URL ...] [--out DIR] [--seed N]
                               [--sizes N ...] [--max-dedicated N] [--only PART ...]

Questions 1-4 of issue 8, answered in one run on the same two PostgreSQL servers:

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
import gc
import itertools
import json
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import (
    RESULTS_DIR,
    Phases,
    console,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    percentile,
    pg_servers,
    progress,
    write_results,
)
from psycopg import sql
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tenantry import (
    Catalog,
    Router,
    Shard,
    TenantryError,
    Tier,
    load_settings,
    mask_url,
    migrations,
    moves,
)
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import ChargingSession, User
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.settings import TenantrySettings
from tenantry.shardmap.schema import tenants
from tenantry.testing import create_database, drop_database

NAME = "tiers"
#: The routing role, one per run (a run on the same servers has its own password).
ROLE = "tenantry_bench_app_{token}"
#: How the N tenants are placed. "dedicated-pool8" is "dedicated" with 8 pooled
#: connections per database instead of the default 2 (+5 overflow, closed after use).
PLACEMENTS = ("shared", "dedicated", "dedicated-pool8", "mixed")
LABELS = {"dedicated-pool8": "dedicated, pool 8"}
CODES = {"shared": "s", "dedicated": "d", "dedicated-pool8": "p", "mixed": "m"}
BIG_POOL = 8
OPS = ("read", "write", "aggregate")
MIX = (0.7, 0.2, 0.1)  # shares of OPS
APP_TABLES = ("users", "chargers", "charging_sessions")
PARTS = ("throughput", "noisy", "footprint", "operations")
#: The heavy tenant's placements in the noisy-neighbour test; "quiet" has none.
CONDITIONS = ("quiet", "same database", "dedicated, same server", "dedicated, other server")
HEAVY_TENANTS = {
    "same database": "heavy-shared",
    "dedicated, same server": "heavy-same",
    "dedicated, other server": "heavy-other",
}
# Sequence ids of rows written by the workload: above the seeded ones, apart per process.
CHILD_ID_BASE = 1_000_000_000


@dataclass(frozen=True)
class Config:
    """How much of everything to run."""

    mode: str
    sizes: tuple[int, ...] = (10, 100, 1000)
    max_dedicated: int = 100  # layouts needing more dedicated databases are skipped
    pool8_sizes: tuple[int, ...] = (10, 100)  # the N at which "dedicated-pool8" runs
    threads: int = 8
    rounds: int = 8
    window_s: float = 1.5
    warmup_s: float = 3.0  # pools grow to the concurrency they see before the rounds
    users: int = 20
    chargers: int = 10
    sessions: int = 400
    heavy_rows: int = 1_000_000
    noisy_rounds: int = 6
    noisy_window_s: float = 2.0
    victim_threads: int = 2
    heavy_threads: int = 2
    footprint_s: float = 2.0
    add_tenant_samples: int = 20
    provision_samples: int = 5
    migrate_jobs: tuple[int, ...] = (1, 4)
    # (rows, mode) of each promote-and-demote; online_moves.py times 1M-row online moves
    moves: tuple[tuple[int, str], ...] = (
        (10_000, "offline"),
        (10_000, "online"),
        (1_000_000, "offline"),
    )
    # Router settings: the defaults (64 engines, 400 connections) would evict engines
    # of a 100-database layout on every round and measure connection set-up instead.
    max_engines: int = 256
    connection_budget: int = 2000


FULL = Config(mode="full")
QUICK = Config(
    mode="quick",
    sizes=(10, 100),
    pool8_sizes=(10,),
    rounds=4,
    window_s=0.75,
    warmup_s=0.5,
    heavy_rows=200_000,
    noisy_rounds=3,
    noisy_window_s=1.5,
    footprint_s=1.0,
    add_tenant_samples=10,
    provision_samples=3,
    migrate_jobs=(1,),
    moves=((10_000, "offline"), (10_000, "online")),
)


def dedicated_count(placement: str, n: int) -> int:
    """Dedicated databases a layout needs."""
    if placement.startswith("dedicated"):
        return n
    if placement == "mixed":
        return max(1, n // 10)
    return 0


def label(placement: str) -> str:
    return LABELS.get(placement, placement)


# -- servers, roles, databases ----------------------------------------------------------


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Servers:
    """The two servers: superuser URLs, the routing role, and the databases made here.

    Databases are dropped at the end unless the servers are throwaway ones (they go
    with the servers, and 200 DROP DATABASEs take a while).
    """

    def __init__(self, admin: Sequence[str], *, throwaway: bool) -> None:
        self.admin = list(admin)
        self.throwaway = throwaway
        self.token = secrets.token_hex(2)
        self.role = ROLE.format(token=self.token)
        self.created: list[str] = []
        password = secrets.token_hex(12)
        for url in dict.fromkeys(self.admin):
            with psycopg.connect(_conninfo(url), autocommit=True) as conn:
                attributes = sql.SQL("LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {}").format(
                    sql.Literal(password)
                )
                try:
                    conn.execute(
                        sql.SQL("CREATE ROLE {} ").format(sql.Identifier(self.role)) + attributes
                    )
                except psycopg.errors.DuplicateObject:
                    conn.execute(
                        sql.SQL("ALTER ROLE {} ").format(sql.Identifier(self.role)) + attributes
                    )
        self.routing = [
            make_url(u)
            .set(username=self.role, password=password)
            .render_as_string(hide_password=False)
            for u in self.admin
        ]

    def create(self, server: int, suffix: str, *, template: str | None = None) -> str:
        """A new database on *server* (superuser URL)."""
        url = create_database(self.admin[server], f"tb{self.token}_{suffix}", template=template)
        self.created.append(url)
        return url

    def routing_url(self, admin_url: str) -> str:
        """The same database as the routing role."""
        server = next(i for i, u in enumerate(self.admin) if _same_server(u, admin_url))
        database = make_url(admin_url).database
        return (
            make_url(self.routing[server])
            .set(database=database)
            .render_as_string(hide_password=False)
        )

    def forget(self, url: str) -> None:
        """A database dropped by someone else (a move dropping its source)."""
        name = make_url(url).database
        self.created = [u for u in self.created if make_url(u).database != name]

    def close(self) -> None:
        if not self.throwaway:
            for url in reversed(self.created):
                try:
                    drop_database(url)
                except sa.exc.SQLAlchemyError as exc:
                    console.print(f"[yellow]could not drop {make_url(url).database}: {exc}")
            for url in dict.fromkeys(self.admin):
                with psycopg.connect(_conninfo(url), autocommit=True) as conn:
                    try:
                        conn.execute(
                            sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.role))
                        )
                    except psycopg.Error as exc:  # still granted somewhere: leave it
                        console.print(f"[yellow]could not drop role {self.role}: {exc}")
        self.created.clear()


#: Every layout keeps its pools open through question 1; 100 dedicated databases with
#: 8-connection pools alone may hold a few hundred backends.
MAX_CONNECTIONS = 1000


@contextmanager
def bench_servers(urls: Sequence[str] | None) -> Iterator[list[str]]:
    """Superuser URLs of two servers: the given ones, or two started with room for
    MAX_CONNECTIONS backends each."""
    if urls:
        with pg_servers(urls, count=2) as given:
            for url in dict.fromkeys(given):
                with psycopg.connect(_conninfo(url)) as conn:
                    row = conn.execute("SHOW max_connections").fetchone()
                if row is not None and int(row[0]) < MAX_CONNECTIONS:
                    console.print(
                        f"[yellow]{make_url(url).render_as_string()}: max_connections is "
                        f"{row[0]}; the dedicated layouts may need up to {MAX_CONNECTIONS}"
                    )
            yield given
        return
    from tenantry.testing import PostgresServers

    settings = {"max_connections": str(MAX_CONNECTIONS)}
    with PostgresServers(count=2, name="tenantry-bench", settings=settings) as servers:
        yield list(servers.urls)


def _same_server(a: str, b: str) -> bool:
    ua, ub = make_url(a), make_url(b)
    return (ua.host, ua.port) == (ub.host, ub.port)


def new_catalog(servers: Servers, key: str, cfg: Config, pool_size_dedicated: int = 2) -> Catalog:
    url = servers.create(0, f"cat_{key}")
    settings = load_settings(
        catalog_url=url,
        alembic_config=str(MIGRATIONS),
        max_engines=cfg.max_engines,
        connection_budget=cfg.connection_budget,
        pool_size_dedicated=pool_size_dedicated,
    )
    catalog = Catalog(url, settings=settings)
    catalog.init()
    return catalog


@dataclass
class Templates:
    """A migrated, empty database on each server: new shard databases are copies."""

    names: list[str]
    empty_bytes: int


def make_templates(servers: Servers, settings: TenantrySettings) -> Templates:
    names = []
    for i in range(len(servers.admin)):
        url = servers.create(i, f"tpl{i}")
        shard = Shard(name=f"template-{i}", url=servers.routing_url(url), admin_url=url)
        outcome = migrate_shard(
            replace(shard, tier=Tier.DEDICATED), app_config(MIGRATIONS), settings=settings
        )
        if not outcome.ok:
            raise SystemExit(f"cannot migrate the template database: {outcome.error}")
        names.append(make_url(url).database or "")
    with psycopg.connect(_conninfo(servers.admin[0])) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", [names[0]]).fetchone()
    assert row is not None
    return Templates(names, int(row[0]))


def new_shard(
    servers: Servers,
    catalog: Catalog,
    templates: Templates,
    server: int,
    name: str,
    tier: Tier,
    *,
    admin: str | None = None,
) -> Shard:
    """A database copied from the template (unless *admin* names one copied already),
    given RLS if shared, registered."""
    if admin is None:
        admin = copy_template(servers, templates, server, name)
    shard = Shard(name=name, url=servers.routing_url(admin), admin_url=admin, tier=tier)
    if tier is Tier.SHARED:
        # At head already: this only installs the row-level-security policies.
        outcome = migrate_shard(shard, app_config(MIGRATIONS), settings=catalog.settings)
        if not outcome.ok:
            raise SystemExit(f"cannot prepare shared shard {name}: {outcome.error}")
    # The template has tenantry's residency table already: nothing to prepare.
    return catalog.add_shard(name, shard.url, admin_url=admin, tier=tier, prepare=False)


def copy_template(servers: Servers, templates: Templates, server: int, name: str) -> str:
    return servers.create(server, name.replace("-", "_"), template=templates.names[server])


def register(catalog: Catalog, placement: dict[str, Shard], cfg: Config) -> None:
    """Place and seed many tenants at once (``add_tenant`` opens a connection to the
    shard for each): per database one transaction writes the residency rows and the
    tenants' rows, then the catalog rows follow, in the order add_tenant uses."""
    now = datetime.now(UTC)
    version = catalog.map_version() + 1
    by_shard: dict[str, list[str]] = defaultdict(list)
    shards = {}
    for tenant, shard in placement.items():
        by_shard[shard.name].append(tenant)
        shards[shard.name] = shard
    sizes = (cfg.users, cfg.chargers, cfg.sessions)
    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        done = [
            pool.submit(seed, shards[name].operations_url, ids, *sizes, residency_version=version)
            for name, ids in by_shard.items()
        ]
        for future in done:
            future.result()
    with catalog.transaction() as (conn, _version):
        conn.execute(
            tenants.insert(),
            [
                {
                    "id": t,
                    "shard": s.name,
                    "tier": s.tier.value,
                    "pinned": False,
                    "state": "active",
                    "created_at": now,
                }
                for t, s in placement.items()
            ],
        )


#: Databases created and seeded at once during set-up (server-side work, mostly).
SETUP_THREADS = 4

SEED = (
    """INSERT INTO users (tenant_id, id, email, name)
       SELECT t, i, 'driver' || i || '@' || t || '.example', 'Driver ' || i
       FROM unnest(%(tenants)s::text[]) AS t, generate_series(1, %(users)s) AS i""",
    """INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)
       SELECT t, i, 'charger ' || i, 'bay ' || i, 50 * (1 + i %% 3), 'available'
       FROM unnest(%(tenants)s::text[]) AS t, generate_series(1, %(chargers)s) AS i""",
    """INSERT INTO charging_sessions
           (tenant_id, id, charger_id, user_id, started_at, ended_at, energy_kwh)
       SELECT t, i, 1 + i %% %(chargers)s, 1 + i %% %(users)s,
              timestamptz '2026-01-01 00:00+00' + i * interval '7 minutes',
              timestamptz '2026-01-01 00:40+00' + i * interval '7 minutes',
              (i %% 50) + 0.5
       FROM unnest(%(tenants)s::text[]) AS t, generate_series(1, %(sessions)s) AS i""",
)
RESIDENT = """INSERT INTO tenantry_residency (tenant_id, state, map_version, updated_at)
    SELECT t, 'active', %(version)s, now() FROM unnest(%(tenants)s::text[]) AS t"""


def seed(
    admin_url: str,
    tenant_ids: Sequence[str],
    users: int,
    chargers: int,
    sessions: int,
    *,
    residency_version: int | None = None,
) -> None:
    """Give each tenant the same rows (server side; and a residency row if a map version
    is given), then VACUUM ANALYZE."""
    params = {
        "tenants": list(tenant_ids),
        "users": users,
        "chargers": chargers,
        "sessions": sessions,
        "version": residency_version,
    }
    with psycopg.connect(_conninfo(admin_url)) as conn:
        if residency_version is not None:
            conn.execute(RESIDENT, params)
        for statement in SEED:
            conn.execute(statement, params)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE " + ", ".join(APP_TABLES))


# -- layouts ------------------------------------------------------------------------------


@dataclass
class Layout:
    """N tenants of one placement, with a catalog, shards and a router of their own."""

    tier: str  # the placement: one of PLACEMENTS
    n: int
    catalog: Catalog
    tenant_tier: dict[str, str] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)  # admin URLs of its shards
    router: Router | None = None
    disk: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.tier}-{self.n}"

    @property
    def tenants(self) -> list[str]:
        return list(self.tenant_tier)


def build_layout(
    servers: Servers,
    templates: Templates,
    cfg: Config,
    tier: str,
    n: int,
    advance: Callable[[], None],
) -> Layout:
    key = f"{CODES[tier]}{n}"
    pool_size = BIG_POOL if tier == "dedicated-pool8" else 2
    layout = Layout(tier, n, new_catalog(servers, key, cfg, pool_size))
    catalog = layout.catalog
    ids = [f"{tier}-{n}-{i:04d}" for i in range(n)]
    count = dedicated_count(tier, n)
    dedicated = [i for i in range(0, n, max(1, n // count))][:count] if count else []
    placement: dict[str, Shard] = {}
    if len(dedicated) < n:
        shared = []
        for i in range(2):
            shared.append(new_shard(servers, catalog, templates, i, f"{key}-s{i}", Tier.SHARED))
            advance()
        # Round robin: both shared databases hold the same number of tenants.
        rest = [t for i, t in enumerate(ids) if i not in set(dedicated)]
        placement.update({t: shared[j % 2] for j, t in enumerate(rest)})
    with ThreadPoolExecutor(SETUP_THREADS) as pool:
        copies = {
            i: pool.submit(copy_template, servers, templates, i % 2, f"{key}-d{i:04d}")
            for i in dedicated
        }
        for i, future in copies.items():
            name = f"{key}-d{i:04d}"
            placement[ids[i]] = new_shard(
                servers, catalog, templates, i % 2, name, Tier.DEDICATED, admin=future.result()
            )
            advance()
    register(catalog, placement, cfg)
    layout.tenant_tier = {t: placement[t].tier.value for t in ids}
    layout.databases = list(dict.fromkeys(s.operations_url for s in placement.values()))
    layout.disk = measure_disk(layout, templates)
    return layout


def measure_disk(layout: Layout, templates: Templates) -> dict[str, Any]:
    """Database and table sizes of the layout, right after seeding."""
    database_bytes = table_bytes = residency_bytes = 0
    for url in layout.databases:
        with psycopg.connect(_conninfo(url)) as conn:
            row = conn.execute(
                "SELECT pg_database_size(current_database()),"
                " (SELECT sum(pg_total_relation_size(c)) FROM unnest(%s::regclass[]) AS c),"
                " pg_total_relation_size('tenantry_residency')",
                [list(APP_TABLES)],
            ).fetchone()
        assert row is not None
        database_bytes += int(row[0])
        table_bytes += int(row[1])
        residency_bytes += int(row[2])
    n = layout.n
    databases = len(layout.databases)
    return {
        "databases": databases,
        "database_bytes": database_bytes,
        "table_bytes": table_bytes,
        "residency_bytes": residency_bytes,
        "empty_database_bytes": templates.empty_bytes,
        "per_tenant_bytes": database_bytes / n,
        "per_tenant_delta_bytes": (database_bytes - databases * templates.empty_bytes) / n,
        "per_tenant_table_bytes": table_bytes / n,
    }


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
    """n, p50, p95, p99, mean and max in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50) / 1e6,
        "p95": percentile(ordered, 95) / 1e6,
        "p99": percentile(ordered, 99) / 1e6,
        "mean": statistics.fmean(ordered) / 1e6,
        "max": ordered[-1] / 1e6,
    }


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


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return int(stat.rsplit(")", 1)[1].split()[1])


def postmaster_pid(url: str) -> int | None:
    """The server's main process, if it runs on this machine (else None)."""
    with psycopg.connect(_conninfo(url)) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        return _parent_pid(int(row[0])) if row else None


def server_processes(postmaster: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _parent_pid(int(entry.name)) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


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
        with psycopg.connect(_conninfo(url)) as conn:
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
        with psycopg.connect(_conninfo(url)) as conn:
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
    argv = [sys.executable, str(Path(__file__).resolve()), "--footprint-child"]
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
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "min_ms": min(values) * 1000,
        "max_ms": max(values) * 1000,
        "p95_ms": percentile(values, 95) * 1000,
    }


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
    with psycopg.connect(_conninfo(url)) as conn:
        rows = conn.execute(
            "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings"
            " WHERE name = ANY(%s)",
            [names],
        ).fetchall()
    return {name: value for name, value in rows}


# -- figures the report leads with ----------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the report opens with."""
    lines: list[dict[str, Any]] = []

    def add(question: int, figure: str, value: float) -> None:
        lines.append({"question": question, "figure": figure, "value": value})

    def pairs(
        results: dict[str, dict[str, Any]], other: str = "dedicated"
    ) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        for n in sorted({v["n"] for v in results.values()}):
            shared, dedicated = results.get(f"shared-{n}"), results.get(f"{other}-{n}")
            if shared and dedicated:
                yield n, shared, dedicated

    for other in ("dedicated", "dedicated-pool8"):
        for n, shared, dedicated in pairs(data.get("throughput", {}), other):
            ops = _ratio(shared["ops_per_s"], dedicated["ops_per_s"])
            p99 = _ratio(shared["latency_ms"]["p99"], dedicated["latency_ms"]["p99"])
            add(1, f"throughput, shared / {label(other)}, N={n}", ops)
            add(1, f"p99 latency, shared / {label(other)}, N={n}", p99)
    for condition, c in data.get("noisy", {}).get("conditions", {}).items():
        if condition != "quiet":
            add(2, f"victim p99 under load / quiet, heavy tenant on {condition}", c["p99_ratio"])
    for n, shared, dedicated in pairs(data.get("footprint", {})):
        disk = _ratio(dedicated["disk"]["per_tenant_bytes"], shared["disk"]["per_tenant_bytes"])
        add(3, f"disk per tenant, dedicated / shared, N={n}", disk)
    for other in ("dedicated", "dedicated-pool8"):
        for n, shared, dedicated in pairs(data.get("footprint", {}), other):
            held = _ratio(connections(dedicated), connections(shared))
            add(3, f"server connections, {label(other)} / shared, N={n}", held)
    onboarding = data.get("onboarding", {})
    if onboarding:
        shared_ms = onboarding["shared: add_tenant"]["total"].get("median_ms")
        for variant, v in onboarding.items():
            if variant.startswith("dedicated"):
                how = variant.split(": ", 1)[1].removesuffix(", add_tenant")
                slower = _ratio(v["total"].get("median_ms"), shared_ms)
                add(4, f"time to add a tenant, {how} / shared add_tenant", slower)
    return lines


# -- report --------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _rounds_spread(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if values else ""


def _ordered(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results.values(), key=lambda v: (v["n"], PLACEMENTS.index(v["tier"])))


def section_throughput(data: dict[str, Any]) -> str:
    thr = data["throughput"]
    cfg = data["config"]
    ratio_rows = []
    for n in sorted({v["n"] for v in thr.values()}):
        shared = thr.get(f"shared-{n}")
        for other in PLACEMENTS[1:]:
            o = thr.get(f"{other}-{n}")
            if shared and o:
                ratio_rows.append(
                    [
                        n,
                        f"shared / {label(other)}",
                        _x(_ratio(shared["ops_per_s"], o["ops_per_s"])),
                        _x(_ratio(shared["latency_ms"]["p50"], o["latency_ms"]["p50"])),
                        _x(_ratio(shared["latency_ms"]["p99"], o["latency_ms"]["p99"])),
                    ]
                )
    rows = []
    for v in _ordered(thr):
        lat, by_op = v["latency_ms"], v["by_op"]
        rows.append(
            [
                v["n"],
                label(v["tier"]),
                v["dedicated_databases"],
                f"{v['ops_per_s']:,.0f}",
                _rounds_spread(v["ops_per_s_rounds"]),
                _ms(lat["p50"]),
                _ms(lat["p95"]),
                _ms(lat["p99"]),
                " / ".join(_ms(by_op[op].get("p99")) for op in OPS),
                f"{v['new_connections_per_1000_ops']:.1f}",
                v.get("connections_held", ""),
                sum(v["errors"].values()),
            ]
        )
    skipped = [f"{label(s['tier'])} N={s['n']}: {s['reason']}" for s in data["skipped"]]
    lines = [
        f"{cfg['threads']} worker threads in one process, through `router.session(t)`; each "
        "operation is one transaction for a uniformly random tenant: "
        f"{cfg['mix']['read']:.0%} point reads, {cfg['mix']['write']:.0%} small writes "
        f"(insert one row, commit), {cfg['mix']['aggregate']:.0%} per-tenant aggregates "
        f"(energy per charger over the tenant's sessions). Every tenant holds {cfg['users']} "
        f"users, {cfg['chargers']} chargers and {cfg['sessions']} charging sessions. "
        f"{cfg['rounds']} rounds of {cfg['window_s']} s per layout, layouts in a fresh random "
        "order each round. *Shared* is a pool of two databases, one per server; dedicated "
        "databases alternate between the servers; *mixed* has every tenth tenant dedicated. "
        f"*dedicated* uses tenantry's default pools (2 connections per database, "
        f"{cfg['max_overflow']} overflow connections closed after use), *dedicated, pool "
        f"{BIG_POOL}* keeps {BIG_POOL} per database. *New conns* are connections opened "
        "during the rounds per 1000 operations (pool churn); *held* are the routing role's "
        "backends on the layout's databases after the last round.",
        "",
        markdown_table(["N", "ratio", "ops/s", "p50", "p99"], ratio_rows, align="rlrrr"),
        "",
        markdown_table(
            [
                "N",
                "placement",
                "dedicated DBs",
                "ops/s",
                "rounds min-max",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "p99 read / write / aggregate",
                "new conns /1000 ops",
                "held",
                "errors",
            ],
            rows,
            align="rl" + "r" * 10,
        ),
    ]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    mixed = [
        f"N={v['n']}: shared {_ms(b['shared']['p50'])} / {_ms(b['shared']['p99'])}, "
        f"dedicated {_ms(b['dedicated']['p50'])} / {_ms(b['dedicated']['p99'])}"
        for v in _ordered(thr)
        if v["tier"] == "mixed" and {"shared", "dedicated"} <= set(b := v["by_tenant_tier"])
    ]
    if mixed:
        lines += [
            "",
            "Within the mixed layouts, by the tenant's own tier (p50 / p99 ms): "
            + "; ".join(mixed)
            + ".",
        ]
    return "\n".join(lines)


def section_noisy(data: dict[str, Any]) -> str:
    noisy = data["noisy"]
    cfg = data["config"]
    rows = []
    for condition, c in noisy["conditions"].items():
        lat = c["victim_ms"]
        spread = c["p99_ratio_rounds"]
        rows.append(
            [
                condition if condition == "quiet" else f"heavy tenant on {condition}",
                _x(c["p99_ratio"]),
                f"{min(spread):.2f}-{max(spread):.2f}" if condition != "quiet" else "",
                _x(c["p50_ratio"]),
                _ms(lat["p50"]),
                _ms(lat["p99"]),
                lat["n"],
                f"{c['heavy_queries_per_s']:.1f}" if c["heavy_queries"] else "",
                _ms(c["heavy_query_ms"].get("p50")) if c["heavy_queries"] else "",
            ]
        )
    return "\n".join(
        [
            f"The victim (a shared tenant of the standard size) runs the workload from "
            f"{cfg['victim_threads']} threads while {cfg['heavy_threads']} threads run a large "
            f"aggregate (count, sum and mean duration per charger over "
            f"{cfg['heavy_rows']:,} charging sessions) of a heavy tenant, back to back. The "
            "heavy tenant has a copy in each place; only where the load runs changes. "
            f"{cfg['noisy_rounds']} rounds of {cfg['noisy_window_s']} s per condition, in "
            "random order. *Ratio* is the victim's p99 under load / its quiet p99 (all "
            "rounds pooled); *rounds* is the min-max of the same ratio per round.",
            "",
            markdown_table(
                [
                    "condition",
                    "p99 ratio",
                    "rounds",
                    "p50 ratio",
                    "victim p50 ms",
                    "victim p99 ms",
                    "victim ops",
                    "heavy queries/s",
                    "heavy query ms",
                ],
                rows,
                align="l" + "r" * 8,
            ),
            "",
            f"CPU: {noisy.get('cpu_pinning', 'not pinned')}, as if the servers ran on "
            "hosts of their own. A dedicated database on the same server shares that "
            "server's CPU, memory and disk with the victim's database; one on the other "
            "server shares only what the two servers still share here (one machine's "
            "memory bandwidth and caches).",
        ]
    )


def connections(footprint: dict[str, Any]) -> int:
    """Connections a router holds: after question 1's rounds if run, else the fresh one's."""
    held = footprint.get("connections_held")
    return int(held if held is not None else footprint["process"]["connections"])


def section_footprint(data: dict[str, Any]) -> str:
    foot = data["footprint"]
    rows = []
    for v in _ordered(foot):
        p, d = v["process"], v["disk"]
        held = connections(v)
        rows.append(
            [
                v["n"],
                label(v["tier"]),
                v["databases"],
                held,
                f"{held / v['n']:.2f}",
                p["connections"],
                _bytes(p["rss_bytes"]),
                _bytes(p["rss_delta_bytes"]),
                _bytes(d["database_bytes"]),
                _bytes(d["per_tenant_bytes"]),
                _bytes(d["per_tenant_delta_bytes"]),
                _bytes(d["per_tenant_table_bytes"]),
            ]
        )
    empty = next(iter(foot.values()))["disk"]["empty_database_bytes"] if foot else 0
    cfg = data["config"]
    return "\n".join(
        [
            "*Connections held* are the routing role's backends on the layout's databases "
            "after the rounds of question 1 (one router, warm pools); *fresh router* counts "
            "those of a new process that ran a `Router` over the layout, read every tenant "
            f"once, then ran the workload for {cfg['footprint_s']} s from {cfg['threads']} "
            "threads (`pg_stat_activity` by `application_name`; the router's one LISTEN "
            "connection to the catalog is not counted). *RSS* is that process's resident "
            "memory at the end; *router RSS* is what the router, its engines and pools added "
            "to a process that had imported everything. Disk is measured right after "
            "seeding: *per tenant* is the size of all the layout's databases / N; *data "
            f"only* first subtracts an empty migrated database ({_bytes(empty)}) per "
            "database; *tables* is the tenant tables' size / N (heap, indexes, TOAST).",
            "",
            markdown_table(
                [
                    "N",
                    "placement",
                    "databases",
                    "connections held",
                    "per tenant",
                    "fresh router",
                    "RSS",
                    "router RSS",
                    "disk",
                    "disk per tenant",
                    "data only",
                    "tables",
                ],
                rows,
                align="rl" + "r" * 10,
            ),
            "",
            f"Pools: {cfg['pool_size_shared']} connections per shared database, "
            f"{cfg['pool_size_dedicated']} per dedicated one ({BIG_POOL} in *dedicated, pool "
            f"{BIG_POOL}*), {cfg['max_overflow']} overflow; max_engines {cfg['max_engines']}, "
            f"connection_budget {cfg['connection_budget']}.",
        ]
    )


def section_operations(data: dict[str, Any]) -> str:
    onboarding = data["onboarding"]
    shared_ms = onboarding["shared: add_tenant"]["total"].get("median_ms")
    rows = [
        [
            variant,
            _x(_ratio(v["total"].get("median_ms"), shared_ms)),
            _ms(v["total"].get("median_ms")),
            f"{_ms(v['total'].get('min_ms'))}-{_ms(v['total'].get('max_ms'))}",
            _ms(v["provision"].get("median_ms")) if v["provision"].get("n") else "",
            v["total"]["n"],
        ]
        for variant, v in onboarding.items()
    ]
    lines = [
        "### Adding a tenant",
        "",
        "`catalog.add_tenant(t)` (a residency row on the shard, a catalog row) against "
        "`migrations.provision(...)` of a new dedicated database plus its `add_tenant`; "
        "samples interleaved in random order.",
        "",
        markdown_table(
            ["how", "vs shared", "median ms", "min-max ms", "of which provision", "n"],
            rows,
            align="lrrrrr",
        ),
        "",
        "### Fleet migration, base to head",
        "",
        "`tenantry.migrations.upgrade(catalog, 'head', jobs=J)` over each layout's shards "
        "(the demo app's two revisions: three tables, foreign keys, one index; RLS policies "
        "re-installed on shared databases), after an untimed downgrade to base.",
        "",
    ]
    mig = data["migrations"]
    by_key = {(r["tier"], r["n"], r["jobs"]): r for r in mig}
    mig_rows = []
    for r in mig:
        shared = by_key.get(("shared", r["n"], r["jobs"]))
        mig_rows.append(
            [
                r["n"],
                r["tier"],
                r["databases"],
                r["jobs"],
                f"{r['seconds']:.2f}",
                f"{r['per_database_ms']:.0f}",
                _x(_ratio(r["seconds"], shared["seconds"])) if shared else "n/a",
            ]
        )
    lines += [
        markdown_table(
            ["N", "tier", "databases", "jobs", "seconds", "ms per database", "vs shared"],
            mig_rows,
            align="rlrrrrr",
        ),
        "",
        "### Promote and demote",
        "",
        "A shared tenant promoted to a new dedicated database on the other server "
        "(`moves.promote(..., server=...)`: provision, copy, verify, switch, clean), then "
        "demoted back into its shared database (`moves.demote(..., drop_source=True)`). "
        "*Freeze* is how long the tenant's writes were refused.",
        "",
    ]
    move_rows = []
    for m in data["moves"]:
        if "skipped" in m:
            move_rows.append([f"{m['rows']:,}", m["mode"], "skipped", "", "", "", m["skipped"]])
            continue
        for name in ("promote", "demote"):
            s = m[name]
            move_rows.append(
                [
                    f"{m['rows']:,}",
                    s["mode"],
                    name,
                    f"{m[name + '_s']:.2f}",
                    f"{s['copy_s']:.2f}" if s.get("copy_s") is not None else "",
                    f"{s['freeze_s']:.3f}" if s.get("freeze_s") is not None else "",
                    f"{s['rows_copied'] / m[name + '_s']:,.0f} rows/s"
                    if s.get("rows_copied")
                    else "",
                ]
            )
    lines.append(
        markdown_table(
            ["rows", "mode", "move", "seconds", "copy s", "freeze s", "overall rate"],
            move_rows,
            align="rllrrrr",
        )
    )
    return "\n".join(lines)


TITLES = {
    "throughput": "1. Throughput and latency by tier",
    "noisy": "2. Noisy neighbour",
    "footprint": "3. Footprint",
    "operations": "4. Onboarding and operations",
}


def sections(data: dict[str, Any]) -> dict[str, str]:
    """Markdown of each question measured, by part name (see TITLES)."""
    render = {
        "throughput": section_throughput,
        "noisy": section_noisy,
        "footprint": section_footprint,
        "operations": section_operations,
    }
    present = {**data, "operations": data.get("onboarding")}
    return {part: fn(data) for part, fn in render.items() if present.get(part)}


def headline_table(data: dict[str, Any]) -> str:
    return markdown_table(
        ["figure", "ratio"], [[h["figure"], _x(h["value"])] for h in data["headline"]]
    )


def render_markdown(data: dict[str, Any], charts: Sequence[str] = ()) -> str:
    parts = sections(data)
    lines = [
        "# Isolation tiers: shared, dedicated, mixed",
        "",
        f"Mode: {data['config']['mode']}. Ratios first; absolute figures depend on the "
        "machine (below). Method: the docstring of `benchmarks/tiers.py`.",
        "",
        headline_table(data),
        "",
    ]
    for part, text in parts.items():
        lines += [f"## {TITLES[part]}", "", text, ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts] + [""]
    lines += [
        "## Machine",
        "",
        machine_markdown(data["machine"]),
        "",
        "PostgreSQL settings: "
        + ", ".join(f"{k} {v}" for k, v in data.get("postgres_settings", {}).items())
        + ".",
        "",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in data["phases_s"].items()) + ".",
    ]
    return "\n".join(lines)


# -- charts ----------------------------------------------------------------------------------

COLOURS = {
    "shared": "#4C72B0",
    "dedicated": "#DD8452",
    "dedicated-pool8": "#F2B880",
    "mixed": "#55A868",
}


def _by_tier(
    results: Sequence[dict[str, Any]], pick: Callable[[dict[str, Any]], float]
) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for v in results:
        out[v["tier"]][v["n"]] = pick(v)
    return out


def _grouped_bars(
    ax: Any,
    results: Sequence[dict[str, Any]],
    pick: Callable[[dict[str, Any]], float],
    fmt: Callable[[float], str],
) -> None:
    """Bars of *pick* by N (groups) and tier (colours); a missing pair says "not run"."""
    values = _by_tier(results, pick)
    sizes = sorted({v["n"] for v in results})
    shown = [p for p in PLACEMENTS if p in values]
    width = 0.8 / len(shown)
    for i, tier in enumerate(shown):
        xs, ys = [], []
        for j, n in enumerate(sizes):
            x = j + (i - (len(shown) - 1) / 2) * width
            value = values.get(tier, {}).get(n)
            if value is None:
                ax.text(
                    x, 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform(),
                )  # fmt: skip
                continue
            xs.append(x)
            ys.append(value)
        bars = ax.bar(xs, ys, width, label=label(tier), color=COLOURS[tier])
        for bar, value in zip(bars, ys, strict=True):
            ax.annotate(
                fmt(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.12)


def _hbars(ax: Any, labels: Sequence[str], values: Sequence[float], notes: Sequence[str]) -> None:
    colours = [COLOURS["shared"], COLOURS["dedicated"], COLOURS["dedicated-pool8"], "#8172B3"]
    bars = ax.barh(range(len(labels)), values, color=colours[: len(labels)])
    for bar, note in zip(bars, notes, strict=True):
        ax.annotate(
            note,
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
            xytext=(4, 0),
            textcoords="offset points",
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([*values, 1.0]) * 1.5)
    ax.spines[["top", "right"]].set_visible(False)


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)


def chart_throughput(plt: Any, data: dict[str, Any], title: str) -> Any:
    results = list(data["throughput"].values())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _grouped_bars(left, results, lambda v: v["ops_per_s"], lambda x: f"{x:,.0f}")
    left.set_title("Throughput (operations/s; higher is better)", fontsize=10)
    _grouped_bars(right, results, lambda v: v["latency_ms"]["p99"], lambda x: f"{x:.1f}")
    right.set_title("p99 latency (ms; lower is better)", fontsize=10)
    _legend_below(fig, left)
    fig.suptitle(f"One workload by placement and number of tenants: {title}", fontsize=10)
    return fig


def chart_noisy(plt: Any, data: dict[str, Any], title: str) -> Any:
    conditions = data["noisy"]["conditions"]
    labels = [c for c in conditions if c != "quiet"]
    ratios = [conditions[c]["p99_ratio"] for c in labels]
    notes = []
    for c in labels:
        spread = conditions[c]["p99_ratio_rounds"]
        notes.append(
            f"{conditions[c]['p99_ratio']:.2f}x (rounds {min(spread):.2f}-{max(spread):.2f})"
        )
    fig, ax = plt.subplots(figsize=(8, 3.6))
    _hbars(ax, [f"heavy tenant on\n{c}" for c in labels], ratios, notes)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("victim's p99 under load / its quiet p99 (1.0 = unaffected)")
    fig.suptitle(f"Noisy neighbour, victim on a shared database: {title}", fontsize=10)
    return fig


def chart_footprint(plt: Any, data: dict[str, Any], title: str) -> Any:
    results = list(data["footprint"].values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    _grouped_bars(axes[0], results, connections, lambda x: f"{x:.0f}")
    axes[0].set_title("Server connections held by the router", fontsize=10)
    _grouped_bars(
        axes[1], results, lambda v: v["process"]["rss_delta_bytes"] / 2**20, lambda x: f"{x:.1f}"
    )
    axes[1].set_title("Memory the router added to its process (RSS, MiB)", fontsize=10)
    # dedicated-pool8 has the very databases of dedicated: the same bar twice.
    _grouped_bars(
        axes[2],
        [v for v in results if v["tier"] != "dedicated-pool8"],
        lambda v: v["disk"]["per_tenant_bytes"] / 2**10,
        lambda x: f"{x / 1024:.1f} MiB" if x >= 1000 else f"{x:.0f} KiB",
    )
    axes[2].set_yscale("log")
    axes[2].set_title("Disk per tenant (KiB, log scale)", fontsize=10)
    axes[2].set_ylim(bottom=10)
    _legend_below(fig, axes[0])
    fig.suptitle(f"Footprint: {title}", fontsize=10)
    return fig


def chart_operations(plt: Any, data: dict[str, Any], title: str) -> Any:
    onboarding = data["onboarding"]
    labels = [v.replace(": ", ":\n").removesuffix(", add_tenant") for v in onboarding]
    medians = [v["total"].get("median_ms", 0.0) for v in onboarding.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[1, 1.3])
    _hbars(left, labels, medians, [f"{m:.0f} ms" for m in medians])
    left.set_title("Time to add one tenant (median ms)", fontsize=10)
    migrated = data["migrations"]
    jobs = min(r["jobs"] for r in migrated)
    _grouped_bars(
        right,
        [r for r in migrated if r["jobs"] == jobs],
        lambda r: r["seconds"],
        lambda x: f"{x:.1f}",
    )
    right.set_title(f"Fleet migration, base to head (s, jobs={jobs})", fontsize=10)
    _legend_below(fig, right)
    fig.suptitle(f"Onboarding and operations: {title}", fontsize=10)
    return fig


CHARTS = {
    "throughput": ("tiers_throughput.png", chart_throughput),
    "noisy": ("tiers_noisy_neighbour.png", chart_noisy),
    "footprint": ("tiers_footprint.png", chart_footprint),
    "onboarding": ("tiers_operations.png", chart_operations),
}


def draw_charts(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNG charts of the parts measured; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = data["machine"]
    version = str(machine.get("postgresql") or "?").split(" ")[0]
    title = f"{machine.get('cores')} cores, PostgreSQL {version}, {data['config']['mode']} run"
    paths = []
    for part, (name, chart) in CHARTS.items():
        if not data.get(part):
            continue
        fig = chart(plt, data, title)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# -- main -------------------------------------------------------------------------------------


def print_summary(data: dict[str, Any]) -> None:
    console.rule("isolation tiers: headline ratios")
    for h in data["headline"]:
        console.print(f"{_x(h['value']):>8}  {h['figure']}")
    for s in data["skipped"]:
        console.print(f"[yellow]skipped[/] {s['tier']} N={s['n']}: {s['reason']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Isolation tiers compared on one workload.")
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100, short windows")
    parser.add_argument(
        "--pg-url",
        nargs="+",
        action="extend",
        metavar="URL",
        help="superuser URL(s) of running PostgreSQL servers (default: start two throwaway ones)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
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
    started = time.monotonic()
    data = run(args)
    data["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(data, args.out)
    data["charts"] = [p.name for p in charts]
    json_path, md_path = write_results(NAME, data, render_markdown(data, charts), args.out)
    print_summary(data)
    console.print(f"wrote {json_path}, {md_path} and {len(charts)} charts ({data['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
