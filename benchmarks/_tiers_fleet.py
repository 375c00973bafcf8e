"""tiers.py's fleet: what a run measures (Config), the servers, roles, template databases,
and the layouts (one catalog and router per tier and N) built and seeded from them.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import (
    console,
    insert_tenant_rows,
    pg_servers,
    revoke_temporary,
)
from psycopg import sql
from sqlalchemy.engine import make_url

from tenantry import (
    Catalog,
    Router,
    Shard,
    Tier,
    load_settings,
)
from tenantry.demo import MIGRATIONS
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.settings import TenantrySettings
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


def conninfo(url: str) -> str:
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
            with psycopg.connect(conninfo(url), autocommit=True) as conn:
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
                with psycopg.connect(conninfo(url), autocommit=True) as conn:
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
                with psycopg.connect(conninfo(url)) as conn:
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
    with psycopg.connect(conninfo(servers.admin[0])) as conn:
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
    url = servers.create(server, name.replace("-", "_"), template=templates.names[server])
    # A copy does not inherit the template's database privileges.
    revoke_temporary(url)
    return url


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
    insert_tenant_rows(catalog, placement, now)


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
    with psycopg.connect(conninfo(admin_url)) as conn:
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
        with psycopg.connect(conninfo(url)) as conn:
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
