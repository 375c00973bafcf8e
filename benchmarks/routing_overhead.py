"""What routing costs: router.session(t) against hand-made sessions on the same shard.

    python benchmarks/routing_overhead.py [--quick] [--pg-url URL ...] [--out DIR]

Every session connects as a NOSUPERUSER NOBYPASSRLS routing role (created here; the
shard's ``admin_url`` is the superuser URL, tenantry's operations role), so the
row-level-security policies run as in production. The shard database holds three
copies of the same rows (1000 tenants of 20 rows, and one tenant of 1,000 rows):

- ``bench_readings``: tenantry's signed policies (``install_rls``): reads compare the
  tenant column with ``(SELECT tenantry.tenant())``, which re-verifies the fence's
  HMAC once per statement;
- ``bench_readings_classic``: the classic hand-written policy,
  ``tenant_id = current_setting('tenantry.tenant_id', true)`` (tenantry's own policy
  before the signed fence);
- ``bench_readings_open``: no policy (row-level security off), readable by the role.

The same transaction (one point select of a row by ``(tenant_id, id)``, or five of
them) runs through

- ``routed``:  ``router.session(t)`` (map lookup, engine lease, the signed fence
  ``SELECT tenantry.fence(t, signature)``, ORM criteria) on ``bench_readings``;
- ``legacy``:  the same Router, on a second shard (a second database on the same
  server) whose fence is the statement tenantry ran before the signed fence
  (``SELECT set_config('tenantry.tenant_id', t, true), r.state, ... FROM
  tenantry_residency r``, with SELECT on the residency granted to the role; the
  benchmark swaps ``tenantry.router.fence._fence_postgresql`` for that shard only)
  and whose ``bench_readings`` has the classic policy: the router as it was, for a
  before/after comparison in the same run;
- ``setting``: ``Session(engine)`` that first runs
  ``SELECT set_config('tenantry.tenant_id', :t, true)``, then reads
  ``bench_readings_classic``: the standard row-level-security pattern written by hand;
- ``bare``:    ``Session(engine)`` with no setting, reading ``bench_readings_open``
  (as the same routing role, on the same pool: with no setting the classic policy
  would admit nothing, so the no-isolation baseline reads the table without policy);
- ``plain``:   ``bare`` on a second engine made with the same pool settings but
  without tenantry's engine events (for information; no target).

``routed``, ``setting`` and ``bare`` share ``router.engine_for(t)``, so their pools
are the same pool; ``legacy`` has the legacy shard's pool, made alike. Each
transaction ends like a typical read (session closed, so rolled back) or with a
commit: psycopg forgets its prepared statements at every ROLLBACK, so the two endings
differ. Tenants are drawn at random for each transaction. Rounds interleave every
variant and both thread counts in a fresh random order, so machine noise (other test
suites on the same machine) hits all variants alike; the per-round ratios show the
run's spread. The signed fence's cost is ``routed / legacy`` (target: at most 3%
more); ``legacy / setting`` and ``routed / setting`` are the before and after of the
ratio to the hand-written pattern.

Also measured: what each policy costs per statement (a point select and a 1,000-row
scan of one tenant, inside one routed transaction after the fence, on the three
tables, and on ``bench_readings`` as the operations role, which bypasses the
policies; interleaved); the first statement at the driver level; the lookup alone;
loading a 100,000-tenant map snapshot from a PostgreSQL and a SQLite catalog, and its
memory (tracemalloc); a map cache's refresh after one tenant changed (from the
catalog's change log); how long a new tenant takes to reach a second router process
by NOTIFY and by polling.

Without ``--pg-url`` throwaway PostgreSQL servers are started (tenantry.testing).
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
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import tenantry.router.fence as fence_module
from tenantry import Catalog, Router, Shard, TenantScoped, load_settings
from tenantry.migrations.rls import RlsTable, grant_routing_role, install_rls
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
    big_rows: int = 1000  # rows of the one big tenant (the policy cost's scans)
    policy_rounds: int = 40  # transactions of the policy cost measurement
    policy_iterations: int = 25  # per transaction: every statement in a random order
    policy_warmup: int = 6  # unrecorded iterations first (psycopg prepares after 5)

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
    policy_rounds=8,
    policy_iterations=10,
)

ROUTES = ("routed", "legacy", "setting", "bare", "plain")
ROUTE_LABELS = {
    "routed": "router.session(t), signed fence",
    "legacy": "router.session(t), old fence",
    "setting": "Session + set_config, classic policy",
    "bare": "bare Session, no policy",
    "plain": "bare Session, plain engine",
}
STATEMENTS = (1, 5)
ENDINGS = ("rollback", "commit")

# Targets from DESIGN.md ("hot-path facts") and issue 3.
TARGET_VS_SETTING = 1.05
TARGET_VS_BARE = {1: 1.25, 5: 1.10}
TARGET_LOOKUP_NS = 5_000.0
# Issue 12: the signed fence and its policies add at most 3% to a routed transaction
# (routed / legacy p50, the same Router with the fence and policy it had before).
TARGET_VS_LEGACY = 1.03


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


class _ReadingColumns(TenantScoped):
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    charger: Mapped[str] = mapped_column(String(40))
    kwh: Mapped[float]


class Reading(_ReadingColumns, Base):
    """A charger's meter reading: the tenant table the point selects read. On the
    shard: tenantry's signed policies; on the legacy shard: the classic policy."""

    __tablename__ = "bench_readings"


class ClassicReading(_ReadingColumns, Base):
    """The same rows under the classic policy on ``current_setting(...)``."""

    __tablename__ = "bench_readings_classic"


class OpenReading(_ReadingColumns, Base):
    """The same rows without row-level security."""

    __tablename__ = "bench_readings_open"


ReadingModel = type[_ReadingColumns]
SET_TENANT = text("SELECT set_config('tenantry.tenant_id', :t, true)")

#: The classic policy (tenantry's before the signed fence, commit 2cc1d25; what a
#: developer writes by hand for the standard pattern).
CLASSIC_CHECK = "tenant_id = current_setting('tenantry.tenant_id', true)"
CLASSIC_POLICY = (
    "ALTER TABLE {t} ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE {t} FORCE ROW LEVEL SECURITY",
    f"CREATE POLICY bench_tenant_isolation ON {{t}} USING ({CLASSIC_CHECK})"
    f" WITH CHECK ({CLASSIC_CHECK})",
)

#: The fence before the signed fence (tenantry.router.fence.PG_FENCE at 2cc1d25).
LEGACY_FENCE = (
    "SELECT set_config('tenantry.tenant_id', %(t)s, true), r.state,"
    " CASE WHEN r.state = 'frozen'"
    " THEN set_config('transaction_read_only', 'on', true) END"
    " FROM tenantry_residency r WHERE r.tenant_id = %(t)s"
)
SHARD_NAME = "bench-shared"
LEGACY_SHARD = "bench-legacy"
BIG_TENANT = "tbig00"


def point(tenant: str, row: int, model: ReadingModel = Reading) -> sa.Select[Any]:
    return select(model).where(model.tenant_id == tenant, model.id == row)


# -- the fleet ------------------------------------------------------------------------


@dataclass
class Fleet:
    catalog: Catalog
    router: Router
    shard: Shard  # signed fence and policies
    legacy_shard: Shard  # the old fence and the classic policy
    tenants: list[str]
    legacy_tenants: list[str]
    plain: Engine  # same pool settings as the router's engine, no tenantry events
    settings: TenantrySettings
    role: str  # the routing role, NOSUPERUSER NOBYPASSRLS
    checks: dict[str, int] = field(default_factory=dict)

    @property
    def engine(self) -> Engine:
        """The router's own engine of the shard (the hand-made sessions' bind)."""
        return self.router.engine_for(self.tenants[0])

    def tenants_for(self, route: str) -> list[str]:
        return self.legacy_tenants if route == "legacy" else self.tenants


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


def create_routing_role(server_url: str, stack: ExitStack) -> tuple[str, str]:
    """A LOGIN NOSUPERUSER NOBYPASSRLS role on the server, dropped at the end (after the
    databases); its name and password (the throwaway servers trust anyway)."""
    role = f"bench_router_{secrets.token_hex(4)}"
    password = secrets.token_hex(16)
    engine = make_engine(server_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                f" NOINHERIT NOREPLICATION PASSWORD '{password}'"
            )
    finally:
        engine.dispose()
    stack.callback(drop_role, server_url, role)
    return role, password


def drop_role(server_url: str, role: str) -> None:
    engine = make_engine(server_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
    except sa.exc.SQLAlchemyError as exc:  # a throwaway server goes anyway
        console.print(f"[yellow]could not drop role {role}: {exc}[/]")
    finally:
        engine.dispose()


def revoke_temporary(url: str) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            database = make_url(url).database
            conn.exec_driver_sql(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    finally:
        engine.dispose()


def role_url(url: str, role: str, password: str) -> str:
    """*url* (the operations role's) with the routing role instead."""
    return make_url(url).set(username=role, password=password).render_as_string(hide_password=False)


def readings(ids: Sequence[str], rows: int) -> list[dict[str, Any]]:
    return [
        {"tenant_id": t, "id": n, "charger": f"charger-{n % 7}", "kwh": n * 1.5}
        for t in ids
        for n in range(1, rows + 1)
    ]


def vacuum(engine: Engine, tables: Sequence[str]) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


BENCH_TABLES = ("bench_readings", "bench_readings_classic", "bench_readings_open")


def fill_shard(shard: Shard, ids: Sequence[str], cfg: Config, role: str) -> None:
    """Three copies of the same rows: signed policies, classic policy, no policy; the
    routing role's grants through the operations role (``grant_routing_role``)."""
    admin = make_engine(shard.operations_url, poolclass=NullPool)
    try:
        Base.metadata.create_all(admin, tables=[Base.metadata.tables[t] for t in BENCH_TABLES])
        with admin.begin() as conn:
            conn.execute(
                sa.insert(Reading),
                readings(ids, cfg.rows_per_tenant) + readings([BIG_TENANT], cfg.big_rows),
            )
            for copy in BENCH_TABLES[1:]:
                conn.exec_driver_sql(f"INSERT INTO {copy} SELECT * FROM bench_readings")
            install_rls(conn, [RlsTable("public", "bench_readings")])
            for statement in CLASSIC_POLICY:
                conn.exec_driver_sql(statement.format(t="bench_readings_classic"))
            grant_routing_role(conn, role, [RlsTable("public", name) for name in BENCH_TABLES])
        vacuum(admin, BENCH_TABLES)
    finally:
        admin.dispose()


def fill_legacy_shard(shard: Shard, ids: Sequence[str], cfg: Config, role: str) -> None:
    """``bench_readings`` under the classic policy, and SELECT on the residency for the
    routing role (what tenantry's grants were before the signed fence)."""
    admin = make_engine(shard.operations_url, poolclass=NullPool)
    try:
        Base.metadata.create_all(admin, tables=[Base.metadata.tables["bench_readings"]])
        with admin.begin() as conn:
            conn.execute(sa.insert(Reading), readings(ids, cfg.rows_per_tenant))
            for statement in CLASSIC_POLICY:
                conn.exec_driver_sql(statement.format(t="bench_readings"))
            grant_routing_role(conn, role, [RlsTable("public", "bench_readings")])
            conn.exec_driver_sql(f"GRANT SELECT ON tenantry_residency TO {role}")
        vacuum(admin, ["bench_readings", "tenantry_residency"])
    finally:
        admin.dispose()


def install_legacy_fence(stack: ExitStack) -> None:
    """Give the legacy shard's routed transactions the fence of commit 2cc1d25: one
    statement through psycopg that sets the tenant and reads the residency row (what
    ``run_fence`` did then); every other shard keeps the signed fence. The wrapper
    costs both alike (one Python call and a string comparison)."""
    original = fence_module._fence_postgresql

    def fence(conn: sa.Connection, tenant_id: str, shard: str) -> str | None:
        if shard != LEGACY_SHARD:
            return original(conn, tenant_id, shard)
        driver: Any = conn.connection.driver_connection
        row = driver.execute(LEGACY_FENCE, {"t": tenant_id}).fetchone()
        return row[1] if row is not None else None

    fence_module._fence_postgresql = fence
    stack.callback(setattr, fence_module, "_fence_postgresql", original)


def build_fleet(catalog_server: str, shard_server: str, cfg: Config, stack: ExitStack) -> Fleet:
    role, password = create_routing_role(shard_server, stack)  # dropped last
    catalog_url = create_database(catalog_server)
    stack.callback(drop_database, catalog_url)
    shard_url = create_database(shard_server)
    stack.callback(drop_database, shard_url)
    legacy_url = create_database(shard_server)
    stack.callback(drop_database, legacy_url)
    for url in (shard_url, legacy_url):
        # What grant_routing_role does on a shared shard; before add_shard checks the role.
        revoke_temporary(url)
    settings = load_settings(catalog_url=catalog_url)
    catalog = stack.enter_context(Catalog(catalog_url, settings=settings))
    catalog.init()
    # prepare (the default) gives each database tenantry's shard schema (residency,
    # fence functions, fence key) and checks the routing role (a superuser is refused).
    shard = catalog.add_shard(SHARD_NAME, role_url(shard_url, role, password), admin_url=shard_url)
    legacy = catalog.add_shard(
        LEGACY_SHARD, role_url(legacy_url, role, password), admin_url=legacy_url
    )
    ids = [f"t{i:05d}" for i in range(cfg.tenants)]
    legacy_ids = [f"l{i:05d}" for i in range(cfg.tenants)]
    fill_shard(shard, ids, cfg, role)
    fill_legacy_shard(legacy, legacy_ids, cfg, role)
    register_tenants(catalog, shard, [*ids, BIG_TENANT], fence=True)
    register_tenants(catalog, legacy, legacy_ids, fence=True)
    install_legacy_fence(stack)

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
    fleet = Fleet(catalog, router, shard, legacy, ids, legacy_ids, plain, settings, role)
    fleet.checks = check_isolation(fleet, cfg)
    return fleet


def check_isolation(fleet: Fleet, cfg: Config) -> dict[str, int]:
    """Rows each table admits the routing role, in each kind of transaction: proof that
    the policies bind it (else the figures would measure nothing). Raises if not."""
    tenant, legacy = fleet.tenants[0], fleet.legacy_tenants[0]
    one = cfg.rows_per_tenant
    every = cfg.tenants * cfg.rows_per_tenant + cfg.big_rows

    def counts(session: Session, tables: Sequence[str]) -> list[int]:
        return [
            int(session.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables
        ]

    found: dict[str, int] = {}
    expected: dict[str, int] = {}
    with Session(fleet.plain) as session:
        row = session.execute(
            text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        ).scalar_one()
        found["routing role bypasses RLS"] = int(row)
        expected["routing role bypasses RLS"] = 0
        for table, n in zip(BENCH_TABLES, counts(session, BENCH_TABLES), strict=True):
            found[f"{table}, no setting"] = n
        expected |= {
            "bench_readings, no setting": 0,
            "bench_readings_classic, no setting": 0,
            "bench_readings_open, no setting": every,
        }
    with Session(fleet.engine) as session:
        session.execute(SET_TENANT, {"t": tenant})
        for table, n in zip(BENCH_TABLES[:2], counts(session, BENCH_TABLES[:2]), strict=True):
            found[f"{table}, set_config by hand"] = n
        expected |= {
            "bench_readings, set_config by hand": 0,  # the signed policy wants the fence
            "bench_readings_classic, set_config by hand": one,
        }
    with fleet.router.session(tenant) as session:
        for table, n in zip(BENCH_TABLES, counts(session, BENCH_TABLES), strict=True):
            found[f"{table}, routed (signed fence)"] = n
        expected |= {
            "bench_readings, routed (signed fence)": one,
            "bench_readings_classic, routed (signed fence)": one,
            "bench_readings_open, routed (signed fence)": every,
        }
    with fleet.router.session(legacy) as session:
        found["legacy shard bench_readings, routed (old fence)"] = counts(
            session, ["bench_readings"]
        )[0]
        expected["legacy shard bench_readings, routed (old fence)"] = one
    wrong = {k: (v, expected[k]) for k, v in found.items() if v != expected[k]}
    if wrong:
        raise RuntimeError(f"row-level security is not as the benchmark needs: {wrong}")
    return found


# -- one transaction of each variant ------------------------------------------------

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


# -- what a policy costs per statement ------------------------------------------------

POLICY_SQL = {
    "point": DRIVER_SELECT,
    "scan": "SELECT tenant_id, id, charger, kwh FROM {table} WHERE tenant_id = %(t)s",
}
#: variant -> (connection, table); "routed" is one routed transaction of the big tenant
#: (after its signed fence), "operations" the operations role (a superuser: no policy).
POLICY_VARIANTS = {
    "signed": ("routed", "bench_readings"),
    "classic": ("routed", "bench_readings_classic"),
    "none": ("routed", "bench_readings_open"),
    "none, operations role": ("operations", "bench_readings"),
}
POLICY_LABELS = {
    "signed": "signed policy, (SELECT tenantry.tenant())",
    "classic": "classic policy, current_setting(...)",
    "none": "no policy (RLS off), routing role",
    "none, operations role": "signed table as the operations role (bypasses RLS)",
}
#: (a, b): what a costs more than b
POLICY_COMPARISONS = (
    ("signed", "none"),
    ("classic", "none"),
    ("signed", "classic"),
    ("none, operations role", "none"),
)


#: The same statements run *n* times in a loop inside the server (a DO block as the
#: connection's role): the per-statement cost without the client, the wire and the
#: scheduler's wake-ups, which dominate on a loaded machine. Timed twice: the server's
#: wall clock (clock_timestamp()) and, when the server runs on this machine, the
#: backend process's CPU time (/proc/<pid>/schedstat), which other work on the machine
#: does not stretch (or much less: caches and hyperthreads are shared).
SERVER_LOOP = """DO $bench$
DECLARE
  t0 timestamptz := clock_timestamp();
  x text;
BEGIN
  FOR i IN 1..{n} LOOP
    {body};
  END LOOP;
  PERFORM set_config('bench.elapsed_us',
    (extract(epoch FROM clock_timestamp() - t0) * 1000000)::text, true);
END
$bench$"""
SERVER_LOOP_N = {"point": 500, "scan": 20, "function": 500}
LEGACY_TENANT = "l00000"
#: The policies' functions alone (and the classic policy's setting), and the two
#: fences, n calls: name -> (connection, loop body). The signed fence is given a valid
#: signature for the connection's backend ({sig}); the old fence runs on the legacy
#: shard (whose routing role may read the residency), for one of its tenants.
POLICY_FUNCTIONS = {
    "tenantry.tenant()": ("routed", "x := tenantry.tenant()"),
    "tenantry.writable_tenant()": ("routed", "x := tenantry.writable_tenant()"),
    "current_setting(...)": ("routed", "x := current_setting('tenantry.tenant_id', true)"),
    "signed fence": ("routed", f"x := tenantry.fence('{BIG_TENANT}', '{{sig}}')"),
    "old fence": (
        "legacy",
        "PERFORM " + LEGACY_FENCE.removeprefix("SELECT ").replace("%(t)s", f"'{LEGACY_TENANT}'"),
    ),
    # the loop and the DO block's own start: the net figures are above it
    "(empty loop)": ("routed", "x := 'x'"),
}


def server_loop_sql(kind: str, target: str, rows: int) -> str:
    """The loop of *kind* (point, scan: *target* is a table; function: the body)."""
    if kind == "function":
        body = target
    else:
        body = f"PERFORM tenant_id, id, charger, kwh FROM {target} WHERE tenant_id = '{BIG_TENANT}'"
        if kind == "point":
            body += f" AND id = 1 + i % {rows}"
    return SERVER_LOOP.format(n=SERVER_LOOP_N[kind], body=body)


def backend_cpu(conn: Any, local: bool) -> Callable[[], int] | None:
    """A function reading the CPU time (ns) of *conn*'s server process, if the server
    runs on this machine (else None)."""
    if not local:
        return None
    path = Path(f"/proc/{conn.info.backend_pid}/schedstat")
    try:
        cmdline = Path(f"/proc/{conn.info.backend_pid}/cmdline").read_bytes()
        int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if b"postgres" not in cmdline:
        return None

    def read() -> int:
        return int(path.read_text().split()[0])

    return read


def is_local(url: str) -> bool:
    host = make_url(url).host
    return host in (None, "", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def measure_policy(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    """The policies' cost per statement: a point select by (tenant_id, id) and a scan of
    the big tenant's rows, on each table, all in one routed transaction of the big
    tenant (its fence ran first), and as the operations role. From the client: every
    statement of every variant in a fresh random order, ``policy_iterations`` times per
    transaction; in the server: each in a loop (:data:`SERVER_LOOP`), and the policies'
    functions alone, 2 passes per transaction, in a fresh random order."""
    rng = random.Random(seed)
    ops_engine = make_engine(fleet.shard.operations_url, poolclass=NullPool)
    local = is_local(fleet.shard.url)
    samples: dict[tuple[str, str], Samples] = defaultdict(Samples)
    # µs per statement: {"wall": ..., "cpu": ... or None}
    server: dict[tuple[str, str], list[dict[str, float | None]]] = defaultdict(list)
    expected = {"point": 1, "scan": cfg.big_rows}
    clock = time.perf_counter_ns
    legacy_engine = make_engine(fleet.legacy_shard.url, poolclass=NullPool)
    key = fleet.catalog.fence_key(SHARD_NAME)
    ops_record = ops_engine.raw_connection()
    legacy_record = legacy_engine.raw_connection()
    try:
        ops: Any = ops_record.driver_connection
        legacy: Any = legacy_record.driver_connection
        with progress() as bar:
            task = bar.add_task("policy statements", total=cfg.policy_rounds)
            for _round in range(cfg.policy_rounds):
                gc.collect()
                with fleet.router.session(BIG_TENANT) as session:
                    routed: Any = session.connection().connection.driver_connection
                    conns = {"routed": routed, "operations": ops, "legacy": legacy}
                    signature = key.sign(BIG_TENANT, routed.info.backend_pid)
                    cpus = {name: backend_cpu(c, local) for name, c in conns.items()}
                    cases = [
                        (kind, name, conns[where], sql.format(table=table))
                        for kind, sql in POLICY_SQL.items()
                        for name, (where, table) in POLICY_VARIANTS.items()
                    ]
                    taken: dict[tuple[str, str], list[int]] = defaultdict(list)
                    for iteration in range(cfg.policy_warmup + cfg.policy_iterations):
                        rng.shuffle(cases)
                        for kind, name, conn, sql in cases:
                            params: dict[str, Any] = {"t": BIG_TENANT}
                            if kind == "point":
                                params["i"] = rng.randint(1, cfg.big_rows)
                            start = clock()
                            rows = conn.execute(sql, params).fetchall()
                            elapsed = clock() - start
                            if len(rows) != expected[kind]:
                                raise RuntimeError(
                                    f"policy cost, {kind} on {name}: {len(rows)} rows, "
                                    f"expected {expected[kind]}"
                                )
                            if iteration >= cfg.policy_warmup:
                                taken[kind, name].append(elapsed)
                    loops = [
                        (kind, name, where, server_loop_sql(kind, table, cfg.big_rows))
                        for kind in POLICY_SQL
                        for name, (where, table) in POLICY_VARIANTS.items()
                    ] + [
                        (
                            "function",
                            name,
                            where,
                            server_loop_sql("function", body.replace("{sig}", signature), 0),
                        )
                        for name, (where, body) in POLICY_FUNCTIONS.items()
                    ]
                    for _pass in range(2):
                        rng.shuffle(loops)
                        for kind, name, where, sql in loops:
                            conn, cpu = conns[where], cpus[where]
                            before = cpu() if cpu else 0
                            conn.execute(sql)
                            after = cpu() if cpu else 0
                            row = conn.execute("SELECT current_setting('bench.elapsed_us')")
                            n = SERVER_LOOP_N[kind]
                            server[kind, name].append(
                                {
                                    "wall": float(row.fetchone()[0]) / n,
                                    "cpu": (after - before) / n / 1_000 if cpu else None,
                                }
                            )
                ops.rollback()
                legacy.rollback()
                for k, values in taken.items():
                    samples[k].rounds.append(values)
                bar.advance(task)
    finally:
        ops_record.close()
        legacy_record.close()
        ops_engine.dispose()
        legacy_engine.dispose()
    return policy_summary(samples, server, cfg)


def _median_spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": percentile(values, 50),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "min": min(values),
        "max": max(values),
    }


def policy_summary(
    samples: dict[tuple[str, str], Samples],
    server: dict[tuple[str, str], list[dict[str, float | None]]],
    cfg: Config,
) -> dict[str, Any]:
    basis = "cpu" if all(x["cpu"] is not None for v in server.values() for x in v) else "wall"

    def timed(key: tuple[str, str], what: str = basis) -> list[float]:
        return [float(x[what] or 0.0) for x in server[key]]

    out: dict[str, Any] = {
        "tenant_rows": cfg.big_rows,
        "server_loop_n": SERVER_LOOP_N,
        "server_basis": basis,
        "functions": {
            name: {
                "wall_us": _median_spread(timed(("function", name), "wall")),
                **({"cpu_us": _median_spread(timed(("function", name)))} if basis == "cpu" else {}),
            }
            for name in POLICY_FUNCTIONS
        },
        "statements": [],
    }
    for kind in POLICY_SQL:
        entry: dict[str, Any] = {
            "statement": kind,
            "us": {
                name: summarize(samples[kind, name].latencies, scale=1_000)
                for name in POLICY_VARIANTS
            },
            "server_wall_us": {
                name: _median_spread(timed((kind, name), "wall")) for name in POLICY_VARIANTS
            },
            "compare": [],
        }
        if basis == "cpu":
            entry["server_cpu_us"] = {
                name: _median_spread(timed((kind, name))) for name in POLICY_VARIANTS
            }
        for a, b in POLICY_COMPARISONS:
            first, second = samples[kind, a], samples[kind, b]
            pa, pb = percentile(first.latencies, 50), percentile(second.latencies, 50)
            diffs, ratios = [], []
            blocks = zip(first.blocks(cfg.blocks), second.blocks(cfg.blocks), strict=True)
            for xa, xb in blocks:
                qa, qb = percentile(xa, 50), percentile(xb, 50)
                diffs.append((qa - qb) / 1_000)
                ratios.append(qa / qb)
            # The same iteration of the same transaction: a pair close in time.
            paired = [
                (x - y) / 1_000
                for ra, rb in zip(first.rounds, second.rounds, strict=True)
                for x, y in zip(ra, rb, strict=True)
            ]
            # In the server: the loops of the same pass.
            server_a, server_b = timed((kind, a)), timed((kind, b))
            server_paired = [x - y for x, y in zip(server_a, server_b, strict=True)]
            entry["compare"].append(
                {
                    "a": a,
                    "b": b,
                    "diff_p50_us": (pa - pb) / 1_000,
                    "ratio_p50": pa / pb,
                    "blocks_diff_us": {
                        "median": statistics.median(diffs),
                        "min": min(diffs),
                        "max": max(diffs),
                    },
                    "blocks_ratio": {
                        "median": statistics.median(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                    },
                    "paired_diff_us": _median_spread(paired),
                    "server_diff_us": _median_spread(server_paired),
                    "server_ratio": percentile(server_a, 50) / percentile(server_b, 50),
                }
            )
        out["statements"].append(entry)
    # What the signed fence adds to a routed transaction's server time, from the loops:
    # its fence over the old one, and each point select's signed policy over the classic.
    fence = [
        x - y
        for x, y in zip(
            timed(("function", "signed fence")), timed(("function", "old fence")), strict=True
        )
    ]
    per_select = next(
        c["server_diff_us"]["median"]
        for c in out["statements"][0]["compare"]
        if (c["a"], c["b"]) == ("signed", "classic")
    )
    out["server_model"] = {
        "fence_extra_us": percentile(fence, 50),
        "per_select_extra_us": per_select,
        "transaction_extra_us": {
            str(n): percentile(fence, 50) + n * per_select for n in STATEMENTS
        },
    }
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


# -- analysis -----------------------------------------------------------------------------


def ratio(num: Samples, den: Samples, blocks: int) -> dict[str, Any]:
    """num / den: p50 and p99 over the run, client CPU, and the p50 ratio per block."""
    num_all, den_all = num.latencies, den.latencies
    per_block = [
        percentile(a, 50) / percentile(b, 50)
        for a, b in zip(num.blocks(blocks), den.blocks(blocks), strict=True)
    ]
    return {
        "p50": percentile(num_all, 50) / percentile(den_all, 50),
        "p99": percentile(num_all, 99) / percentile(den_all, 99),
        # CPU: the cheapest round of each, the least disturbed by others.
        "client_cpu_min": min(num.cpu_per_tx) / min(den.cpu_per_tx),
        "blocks_p50": {
            "median": statistics.median(per_block),
            "min": min(per_block),
            "max": max(per_block),
            "all": per_block,
        },
    }


def ratio_rows(results: dict[int, dict[Variant, Samples]], blocks: int) -> list[dict[str, Any]]:
    """For every cell: routed / setting, bare, plain and legacy (the router before the
    signed fence), and legacy / setting and bare (the ratios as they were)."""
    rows = []
    for n, by_variant in results.items():
        for statements in STATEMENTS:
            for ending in ENDINGS:
                cell = {r: by_variant[Variant(r, statements, ending)] for r in ROUTES}
                row: dict[str, Any] = {"threads": n, "statements": statements, "ending": ending}
                for base in ("setting", "bare", "plain", "legacy"):
                    row[base] = ratio(cell["routed"], cell[base], blocks)
                for base in ("setting", "bare"):
                    row[f"legacy_vs_{base}"] = ratio(cell["legacy"], cell[base], blocks)
                row["verdicts"] = {
                    "setting_p50": verdict(row["setting"]["p50"], TARGET_VS_SETTING),
                    "bare_p50": verdict(row["bare"]["p50"], TARGET_VS_BARE[statements]),
                    "legacy_p50": verdict(row["legacy"]["p50"], TARGET_VS_LEGACY),
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
    bases: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("legacy", lambda _r: TARGET_VS_LEGACY),
        ("setting", lambda _r: TARGET_VS_SETTING),
        ("bare", lambda r: TARGET_VS_BARE[r["statements"]]),
    ]
    for base, target_of in bases:
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
    empty = data["policy"]["functions"]["(empty loop)"]
    model = data["policy"]["server_model"]
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
        f"{cfg['tenants']} tenants on the shared shard and {cfg['tenants']} on the legacy "
        "shard (a second database on the same server), one drawn at random per transaction; "
        "every session connects as a NOSUPERUSER NOBYPASSRLS routing role. "
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
        "## Before and after the signed fence",
        "",
        "*Before*: `legacy` (the same Router, the fence statement of commit 2cc1d25, the "
        "classic `current_setting` policy) over `setting` (Session + set_config on the "
        "classic policy); *after*: `routed` (signed fence, signed policies) over the same "
        "`setting`. *routed / legacy* is what the signed fence adds (target "
        f"<= {TARGET_VS_LEGACY}); *blocks*: its min-max over blocks of consecutive rounds.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "before: legacy / setting",
                "after: routed / setting",
                "routed / legacy",
                "blocks",
                "verdict",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    _x(r["legacy_vs_setting"]["p50"]),
                    _x(r["setting"]["p50"]),
                    _x(r["legacy"]["p50"]),
                    _spread(r["legacy"]["blocks_p50"]),
                    f"**{r['verdicts']['legacy_p50']}**",
                ]
                for r in data["ratios"]
            ],
            align="rrlrrrrc",
        ),
        "",
        "In the server, by "
        f"{data['policy']['server_basis']} time (the loops below, which the load on the "
        "machine stretches far less than the transactions' wall time): the signed fence "
        f"costs {model['fence_extra_us']:+.1f} µs over the old fence statement, and each "
        f"point select {model['per_select_extra_us']:+.1f} µs under the signed policy over "
        "the classic one, so a routed transaction costs the server "
        + " and ".join(
            f"{v:+.0f} µs ({n} select{'s' if n != '1' else ''})"
            for n, v in model["transaction_extra_us"].items()
        )
        + " more than before the signed fence.",
        "",
        "## What a policy costs per statement",
        "",
        f"Inside one routed transaction of a tenant of {data['policy']['tenant_rows']:,} "
        "rows (after its signed fence), raw psycopg: a point select by `(tenant_id, id)` and "
        "a scan of all the tenant's rows, on the table with the signed policies, the classic "
        "policy and no policy, and on the signed table as the operations role (a "
        "superuser, which bypasses row-level security); every statement of every variant in "
        "a fresh random order. Prepared (psycopg prepares from the 6th execution; the first "
        f"{cfg['policy_warmup']} iterations of each transaction are not counted). "
        "*In the server*: the same statement in a loop inside a DO block "
        f"({data['policy']['server_loop_n']['point']} point selects, "
        f"{data['policy']['server_loop_n']['scan']} scans; `PERFORM`, so no rows are "
        "sent), divided by the count: *wall* by `clock_timestamp()`, *CPU* the backend "
        "process's CPU time (`/proc/<pid>/schedstat`; the server runs on this machine), "
        "which waiting for a core does not stretch. Medians over "
        f"{cfg['policy_rounds'] * 2} loops of each.",
        "",
        markdown_table(
            [
                "statement",
                "variant",
                "n",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "server wall µs",
                "server CPU µs",
            ],
            [
                [
                    st["statement"],
                    POLICY_LABELS[name],
                    d["n"],
                    f"{d['p50']:.1f}",
                    f"{d['p90']:.1f}",
                    f"{d['p99']:.1f}",
                    f"{st['server_wall_us'][name]['median']:.1f}",
                    f"{st['server_cpu_us'][name]['median']:.1f}" if "server_cpu_us" in st else "",
                ]
                for st in data["policy"]["statements"]
                for name, d in st["us"].items()
            ],
            align="llrrrrrr",
        ),
        "",
        "The policies' functions alone, per call, in the same routed transaction (a loop "
        f"of {data['policy']['server_loop_n']['function']} calls; median, p25-p75; *net*: "
        "less the empty loop's):",
        "",
        markdown_table(
            ["function", "server wall µs", "net", "server CPU µs", "net", "CPU p25-p75"],
            [
                [
                    f"`{name}`" if name.endswith(")") and not name.startswith("(") else name,
                    f"{f['wall_us']['median']:.2f}",
                    f"{f['wall_us']['median'] - empty['wall_us']['median']:.2f}",
                    f"{f['cpu_us']['median']:.2f}" if "cpu_us" in f else "",
                    f"{f['cpu_us']['median'] - empty['cpu_us']['median']:.2f}"
                    if "cpu_us" in f
                    else "",
                    f"{f['cpu_us']['p25']:.2f}-{f['cpu_us']['p75']:.2f}" if "cpu_us" in f else "",
                ]
                for name, f in data["policy"]["functions"].items()
            ],
        ),
        "",
        "*a - b*: difference of the p50s in µs (min-max over blocks of rounds); *paired*: "
        "median of the differences of statements of the same iteration (p25-p75); *a / b*: "
        "ratio of the p50s; *server*: the same from the loops in the server, by "
        f"{data['policy']['server_basis']} time (median of the differences within a pass, "
        "p25-p75; ratio of the medians).",
        "",
        markdown_table(
            [
                "statement",
                "a",
                "b",
                "a - b (µs)",
                "blocks",
                "paired (µs)",
                "a / b",
                "server a - b (µs)",
                "p25-p75",
                "server a / b",
            ],
            [
                [
                    st["statement"],
                    c["a"],
                    c["b"],
                    f"{c['diff_p50_us']:+.1f}",
                    f"{c['blocks_diff_us']['min']:+.1f} to {c['blocks_diff_us']['max']:+.1f}",
                    f"{c['paired_diff_us']['median']:+.1f} "
                    f"({c['paired_diff_us']['p25']:+.1f} to {c['paired_diff_us']['p75']:+.1f})",
                    f"{c['ratio_p50']:.3f}",
                    f"{c['server_diff_us']['median']:+.1f}",
                    f"{c['server_diff_us']['p25']:+.1f} to {c['server_diff_us']['p75']:+.1f}",
                    f"{c['server_ratio']:.3f}",
                ]
                for st in data["policy"]["statements"]
                for c in st["compare"]
            ],
            align="lllrrrrrrr",
        ),
        "",
        "## Row-level security binds the routing role",
        "",
        "Rows the routing role sees (`count(*)`, checked before measuring; the benchmark "
        "stops if any differs from what the policies should admit).",
        "",
        markdown_table(
            ["table, transaction", "rows"],
            [[k, f"{v:,}"] for k, v in data["isolation"].items()],
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
                "/legacy p50",
                "p99",
                "CPU",
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
                    _x(r["legacy"]["p50"]),
                    _x(r["legacy"]["p99"]),
                    f"{r['legacy']['client_cpu_min']:.2f}",
                ]
                for r in data["ratios"]
            ],
            align="rrl" + "r" * 12,
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
        "Raw psycopg as the routing role, no SQLAlchemy: BEGIN, the first statement, one "
        "point select of the table that goes with it, ROLLBACK (one thread, interleaved; "
        "the signed fence's HMAC is computed in Python in the timing, as the router does "
        "for a tenant new to the connection; the old fence runs on the legacy shard).",
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
    console.rule("before (legacy) and after (routed) the signed fence, p50 / setting")
    for r in data["ratios"]:
        console.print(
            f"{_cell(r):<32} before {_x(r['legacy_vs_setting']['p50'])}, "
            f"after {_x(r['setting']['p50'])}, routed/legacy {_x(r['legacy']['p50'])} "
            f"(blocks {_spread(r['legacy']['blocks_p50'])})"
        )
    console.rule("policy cost per statement (p50)")
    for st in data["policy"]["statements"]:
        for c in st["compare"]:
            console.print(
                f"{st['statement']:<6} {c['a']:>22} - {c['b']:<8} {c['diff_p50_us']:+7.1f} µs "
                f"(blocks {c['blocks_diff_us']['min']:+.1f} to {c['blocks_diff_us']['max']:+.1f}"
                f", paired {c['paired_diff_us']['median']:+.1f}), ratio {c['ratio_p50']:.3f}; "
                f"in the server {c['server_diff_us']['median']:+.1f} µs, "
                f"ratio {c['server_ratio']:.3f}"
            )
    functions = data["policy"]["functions"]
    basis = "cpu_us" if data["policy"]["server_basis"] == "cpu" else "wall_us"
    empty = functions["(empty loop)"][basis]["median"]
    console.print(
        "the functions alone, per call in the server, net of the empty loop: "
        + ", ".join(
            f"{name} {f[basis]['median'] - empty:.2f} µs"
            for name, f in functions.items()
            if name != "(empty loop)"
        )
        + f" ({data['policy']['server_basis']} time)"
    )
    model = data["policy"]["server_model"]
    console.print(
        f"server {data['policy']['server_basis']} time added by the signed fence: fence "
        f"{model['fence_extra_us']:+.1f} µs, per point select {model['per_select_extra_us']:+.1f}"
        " µs; per transaction "
        + ", ".join(f"{n} select(s) {v:+.0f} µs" for n, v in model["transaction_extra_us"].items())
    )
    console.rule("other figures")
    for r in data["ratios"]:
        console.print(
            f"{_cell(r):<32} p99 ratios: /setting {_x(r['setting']['p99'])}, "
            f"/bare {_x(r['bare']['p99'])}, /legacy {_x(r['legacy']['p99'])}"
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
        with phase("policy"):
            policy = measure_policy(fleet, cfg, args.seed)
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
        "isolation": fleet.checks,
        "driver": driver,
        "policy": policy,
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
