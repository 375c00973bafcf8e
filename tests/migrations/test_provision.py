"""Provisioning: create a database, migrate it, register it; or leave nothing behind."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import (
    BROKEN,
    COUNTING,
    PASSWORD,
    RAISING,
    Cli,
    database_exists,
    query,
    revision,
    tables,
    with_password,
)
from sqlalchemy.engine import make_url

from tenantry import Catalog, Shard, load_settings, migrations
from tenantry.demo import MIGRATIONS
from tenantry.errors import (
    ConfigurationError,
    InvalidShardName,
    ProvisionError,
    ShardExists,
)
from tenantry.migrations.fleet import app_config, migrate_shard
from tenantry.testing import DatabaseFactory, drop_database

UNREACHABLE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    settings = load_settings(catalog_url=url, alembic_config=str(MIGRATIONS))
    with Catalog(url, settings=settings) as cat:
        cat.init()
        yield cat


@pytest.fixture
def server(pg_servers: list[str]) -> str:
    """Server 0 as the operations role, with a password."""
    return with_password(pg_servers[0])


@pytest.fixture
def new_name(pg_servers: list[str]) -> Iterator[Callable[[], str]]:
    """Fresh database (and shard) names; whatever exists under them is dropped after."""
    names: list[str] = []

    def make() -> str:
        names.append(f"p-{secrets.token_hex(4)}")  # '-' needs quoting in SQL
        return names[-1]

    yield make
    for name in names:
        drop_database(make_url(pg_servers[0]).set(database=name).render_as_string(False))


def everything(catalog: Catalog) -> tuple[int, list[dict[str, Any]]]:
    snap = catalog.snapshot()
    return snap.version, sorted((dataclasses.asdict(s) for s in snap.shards.values()), key=repr)


def cli(catalog: Catalog) -> Cli:
    return Cli(catalog.settings.catalog_url, {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)})


def test_provision_creates_migrates_and_registers(
    catalog: Catalog,
    server: str,
    new_name: Callable[[], str],
    make_role: Callable[..., str],
) -> None:
    name = new_name()
    shard = migrations.provision(catalog, name, server)
    assert shard == catalog.get_shard(name)
    assert shard.tier.value == "dedicated" and shard.admin_url is None
    assert make_url(shard.url).database == name
    assert database_exists(server, name)
    assert revision(shard.url) == "d0002"
    assert tables(shard.url) >= {"users", "chargers", "charging_sessions", "tenantry_residency"}

    # a shared shard with a routing role of its own: policies installed, role granted
    app = make_role()
    shared = migrations.provision(
        catalog, new_name(), server, tier="shared", routing_url=with_password(server, user=app)
    )
    assert make_url(shared.url).username == app
    assert shared.admin_url is not None and make_url(shared.admin_url).username == "postgres"
    assert query(shared.url, "SELECT count(*) FROM chargers") == [(0,)]  # granted
    # four policies (read, insert, update, delete) on each of the three tenant tables
    assert len(query(shared.admin_url, "SELECT 1 FROM pg_policies")) == 12
    assert [s.name for s in catalog.list_shards()] == sorted([name, shared.name])


def test_shard_create_command(catalog: Catalog, server: str, new_name: Callable[[], str]) -> None:
    name, database = new_name(), new_name()
    doc = cli(catalog).json("shard", "create", name, "--server", server, "--database", database)
    assert doc["name"] == name and doc["tier"] == "dedicated"
    assert doc["url"] == f"postgresql+psycopg://postgres:***@{make_url(server).host}:" + (
        f"{make_url(server).port}/{database}"
    )
    assert database_exists(server, database) and not database_exists(server, name)
    assert revision(catalog.get_shard(name).url) == "d0002"

    other = new_name()
    out = cli(catalog)("shard", "create", other, "--server", server, "--tier", "shared")
    assert out.strip().startswith(
        f"created shared shard {other} (postgresql+psycopg://postgres:***@"
    )
    assert out.strip().endswith("migrated to head")
    assert catalog.get_shard(other).tier.value == "shared"


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        (BROKEN, "function no_such_function() does not exist"),
        (RAISING, "cannot backfill [users]: 3 rows without an email"),
    ],
    ids=["database error", "python error"],
)
def test_a_failed_migration_leaves_nothing_behind(
    catalog: Catalog,
    server: str,
    new_name: Callable[[], str],
    make_pg_database: DatabaseFactory,
    scripts: Path,
    message: str,
) -> None:
    catalog.add_shard("existing", with_password(make_pg_database(0)))
    before = everything(catalog)
    name = new_name()
    with pytest.raises(ProvisionError) as caught:
        migrations.provision(catalog, name, server, alembic_config=scripts)
    assert str(caught.value) == (
        f"database {name!r} was created but could not be migrated ({message}); it was dropped again"
    )
    assert caught.value.shard == name
    assert not database_exists(server, name)
    assert everything(catalog) == before

    error = cli(catalog).error(
        "shard", "create", name, "--server", server, "--alembic-config", str(scripts)
    )
    assert error == f"error: {caught.value}"
    assert not database_exists(server, name)
    assert everything(catalog) == before


def test_an_existing_database_is_refused_and_kept(
    catalog: Catalog, server: str, make_pg_database: DatabaseFactory
) -> None:
    taken = make_pg_database(0, name=f"taken_{secrets.token_hex(4)}")
    query(taken, "CREATE TABLE precious (v text)")
    query(taken, "INSERT INTO precious VALUES ('still here')")
    database = make_url(taken).database
    assert database is not None
    expected = (
        f"database {database!r} exists already on "
        f"postgresql+psycopg://postgres:***@{make_url(server).host}:{make_url(server).port}/"
        "postgres: register it with `tenantry shard add`, or choose another name"
    )
    with pytest.raises(ProvisionError) as caught:
        migrations.provision(catalog, database, server)
    assert str(caught.value) == expected
    error = cli(catalog).error(
        "shard", "create", "other", "--server", server, "--database", database
    )
    assert error == f"error: {expected}"
    assert query(taken, "SELECT v FROM precious") == [("still here",)]
    assert revision(taken) is None  # not migrated either
    assert catalog.list_shards() == []


def test_a_registered_shard_name_is_refused_before_anything_is_created(
    catalog: Catalog, server: str, new_name: Callable[[], str]
) -> None:
    name = new_name()
    migrations.provision(catalog, name, server)
    before = everything(catalog)
    database = new_name()
    with pytest.raises(ShardExists, match=f"shard '{name}' exists already"):
        migrations.provision(catalog, name, server, database=database)
    assert not database_exists(server, database)
    assert everything(catalog) == before


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["Bad Name"], "error: invalid shard name 'Bad Name'"),
        (["ok", "--database", 'x"; DROP DATABASE postgres; --'], "error: invalid database name"),
        (["ok", "--database", "A" * 3], "error: invalid database name 'AAA'"),
    ],
    ids=["shard name", "quote in database name", "upper case database name"],
)
def test_invalid_names_are_refused(
    catalog: Catalog, server: str, args: list[str], error: str
) -> None:
    before = everything(catalog)
    message = cli(catalog).error("shard", "create", *args, "--server", server)
    assert message.startswith(error)
    assert everything(catalog) == before
    databases = {r[0] for r in query(server, "SELECT datname FROM pg_database")}
    assert not {"ok", "AAA", "Bad Name"} & databases


def test_invalid_names_raise_clear_errors(catalog: Catalog, server: str) -> None:
    with pytest.raises(InvalidShardName):
        migrations.provision(catalog, "Bad Name", server)
    with pytest.raises(ConfigurationError, match="invalid database name 'a b'"):
        migrations.provision(catalog, "ok", server, database="a b")
    assert catalog.list_shards() == []


def test_an_unreachable_server_is_a_clear_error(catalog: Catalog) -> None:
    before = everything(catalog)
    with pytest.raises(ProvisionError) as caught:
        migrations.provision(catalog, "p-far", UNREACHABLE)
    message = str(caught.value)
    assert message.startswith(
        "cannot create database 'p-far' on postgresql+psycopg://postgres:***@127.0.0.1:1/postgres: "
    )
    assert "refused" in message and PASSWORD not in message
    error = cli(catalog).error("shard", "create", "p-far", "--server", UNREACHABLE)
    assert error == f"error: {message}"
    assert everything(catalog) == before


def test_a_template_copies_the_migrated_schema(
    catalog: Catalog,
    server: str,
    make_pg_database: DatabaseFactory,
    new_name: Callable[[], str],
) -> None:
    # The counting migration logs the database it ran in: a copy of the template keeps
    # the template's row, proving the migration was not run again.
    template = make_pg_database(0)
    template_name = make_url(template).database
    assert template_name is not None
    migrated = migrate_shard(
        Shard("template", template), app_config(COUNTING), settings=catalog.settings
    )
    assert migrated.result == "upgraded"

    copy = migrations.provision(
        catalog, new_name(), server, template=template_name, alembic_config=COUNTING
    )
    assert revision(copy.url) == "c0001"
    assert query(copy.url, "SELECT database FROM migration_log") == [(template_name,)]

    fresh = migrations.provision(catalog, new_name(), server, alembic_config=COUNTING)
    assert query(fresh.url, "SELECT database FROM migration_log") == [(fresh.name,)]

    # the command line, with the demo app's schema
    demo_template = make_pg_database(0)
    migrate_shard(Shard("demo", demo_template), app_config(MIGRATIONS), settings=catalog.settings)
    name = new_name()
    doc = cli(catalog).json(
        "shard",
        "create",
        name,
        "--server",
        server,
        "--template",
        str(make_url(demo_template).database),
    )
    assert doc["name"] == name
    assert revision(catalog.get_shard(name).url) == "d0002"
    assert "charging_sessions" in tables(catalog.get_shard(name).url)


def test_a_missing_template_is_a_clear_error(
    catalog: Catalog, server: str, new_name: Callable[[], str]
) -> None:
    name = new_name()
    with pytest.raises(ProvisionError, match='template database "no_such_template" does not exist'):
        migrations.provision(catalog, name, server, template="no_such_template")
    assert not database_exists(server, name)
    assert catalog.list_shards() == []


def test_sqlite_provisioning_into_a_folder(catalog: Catalog, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    shard = migrations.provision(catalog, "lite-1", f"sqlite:///{folder}")
    assert shard.url == f"sqlite:///{folder / 'lite-1.db'}"
    assert (folder / "lite-1.db").is_file()
    assert revision(shard.url) == "d0002"
    assert "tenantry_residency" in tables(shard.url)
    assert catalog.get_shard("lite-1") == shard

    before = everything(catalog)
    with pytest.raises(ProvisionError, match=r"lite-1\.db exists already"):
        migrations.provision(catalog, "lite-2", f"sqlite:///{folder}", database="lite-1")
    with pytest.raises(ProvisionError, match="--template needs PostgreSQL"):
        migrations.provision(catalog, "lite-3", f"sqlite:///{folder}", template="lite-1")
    with pytest.raises(ProvisionError, match="could not be migrated"):
        migrations.provision(catalog, "lite-4", f"sqlite:///{folder}", alembic_config=BROKEN)
    assert sorted(p.name for p in folder.iterdir()) == ["lite-1.db"]
    assert everything(catalog) == before
