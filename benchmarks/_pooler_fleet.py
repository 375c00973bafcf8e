"""pooler.py's fleets: what a run measures (Config), the server, the two PgBouncers, the
shared-shard fleet of question 1, the 200 dedicated databases of question 2, the
sampler of the server's connections, and the router processes of question 2.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import console, insert_tenant_rows, pg_servers, revoke_temporary
from psycopg import sql
from sqlalchemy import Engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, Shard, TenantScoped, Tier, load_settings
from tenantry.migrations.rls import RlsTable, grant_routing_role, install_rls
from tenantry.shardmap.catalog.shards import prepare_shard
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import residency
from tenantry.testing import create_database, drop_database
from tenantry.testing.pgbouncer import TempPgBouncer

NAME = "pooler"
PATHS = ("direct", "pooled")
#: Question 2's variants: direct; PgBouncer with a cap for the routing role; PgBouncer
#: with one server connection per database and no cap.
PATHS_2 = ("direct", "pooled", "pooled-1")
PATH_LABELS = {
    "direct": "direct",
    "pooled": "PgBouncer, 2 per database, 40 in all",
    "pooled-1": "PgBouncer, 1 per database, no cap",
}
ROUTES = ("routed", "bare")
KINDS = ("select", "update")
KIND_LABELS = {"select": "1 select, rolled back", "update": "1 select + 1 update, committed"}
#: Room for question 2's direct routers (4 processes x 200 databases, pools of up to 7).
MAX_CONNECTIONS = 1500


@dataclass(frozen=True)
class Config:
    """How much of everything to run."""

    mode: str
    # Question 1: a shared shard, direct and through PgBouncer.
    tenants: int = 20
    rows_per_tenant: int = 50
    rounds: int = 30
    # Transactions per client thread per cell per round, by client threads.
    batch: tuple[tuple[int, int], ...] = ((8, 6), (64, 2))
    warmup_batches: int = 2
    #: PgBouncer's server connections per (database, user) in question 1. 20 (PgBouncer's
    #: own default): more than 8 clients, so only the 64-thread runs queue at the pooler,
    #: and several times the 2 cores, so the server is never short of backends.
    pool_size_1: int = 20
    #: The router's (and the bare engines') pool on the shared shard: one connection per
    #: client thread, so the direct runs are bounded by the client, not by SQLAlchemy.
    router_pool: int = 64
    router_overflow: int = 8
    # Question 2: 4 router processes, 200 dedicated databases.
    databases: int = 200
    processes: int = 4
    threads_per_process: int = 2
    window_s: float = 10.0
    rounds_2: int = 2
    #: PgBouncer in question 2: 2 server connections per database (a dedicated tenant
    #: rarely runs more at once), at most 40 for the routing role across all databases
    #: (max_user_connections; the idlest is closed when another database needs one).
    pool_size_2: int = 2
    user_cap_2: int = 40
    #: The second pooled variant: one server connection per database and no cap, so a
    #: database keeps its connection (at most one per database used).
    pool_size_2b: int = 1
    sample_interval_s: float = 0.1

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(n for n, _size in self.batch)


FULL = Config(mode="full")
QUICK = Config(
    mode="quick",
    rounds=4,
    batch=((8, 4), (64, 1)),
    warmup_batches=1,
    databases=40,
    window_s=3.0,
    rounds_2=1,
)


class Base(DeclarativeBase):
    pass


class PoolReading(TenantScoped, Base):
    """The rows of question 1 (a shared shard, under row-level security when routed)."""

    __tablename__ = "pool_readings"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]
    kwh: Mapped[float]


class PoolItem(TenantScoped, Base):
    """The rows of question 2 (one tenant per dedicated database)."""

    __tablename__ = "pool_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


ITEMS = 10


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- the server, roles, PgBouncer ------------------------------------------------------------


@contextmanager
def bench_server(urls: Sequence[str] | None) -> Iterator[str]:
    """A superuser URL: the given server's, or one started with MAX_CONNECTIONS."""
    if urls:
        with pg_servers(urls, count=1) as given:
            with psycopg.connect(conninfo(given[0])) as conn:
                row = conn.execute("SHOW max_connections").fetchone()
            if row is not None and int(row[0]) < MAX_CONNECTIONS:
                console.print(
                    f"[yellow]max_connections is {row[0]}; question 2's direct routers may "
                    f"need up to {MAX_CONNECTIONS}"
                )
            yield given[0]
        return
    from tenantry.testing import PostgresServers

    settings = {"max_connections": str(MAX_CONNECTIONS)}
    with PostgresServers(count=1, name="tenantry-bench", settings=settings) as servers:
        yield servers.urls[0]


@dataclass
class Role:
    name: str
    password: str

    def url(self, admin_url: str) -> str:
        """*admin_url*'s database as this role."""
        return (
            make_url(admin_url)
            .set(username=self.name, password=self.password)
            .render_as_string(hide_password=False)
        )


def routing_role(server: str, label: str, stack: ExitStack) -> Role:
    """A LOGIN NOSUPERUSER NOBYPASSRLS role, dropped when *stack* closes."""
    import secrets

    role = Role(f"bench_{label}_{secrets.token_hex(3)}", secrets.token_hex(12))
    with psycopg.connect(conninfo(server), autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
                " NOINHERIT PASSWORD {}"
            ).format(sql.Identifier(role.name), sql.Literal(role.password))
        )
    if DROP["databases"]:  # else it owns rights in databases that stay
        stack.callback(_drop_role, server, role.name)
    return role


def _drop_role(server: str, name: str) -> None:
    try:
        with psycopg.connect(conninfo(server), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:  # a throwaway server goes anyway
        console.print(f"[yellow]could not drop role {name}: {exc}")


#: Whether databases made here are dropped at the end (not on a throwaway server: they
#: go with it, and 200 DROP DATABASEs take a while).
DROP = {"databases": True}


def new_database(server: str, stack: ExitStack, *, template: str | None = None) -> str:
    url = create_database(server, template=template)
    if DROP["databases"]:
        stack.callback(_drop_quietly, url)
    return url


def _drop_quietly(url: str) -> None:
    try:
        drop_database(url)
    except sa.exc.SQLAlchemyError as exc:
        console.print(f"[yellow]could not drop {make_url(url).database}: {exc}")


def start_pgbouncer(
    server: str, roles: Sequence[Role], pool_size: int, settings: dict[str, str], stack: ExitStack
) -> TempPgBouncer:
    bouncer = TempPgBouncer.start(
        server,
        users=("postgres", *(r.name for r in roles)),
        default_pool_size=pool_size,
        settings={"max_client_conn": "5000", **settings},
    )
    stack.callback(bouncer.stop)
    return bouncer


# -- the server's connections ------------------------------------------------------------------

SAMPLE = (
    "SELECT datname, usename, count(*), count(*) FILTER (WHERE state <> 'idle')"
    " FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    " GROUP BY 1, 2"
)


class Sampler:
    """Counts the server's client backends every *interval* seconds in a thread: by
    database and by user, all of them (``held``) and those not idle (``busy``)."""

    def __init__(self, server: str, interval: float) -> None:
        self._conn = psycopg.connect(conninfo(server), autocommit=True)
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[tuple[float, dict[tuple[str, str], tuple[int, int]]]] = []

    def sample(self) -> dict[tuple[str, str], tuple[int, int]]:
        rows = self._conn.execute(SAMPLE).fetchall()
        return {(str(d), str(u)): (int(h), int(b)) for d, u, h, b in rows}

    def sessions(self) -> int:
        """Sessions the server has opened so far (all databases; PostgreSQL 14+)."""
        row = self._conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def terminate(self, user: str) -> None:
        """End every backend of *user* (after its clients have gone: PgBouncer's idle
        server connections), so the next window starts from none."""
        self._conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [user]
        )

    def start(self) -> None:
        self.samples.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.sample()))
            self._stop.wait(self._interval)

    def stop(self) -> list[tuple[float, dict[tuple[str, str], tuple[int, int]]]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return list(self.samples)

    def close(self) -> None:
        self._conn.close()


def connection_figures(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Peak and mean of held and busy server connections over samples."""
    if not counts:
        return {"samples": 0}
    held = [h for h, _b in counts]
    busy = [b for _h, b in counts]
    return {
        "samples": len(counts),
        "held_peak": max(held),
        "held_mean": sum(held) / len(held),
        "busy_peak": max(busy),
        "busy_mean": sum(busy) / len(busy),
    }


def wait_for_no_backends(sampler: Sampler, user: str, timeout: float = 30.0) -> None:
    """Until *user* has no backend left on the server (processes that exited)."""
    deadline = time.monotonic() + timeout
    while any(u == user for (_d, u) in sampler.sample()):
        if time.monotonic() > deadline:
            console.print(f"[yellow]{user} still has backends after {timeout:.0f} s")
            return
        time.sleep(0.1)


# -- question 1: one shared shard, direct and pooled -------------------------------------------


@dataclass
class SharedFleet:
    catalog: Catalog
    router: Router
    tenants: dict[str, list[str]]  # path: tenant ids
    bare: dict[str, Engine]  # path: engine on a database like the shard, without RLS
    databases: dict[tuple[str, str], str]  # (route, path): database name
    pooled: dict[str, bool] = field(default_factory=dict)  # shard: as the catalog says


def _fill(admin_url: str, ids: Sequence[str], rows: int, role: Role, *, rls: bool) -> None:
    engine = make_engine(admin_url, poolclass=NullPool)
    try:
        Base.metadata.create_all(engine, tables=[Base.metadata.tables["pool_readings"]])
        with engine.begin() as conn:
            conn.execute(
                sa.insert(PoolReading),
                [
                    {"tenant_id": t, "id": i, "n": 0, "kwh": i * 1.5}
                    for t in ids
                    for i in range(1, rows + 1)
                ],
            )
            if rls:
                install_rls(conn, [RlsTable("public", "pool_readings")])
                grant_routing_role(conn, role.name, [RlsTable("public", "pool_readings")])
            else:
                conn.exec_driver_sql(f"GRANT SELECT, UPDATE ON pool_readings TO {role.name}")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE pool_readings")
    finally:
        engine.dispose()


def build_shared(
    server: str, role: Role, bouncer: TempPgBouncer, cfg: Config, stack: ExitStack
) -> SharedFleet:
    catalog_url = new_database(server, stack)
    settings = load_settings(
        catalog_url=catalog_url,
        pool_size_shared=cfg.router_pool,
        max_overflow=cfg.router_overflow,
        pool_timeout=60.0,
        routers_per_server=1,  # the only router on this server: its share is the server
    )
    catalog = stack.enter_context(Catalog(catalog_url, settings=settings))
    catalog.init()
    tenants: dict[str, list[str]] = {}
    bare: dict[str, Engine] = {}
    databases: dict[tuple[str, str], str] = {}
    pooled: dict[str, bool] = {}
    for path in PATHS:
        admin = new_database(server, stack)
        revoke_temporary(admin)
        url = role.url(admin)
        if path == "pooled":
            url = bouncer.url(url)
        # The pooler is found by add_shard itself (one query through the routing URL).
        shard = catalog.add_shard(f"shared-{path}", url, admin_url=admin)
        pooled[shard.name] = shard.pooled
        if shard.pooled != (path == "pooled"):
            raise RuntimeError(f"shard {shard.name}: pooled={shard.pooled}, not as built")
        ids = [f"{path[0]}{i:03d}" for i in range(cfg.tenants)]
        _fill(admin, ids, cfg.rows_per_tenant, role, rls=True)
        _register(catalog, shard, ids)
        tenants[path] = ids
        databases[("routed", path)] = make_url(admin).database or ""
        # The bare variant: the same rows in a database of its own (so its server
        # connections are counted apart), without row-level security.
        bare_admin = new_database(server, stack)
        _fill(bare_admin, ids, cfg.rows_per_tenant, role, rls=False)
        bare_url = role.url(bare_admin)
        options: dict[str, Any] = {}
        if path == "pooled":
            bare_url = bouncer.url(bare_url)
            # What the router does on a pooled shard: nothing prepared on the server.
            options["connect_args"] = {"prepare_threshold": None}
        engine = make_engine(
            bare_url,
            pool_size=cfg.router_pool,
            max_overflow=cfg.router_overflow,
            pool_timeout=60.0,
            **options,
        )
        stack.callback(engine.dispose)
        bare[path] = engine
        databases[("bare", path)] = make_url(bare_admin).database or ""
    router = Router(catalog=catalog, settings=settings)
    stack.callback(router.close)
    fleet = SharedFleet(catalog, router, tenants, bare, databases, pooled)
    check_shared(fleet, cfg)
    return fleet


def _register(catalog: Catalog, shard: Shard, ids: Sequence[str]) -> None:
    """Residency rows on the shard, then the catalog rows (add_tenant, in bulk)."""
    now = datetime.now(UTC)
    version = catalog.map_version() + 1
    with operator_transaction(shard) as conn:
        conn.execute(
            residency.insert(),
            [
                {"tenant_id": t, "state": "active", "map_version": version, "updated_at": now}
                for t in ids
            ],
        )
    insert_tenant_rows(catalog, dict.fromkeys(ids, shard), now)


def check_shared(fleet: SharedFleet, cfg: Config) -> None:
    """Each routed path sees exactly its tenant's rows (the policies bind the routing
    role through the pooler too), and the bare engines see every row."""
    count = sa.text("SELECT count(*) FROM pool_readings")
    for path in PATHS:
        tenant = fleet.tenants[path][0]
        with fleet.router.session(tenant) as session:
            seen = int(session.execute(count).scalar_one())
        if seen != cfg.rows_per_tenant:
            raise RuntimeError(f"{path}: a routed session sees {seen} rows, not its tenant's")
        with Session(fleet.bare[path]) as session:
            seen = int(session.execute(count).scalar_one())
        if seen != cfg.rows_per_tenant * cfg.tenants:
            raise RuntimeError(f"{path}: a bare session sees {seen} rows, not all")


def transaction(
    fleet: SharedFleet, route: str, path: str, kind: str, rng: random.Random, cfg: Config
) -> None:
    """One transaction of question 1."""
    tenant = rng.choice(fleet.tenants[path])
    row = rng.randint(1, cfg.rows_per_tenant)
    query = select(PoolReading).where(PoolReading.tenant_id == tenant, PoolReading.id == row)
    opened = fleet.router.session(tenant) if route == "routed" else Session(fleet.bare[path])
    with opened as session:
        session.execute(query).scalar_one()
        if kind == "update":
            session.execute(
                update(PoolReading)
                .where(PoolReading.tenant_id == tenant, PoolReading.id == row)
                .values(n=PoolReading.n + 1)
                .execution_options(synchronize_session=False)
            )
            session.commit()


# -- question 2: 200 dedicated databases ---------------------------------------------------------


@dataclass
class DedicatedFleet:
    catalog_urls: dict[str, str]  # path: catalog URL
    tenants: list[str]
    users: dict[str, str]  # path: routing role name
    settings: dict[str, Any]


def build_dedicated(
    server: str,
    roles: dict[str, Role],
    bouncers: dict[str, TempPgBouncer],
    cfg: Config,
    stack: ExitStack,
) -> DedicatedFleet:
    """*cfg.databases* copies of one template (tenantry's shard schema, ``pool_items``
    granted to every routing role), one tenant each, registered in one catalog per
    variant (``PATHS_2``): each routes as a role of its own, to the server or through
    its PgBouncer (``bouncers[path]``). Operations URLs are the server's in all."""
    template = new_database(server, stack)
    prepare_shard(Shard(name="template", url=template, admin_url=template))
    engine = make_engine(template, poolclass=NullPool)
    try:
        Base.metadata.create_all(engine, tables=[Base.metadata.tables["pool_items"]])
        with engine.begin() as conn:
            for role in roles.values():
                grant_routing_role(conn, role.name, [RlsTable("public", "pool_items")])
    finally:
        engine.dispose()
    template_name = make_url(template).database
    tenants = [f"ded{i:03d}" for i in range(cfg.databases)]
    with ThreadPoolExecutor(4) as pool:
        copies = list(
            pool.map(lambda _i: new_database(server, stack, template=template_name), tenants)
        )
        # A copy does not inherit the template's database privileges.
        with psycopg.connect(conninfo(server), autocommit=True) as conn:
            for url in copies:
                conn.execute(
                    sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(make_url(url).database or "")
                    )
                )
        list(pool.map(_seed_dedicated, copies, tenants))
    settings = {"max_engines": 512, "connection_budget": 4000}
    catalog_urls: dict[str, str] = {}
    for path in PATHS_2:
        catalog_url = new_database(server, stack)
        catalog_urls[path] = catalog_url
        with Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url)) as catalog:
            catalog.init()
            placement: dict[str, Shard] = {}
            for tenant, admin in zip(tenants, copies, strict=True):
                url = roles[path].url(admin)
                if path in bouncers:
                    url = bouncers[path].url(url)
                # Schema from the template already; said pooled or not, not detected.
                placement[tenant] = catalog.add_shard(
                    f"d-{tenant}",
                    url,
                    admin_url=admin,
                    tier=Tier.DEDICATED,
                    prepare=False,
                    pooled=path in bouncers,
                )
            insert_tenant_rows(catalog, placement, datetime.now(UTC))
    users = {path: roles[path].name for path in PATHS_2}
    return DedicatedFleet(catalog_urls, tenants, users, settings)


def _seed_dedicated(admin_url: str, tenant: str) -> None:
    with psycopg.connect(conninfo(admin_url)) as conn:
        conn.execute(
            "INSERT INTO tenantry_residency (tenant_id, state, map_version, updated_at)"
            " VALUES (%s, 'active', 1, now())",
            [tenant],
        )
        conn.execute(
            "INSERT INTO pool_items (tenant_id, id, n) SELECT %s, i, 0"
            " FROM generate_series(1, %s) AS i",
            [tenant, ITEMS],
        )


def router_process(
    catalog_url: str,
    settings: dict[str, Any],
    tenants: list[str],
    threads: int,
    window_s: float,
    seed: int,
    barrier: Any,
    results: Any,
) -> None:
    """One application process of question 2: a Router of its own, one transaction to
    every tenant first (its pools open on every database), then *threads* threads
    routing 1-select transactions to random tenants for *window_s* seconds."""
    loaded = load_settings(catalog_url=catalog_url, **settings)
    catalog = Catalog(catalog_url, settings=loaded)
    router = Router(catalog=catalog, settings=loaded)
    try:
        rng = random.Random(seed)

        def one(tenant: str, row: int) -> None:
            with router.session(tenant) as session:
                session.execute(
                    select(PoolItem).where(PoolItem.tenant_id == tenant, PoolItem.id == row)
                ).scalar_one()

        for tenant in rng.sample(tenants, len(tenants)):
            one(tenant, 1)
        barrier.wait()
        started = time.monotonic()
        deadline = started + window_s

        def worker(n: int) -> list[int]:
            mine = random.Random(seed * 100 + n)
            out = []
            while time.monotonic() < deadline:
                t0 = time.perf_counter_ns()
                one(mine.choice(tenants), mine.randint(1, ITEMS))
                out.append(time.perf_counter_ns() - t0)
            return out

        with ThreadPoolExecutor(threads) as pool:
            latencies = [x for part in pool.map(worker, range(threads)) for x in part]
        wall = time.monotonic() - started
        results.put({"latencies_ns": latencies, "wall_s": wall})
    except BaseException as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        router.close()
        catalog.close()


def by_user(
    samples: Sequence[tuple[float, dict[tuple[str, str], tuple[int, int]]]],
) -> dict[str, list[tuple[int, int]]]:
    """Per user: (held, busy) in every sample (0 when absent)."""
    users = {u for _t, s in samples for (_d, u) in s}
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _t, sample in samples:
        for user in users:
            held = sum(h for (_d, u), (h, _b) in sample.items() if u == user)
            busy = sum(b for (_d, u), (_h, b) in sample.items() if u == user)
            out[user].append((held, busy))
    return out


def by_database(
    samples: Sequence[tuple[float, dict[tuple[str, str], tuple[int, int]]]],
) -> dict[str, list[tuple[int, int]]]:
    """Per database: (held, busy) in every sample (0 when absent)."""
    names = {d for _t, s in samples for (d, _u) in s}
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _t, sample in samples:
        for name in names:
            held = sum(h for (d, _u), (h, _b) in sample.items() if d == name)
            busy = sum(b for (d, _u), (_h, b) in sample.items() if d == name)
            out[name].append((held, busy))
    return out
