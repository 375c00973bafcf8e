"""Fixtures of the router suite: a sample app, fleets of shards, seeded tenants.

The sample app tracks projects and their tasks; both tables are ``TenantScoped`` and
the tasks' foreign key includes ``tenant_id`` (DESIGN.md's schema contract).
``Project.loose_tasks`` joins on the project id alone, as a careless relationship
would: only the router's criteria keep it inside the tenant.

Every seeded tenant has the same primary keys (projects 1 and 2, tasks 11, 12, 21,
22) and names that start with its own id, so a leaked row shows at once.

On PostgreSQL the app schema belongs to the superuser (the operations role, the
shard's ``admin_url``); shared shards get row-level security, and routers connect as
``app``, a role that is neither a superuser nor BYPASSRLS (the shard's ``url``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKeyConstraint, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, Shard, TenantScoped, Tier, load_settings
from tenantry.migrations.rls import grant_routing_role, install_rls
from tenantry.settings import TenantrySettings
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.residency import Residency, write_residency
from tenantry.testing import DatabaseFactory, TempPostgres, create_database
from tenantry.urls import libpq_conninfo

APP_ROLE = "app"
#: Shared tenants of the seeded fleet, all on shard "shared-a"; "umbrella" is dedicated.
SHARED_TENANTS = ("acme", "globex", "initech")
DEDICATED_TENANT = "umbrella"
PROJECT_IDS = (1, 2)
TASK_IDS = (11, 12, 21, 22)


class Base(DeclarativeBase):
    pass


class Project(TenantScoped, Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    tasks: Mapped[list[Task]] = relationship(back_populates="project", order_by="Task.id")
    # Joins on the id only: without tenant criteria it would reach every tenant's tasks.
    loose_tasks: Mapped[list[Task]] = relationship(
        primaryjoin="Project.id == foreign(Task.project_id)", viewonly=True, order_by="Task.id"
    )


class Task(TenantScoped, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"]),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    project_id: Mapped[int]
    title: Mapped[str] = mapped_column(String(100))
    project: Mapped[Project] = relationship(back_populates="tasks")


class App:
    """The sample app's models, for tests (conftest modules are not importable)."""

    Base = Base
    Project = Project
    Task = Task
    projects: sa.Table = Project.__table__  # type: ignore[assignment]
    tasks: sa.Table = Task.__table__  # type: ignore[assignment]


@pytest.fixture(scope="session")
def app() -> App:
    """The sample app: ``app.Project``, ``app.Task`` and their tables."""
    return App()


# -- databases --------------------------------------------------------------------------


def seed_rows(tenant: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows every seeded tenant has: same keys for all, names prefixed by the tenant."""
    projects = [{"tenant_id": tenant, "id": p, "name": f"{tenant}-p{p}"} for p in PROJECT_IDS]
    tasks = [
        {"tenant_id": tenant, "id": t, "project_id": t // 10, "title": f"{tenant}-t{t}"}
        for t in TASK_IDS
    ]
    return projects, tasks


def routing_url(admin_url: str) -> str:
    """The same database as the routing role ``app`` (no password: trust auth)."""
    url = sa.make_url(admin_url).set(username=APP_ROLE, password=None)
    return url.render_as_string(hide_password=False)


def ensure_app_role(server_url: str) -> None:
    """Create the routing role on the server, once; make sure it cannot bypass RLS."""
    conninfo = sa.make_url(server_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.DuplicateObject):  # made by another session
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOBYPASSRLS NOSUPERUSER")
        conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN NOBYPASSRLS NOSUPERUSER")


def install_app_schema(admin_url: str, *, rls: bool) -> None:
    """Create the sample app's tables (as the operations role), with RLS if asked."""
    engine = sa.create_engine(admin_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            if rls and conn.dialect.name == "postgresql":
                assert [t.name for t in install_rls(conn)] == ["projects", "tasks"]
    finally:
        engine.dispose()


def new_settings(catalog_url: str, **overrides: Any) -> TenantrySettings:
    """Settings for a test fleet: small pools, short timeouts."""
    values: dict[str, Any] = {
        "catalog_url": catalog_url,
        "connect_timeout": 2,
        "pool_size_shared": 4,
        "pool_size_dedicated": 1,
        "max_overflow": 4,
        "pool_timeout": 5,
        "poll_interval": 0.2,
    }
    values.update(overrides)
    return load_settings(**values)


# -- fleets ------------------------------------------------------------------------------


@dataclass
class Fleet:
    """A catalog and its shards, all of one kind (``sqlite`` or ``postgresql``)."""

    kind: str
    catalog: Catalog
    new_database: Callable[[int], str]  # server number -> URL of a fresh, empty database
    tenants: dict[str, str] = field(default_factory=dict)  # seeded tenant -> shard name
    _routers: list[Any] = field(default_factory=list)
    _main: Router | None = None

    @property
    def pg(self) -> bool:
        return self.kind == "postgresql"

    @property
    def settings(self) -> TenantrySettings:
        return self.catalog.settings

    def add_shard(
        self,
        name: str,
        *,
        tier: Tier | str = Tier.SHARED,
        server: int = 0,
        rls: bool = True,
        admin_url: str | None = None,
        password: str | None = None,
        routing_port: int | None = None,
    ) -> Shard:
        """A new database with the app schema, registered as a shard.

        *admin_url* names the (empty) database to use instead of a new one on *server*;
        *password* goes into the routing URL (trust authentication ignores it), and
        *routing_port* replaces its port (a proxy's, say).
        """
        admin = admin_url or self.new_database(server)
        tier = Tier(tier)
        install_app_schema(admin, rls=rls and tier is Tier.SHARED)
        if not self.pg:
            return self.catalog.add_shard(name, admin, tier=tier)
        url = routing_url(admin)
        if password is not None:
            url = sa.make_url(url).set(password=password).render_as_string(hide_password=False)
        if routing_port is not None:
            url = sa.make_url(url).set(port=routing_port).render_as_string(hide_password=False)
        shard = self.catalog.add_shard(name, url, admin_url=admin, tier=tier)
        with operator_transaction(shard) as conn:
            grant_routing_role(conn, APP_ROLE)
        return shard

    def shard(self, name: str) -> Shard:
        return self.catalog.get_shard(name)

    def add_tenant(self, tenant: str, shard: str, *, seed: bool = True) -> None:
        """Register *tenant* on *shard*; give it the standard rows."""
        tier = self.shard(shard).tier
        self.catalog.add_tenant(tenant, tier=tier, shard=shard)
        if seed:
            self.seed(tenant, shard)

    def seed(self, tenant: str, shard: str) -> None:
        projects, tasks = seed_rows(tenant)
        with operator_transaction(self.shard(shard)) as conn:
            conn.execute(Project.__table__.insert(), projects)
            conn.execute(Task.__table__.insert(), tasks)
        self.tenants[tenant] = shard

    def reset(self) -> None:
        """Put every seeded tenant's rows and residency back as seeded."""
        version = self.catalog.map_version()
        by_shard: dict[str, list[str]] = {}
        for tenant, shard in self.tenants.items():
            by_shard.setdefault(shard, []).append(tenant)
        for shard, tenants in by_shard.items():
            with operator_transaction(self.shard(shard)) as conn:
                conn.execute(Task.__table__.delete())
                conn.execute(Project.__table__.delete())
                for tenant in tenants:
                    projects, tasks = seed_rows(tenant)
                    conn.execute(Project.__table__.insert(), projects)
                    conn.execute(Task.__table__.insert(), tasks)
                    write_residency(conn, tenant, Residency.ACTIVE, version)

    def rows(self, shard: str, table: str = "projects") -> list[tuple[Any, ...]]:
        """Every row of *table* on *shard*, every tenant's, read as the operations role."""
        source = Base.metadata.tables[table]
        with operator_transaction(self.shard(shard)) as conn:
            query = sa.select(source).order_by(*source.primary_key.columns)
            return [tuple(row) for row in conn.execute(query)]

    def set_residency(self, tenant: str, shard: str, state: Residency) -> None:
        with operator_transaction(self.shard(shard)) as conn:
            write_residency(conn, tenant, state, self.catalog.map_version())

    def new_router(self, **kwargs: Any) -> Router:
        """A router of its own (closed at teardown); no background refresh by default."""
        kwargs.setdefault("background", False)
        kwargs.setdefault("catalog", self.catalog)
        router = Router(**kwargs)
        self._routers.append(router)
        return router

    @property
    def router(self) -> Router:
        """The fleet's shared router (no background refresh)."""
        if self._main is None:
            self._main = self.new_router()
        return self._main

    def location(self, shard: str) -> str:
        """What a routed connection reports as its database (see :func:`where`)."""
        url = sa.make_url(self.shard(shard).url)
        assert url.database is not None
        return url.database if self.pg else os.path.realpath(url.database)

    def close(self) -> None:
        for router in self._routers:
            router.close()
        self._routers.clear()
        self._main = None
        self.catalog.close()


def where(conn: sa.Connection) -> str:
    """The database a connection is on: PostgreSQL's name, or SQLite's file."""
    if conn.dialect.name == "postgresql":
        return str(conn.exec_driver_sql("SELECT current_database()").scalar_one())
    main = conn.exec_driver_sql("PRAGMA database_list").all()[0]
    return os.path.realpath(main[2])


FleetBuilder = Callable[..., Fleet]


def _builder(
    kind: str, dbs: DatabaseFactory | None, directory: Path, made: list[Fleet]
) -> FleetBuilder:
    numbers = count(1)

    def new_database(server: int) -> str:
        if dbs is None:
            return f"sqlite:///{directory / f'db-{next(numbers)}.db'}"
        return dbs(server % len(dbs.servers))

    def build(**settings: Any) -> Fleet:
        catalog_url = new_database(0)
        catalog = Catalog(catalog_url, settings=new_settings(catalog_url, **settings))
        catalog.init()
        fleet = Fleet(kind=kind, catalog=catalog, new_database=new_database)
        made.append(fleet)
        return fleet

    return build


class OwnServer:
    """A PostgreSQL server of one test module's own, to restart, stop and start again
    (``pg_ctl`` as the ``postgres`` user, like :class:`TempPostgres` itself)."""

    def __init__(self, server: TempPostgres) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def new_database(self) -> str:
        return create_database(self.server.url)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated; back when it returns."""
        log = str(self.server.log_file)
        self.server._pg_ctl("restart", "-m", "fast", "-w", "-l", log, timeout=60)

    def stop(self) -> None:
        self.server._pg_ctl("stop", "-m", "fast", "-w", timeout=60)

    def start(self) -> None:
        log = str(self.server.log_file)
        self.server._pg_ctl("start", "-w", "-l", log, timeout=60)

    def backends(self, database: str, role: str = APP_ROLE) -> list[int]:
        """The pids of *role*'s connections to *database*."""
        with psycopg.connect(libpq_conninfo(self.url), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                (database, role),
            ).fetchall()
        return sorted(int(r[0]) for r in rows)

    def terminate(self, database: str, role: str = APP_ROLE) -> list[int]:
        """Terminate *role*'s connections to *database*; return when they are gone."""
        with psycopg.connect(libpq_conninfo(self.url), autocommit=True) as conn:
            rows = conn.execute(
                # With a timeout, pg_terminate_backend waits until the process exits.
                "SELECT pid, pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                "WHERE datname = %s AND usename = %s",
                (database, role),
            ).fetchall()
        assert all(r[1] for r in rows), f"backends did not exit: {rows}"
        return sorted(int(r[0]) for r in rows)


@pytest.fixture(scope="module")
def own_pg_server() -> Iterator[OwnServer]:
    """A throwaway PostgreSQL server of this module's own, with the routing role."""
    server = TempPostgres.start(name="tenantry-own")
    try:
        ensure_app_role(server.url)
        yield OwnServer(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def app_role(pg_servers: list[str]) -> str:
    """The routing role, present on every test server."""
    for server in dict.fromkeys(pg_servers):
        ensure_app_role(server)
    return APP_ROLE


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_builder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetBuilder]:
    """``build(**settings) -> Fleet``: empty fleets of this test's kind, closed after it."""
    made: list[Fleet] = []
    if request.param == "postgresql":
        request.getfixturevalue("app_role")
        dbs: DatabaseFactory | None = request.getfixturevalue("make_pg_database")
    else:
        dbs = None
    yield _builder(request.param, dbs, tmp_path, made)
    for fleet in made:
        fleet.close()


@pytest.fixture
def pg_fleet_builder(
    app_role: str, make_pg_database: DatabaseFactory, tmp_path: Path
) -> Iterator[FleetBuilder]:
    """Like ``fleet_builder``, PostgreSQL only."""
    made: list[Fleet] = []
    yield _builder("postgresql", make_pg_database, tmp_path, made)
    for fleet in made:
        fleet.close()


def seeded_fleet(build: FleetBuilder) -> Fleet:
    """Three shared tenants on "shared-a" (server 0), one dedicated on "solo" (server 1)."""
    fleet = build()
    fleet.add_shard("shared-a", server=0)
    fleet.add_shard("solo", tier=Tier.DEDICATED, server=1)
    for tenant in SHARED_TENANTS:
        fleet.add_tenant(tenant, "shared-a")
    fleet.add_tenant(DEDICATED_TENANT, "solo")
    return fleet


@pytest.fixture(scope="module")
def _sqlite_seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    made: list[Fleet] = []
    fleet = seeded_fleet(_builder("sqlite", None, tmp_path_factory.mktemp("fleet"), made))
    yield fleet
    fleet.close()


@pytest.fixture(scope="module")
def _pg_seeded(
    pg_servers: list[str], app_role: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    made: list[Fleet] = []
    with DatabaseFactory(pg_servers) as dbs:
        fleet = seeded_fleet(_builder("postgresql", dbs, tmp_path_factory.mktemp("fleet"), made))
        yield fleet
        fleet.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest) -> Fleet:
    """The module's seeded fleet, reset to its seed rows; once per kind of database."""
    name = "_pg_seeded" if request.param == "postgresql" else "_sqlite_seeded"
    seeded: Fleet = request.getfixturevalue(name)
    seeded.reset()
    return seeded


@pytest.fixture
def pg_fleet(_pg_seeded: Fleet) -> Fleet:
    """The module's seeded PostgreSQL fleet, reset to its seed rows."""
    _pg_seeded.reset()
    return _pg_seeded


@pytest.fixture
def sqlite_fleet(_sqlite_seeded: Fleet) -> Fleet:
    """The module's seeded SQLite fleet, reset to its seed rows."""
    _sqlite_seeded.reset()
    return _sqlite_seeded


# -- the other tenants' rows, checksummed ---------------------------------------------------


@dataclass
class ForeignRows:
    """Every tenant's rows but *tenant*'s, checksummed, to prove a probe saw and changed
    none of them: the md5 of the sorted rows of each table on each shard, read as the
    operations role, before and after; and a look at everything the probe got back."""

    fleet: Fleet
    tenant: str
    baseline: dict[str, str] = field(default_factory=dict)

    @property
    def others(self) -> list[str]:
        return [tenant for tenant in self.fleet.tenants if tenant != self.tenant]

    def digests(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for shard in sorted(set(self.fleet.tenants.values())):
            for table in ("projects", "tasks"):
                rows = sorted(r for r in self.fleet.rows(shard, table) if r[0] != self.tenant)
                digest = hashlib.md5(repr(rows).encode(), usedforsecurity=False)
                found[f"{shard}.{table}"] = digest.hexdigest()
        return found

    def snapshot(self) -> None:
        """Take the checksums now (after a test's own set-up rows, say)."""
        self.baseline = self.digests()

    def unchanged(self) -> None:
        assert self.digests() == self.baseline, "another tenant's rows changed"

    def unseen(self, seen: Any) -> None:
        """Nothing in *seen* (rows, ORM objects, values; nested) is another tenant's."""
        prefixes = tuple(f"{other}-" for other in self.others)
        for value in _values(seen):
            if isinstance(value, str):
                leaked = value in self.others or value.startswith(prefixes)
                assert not leaked, f"{self.tenant} saw {value!r}"


def _values(seen: Any) -> Iterator[Any]:
    if isinstance(seen, str | int | float | type(None)):
        yield seen
    elif isinstance(seen, dict):
        for value in seen.values():
            yield from _values(value)
    elif isinstance(seen, TenantScoped):
        state = sa.inspect(seen)
        yield from (state.dict.get(attr.key) for attr in state.mapper.column_attrs)
    elif isinstance(seen, sa.Row | tuple | list | set):
        for value in seen:
            yield from _values(value)
    else:
        yield str(seen)


@pytest.fixture
def foreign_rows() -> Callable[..., ForeignRows]:
    """``foreign_rows(fleet, tenant="acme")``: the other tenants' rows, checksummed now."""

    def take(fleet: Fleet, tenant: str = "acme") -> ForeignRows:
        guard = ForeignRows(fleet, tenant)
        guard.snapshot()
        return guard

    return take
