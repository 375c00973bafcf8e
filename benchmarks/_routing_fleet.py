"""routing_overhead.py's fleet: what a run measures (Config, the variants, the targets),
the models, and the shared and legacy shards with their routing role, filled and checked.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from _common import (
    console,
    insert_tenant_rows,
    revoke_temporary,
)
from sqlalchemy import Engine, String, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import tenantry.router.fence as fence_module
from tenantry import Catalog, Router, Shard, TenantScoped, load_settings
from tenantry.migrations.rls import RlsTable, grant_routing_role, install_rls
from tenantry.settings import TenantrySettings
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import residency
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

# Targets from DESIGN.md ("hot-path facts"): a routed transaction costs no more than
# the hand-written pattern with the same extra statement, close to a bare one, and its
# Python side (client CPU per transaction) at most 10% more than the bare one's.
TARGET_VS_SETTING = 1.00
TARGET_VS_BARE = {1: 1.15, 5: 1.05}
TARGET_CPU_VS_BARE = 1.10
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
        with operator_transaction(shard) as conn:
            conn.execute(
                residency.insert(),
                [
                    {"tenant_id": t, "state": "active", "map_version": version, "updated_at": now}
                    for t in ids
                ],
            )
    insert_tenant_rows(catalog, dict.fromkeys(ids, shard), now)


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
