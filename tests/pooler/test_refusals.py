"""What is refused when a pooler stands where the server must: operations URLs.

Moves and fleet migrations hold sessions (advisory locks, replication, waits on other
transactions) that only the server keeps: an operations URL that goes through PgBouncer
is refused with one line naming ``--admin-url``, before anything is changed. ``shard
add`` finds a pooler by itself, and refuses a pooled shard without an operations URL of
its own, or a pooled SQLite one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import Result
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings, moves
from tenantry.demo import MIGRATIONS
from tenantry.errors import PoolerInTheWay
from tenantry.shardmap.residency import read_residency
from tenantry.testing import DatabaseFactory
from tenantry.testing.pgbouncer import TempPgBouncer
from tests.cli.conftest import Run, stderr_of
from tests.router.conftest import install_app_schema, routing_url, seed_rows

ADMIN_URL_HINT = "--admin-url"


def one_line_refusal(result: Result) -> str:
    """A clean failure of the CLI: exit 1, nothing on stdout, one ``error:`` line naming
    the pooler and ``--admin-url``."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = stderr_of(result).splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("error: ")
    assert "pooler" in line and ADMIN_URL_HINT in line, line
    return line


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    built = Catalog(url, settings=load_settings(catalog_url=url, connect_timeout=2))
    built.init()
    yield built
    built.close()


def catalog_url(catalog: Catalog) -> str:
    return str(catalog.settings.catalog_url)


# -- fleet migrations -------------------------------------------------------------------------


def test_migrate_upgrade_refuses_a_pooled_operations_url(
    catalog: Catalog, make_pg_database: DatabaseFactory, pgbouncer: TempPgBouncer, app_role: str
) -> None:
    direct = make_pg_database(0)
    pooled_admin = pgbouncer.url(direct)  # the superuser, through the pooler
    catalog.add_shard(
        "p1", routing_url(pooled_admin), admin_url=pooled_admin, prepare=False, pooled=True
    )
    assert catalog.get_shard("p1").pooled
    before = tables(direct)
    run = Run(catalog_url(catalog))
    env = {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)}
    result = run.invoke("migrate", "upgrade", "-j", "1", env=env)
    # A fleet command reports each shard: p1 failed, on one line of its own.
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    (line,) = [x for x in result.stdout.splitlines() if "pooler" in x]
    assert line.startswith("p1: shard 'p1': its operations URL"), line
    assert ADMIN_URL_HINT in line and "0 of 1 shard(s) at head" in result.stdout
    result = run.invoke("migrate", "upgrade", "-j", "1", "--json", env=env)
    assert result.exit_code == 1
    (report,) = json.loads(result.stdout)["shards"]
    assert report["result"] == "failed" and report["to"] is None
    assert "\n" not in report["error"] and ADMIN_URL_HINT in report["error"]
    # Nothing ran on the database: no tenantry table, no alembic version.
    assert tables(direct) == before == set()


# -- moves ------------------------------------------------------------------------------------


@pytest.fixture
def move_fleet(
    catalog: Catalog, make_pg_database: DatabaseFactory, pgbouncer: TempPgBouncer, app_role: str
) -> tuple[Catalog, str, str]:
    """s1 direct (acme on it, seeded); p2's operations URL is the pooler. Returns the
    catalog, s1's and p2's server URLs."""
    s1, p2 = make_pg_database(0), make_pg_database(0)
    install_app_schema(s1, rls=False)
    catalog.add_shard("s1", s1)
    pooled_admin = pgbouncer.url(p2)
    catalog.add_shard("p2", routing_url(pooled_admin), admin_url=pooled_admin, prepare=False)
    catalog.add_tenant("acme", shard="s1")
    projects, _tasks = seed_rows("acme")
    engine = sa.create_engine(s1, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO projects VALUES (:tenant_id, :id, :name)"), projects)
    engine.dispose()
    return catalog, s1, p2


def source_state(url: str) -> tuple[list[tuple[object, ...]], str | None]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            found = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM projects ORDER BY 2"))]
            state = read_residency(conn, "acme")
        return found, None if state is None else state.value
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_move_refuses_a_target_behind_a_pooler(
    move_fleet: tuple[Catalog, str, str], mode: str
) -> None:
    catalog, s1, p2 = move_fleet
    before = source_state(s1)
    assert before == ([("acme", 1, "acme-p1"), ("acme", 2, "acme-p2")], "active")
    with pytest.raises(PoolerInTheWay) as caught:
        moves.move(catalog, "acme", "p2", mode=mode)
    message = str(caught.value)
    assert "\n" not in message and ADMIN_URL_HINT in message and "'p2'" in message
    assert caught.value.shard == "p2"
    # Nothing changed: the tenant is home, active, with its rows; the target is empty.
    assert catalog.get_tenant("acme").shard == "s1"
    assert catalog.get_tenant("acme").state.value == "active"
    assert moves.list_moves(catalog, live=True) == []
    assert source_state(s1) == before
    assert tables(p2) == set()


def test_the_move_command_refuses_with_one_line(move_fleet: tuple[Catalog, str, str]) -> None:
    catalog, s1, p2 = move_fleet
    before = source_state(s1)
    result = Run(catalog_url(catalog)).invoke("move", "acme", "--to", "p2")
    assert "'p2'" in one_line_refusal(result)
    assert catalog.get_tenant("acme").shard == "s1"
    assert moves.list_moves(catalog, live=True) == []
    assert source_state(s1) == before
    assert tables(p2) == set()


def test_a_move_refuses_a_source_behind_a_pooler(
    move_fleet: tuple[Catalog, str, str],
    pgbouncer: TempPgBouncer,
    make_pg_database: DatabaseFactory,
) -> None:
    catalog, s1, _p2 = move_fleet
    s3 = make_pg_database(0)
    install_app_schema(s3, rls=False)
    catalog.add_shard("s3", s3)
    before = source_state(s1)
    # No API points an existing shard's operations URL at a pooler (set_shard_urls
    # takes the pooler's port for another database): edit the catalog row, as an
    # operator's hand might.
    engine = sa.create_engine(catalog_url(catalog), poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE tenantry_shards SET admin_url = :u WHERE name = 's1'"),
            {"u": pgbouncer.url(s1)},
        )
    engine.dispose()
    with pytest.raises(PoolerInTheWay) as caught:
        moves.move(catalog, "acme", "s3", mode="offline")
    assert caught.value.shard == "s1" and ADMIN_URL_HINT in str(caught.value)
    assert catalog.get_tenant("acme").shard == "s1"
    assert catalog.get_tenant("acme").state.value == "active"
    assert moves.list_moves(catalog, live=True) == []
    assert source_state(s1) == before
    assert tables(s3) >= {"projects"}
    engine = sa.create_engine(s3, poolclass=NullPool)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM projects")).scalar() == 0
    engine.dispose()


def test_adding_a_tenant_refuses_a_pooled_operations_url(
    move_fleet: tuple[Catalog, str, str],
) -> None:
    catalog, _s1, p2 = move_fleet
    with pytest.raises(PoolerInTheWay, match="--admin-url"):
        catalog.add_tenant("initech", shard="p2")
    assert [t.id for t in catalog.list_tenants()] == ["acme"]
    assert tables(p2) == set()


# -- shard add --------------------------------------------------------------------------------


def test_shard_add_of_a_pooler_without_admin_url_is_refused(
    catalog: Catalog, make_pg_database: DatabaseFactory, pgbouncer: TempPgBouncer
) -> None:
    direct = make_pg_database(0)
    run = Run(catalog_url(catalog))
    line = one_line_refusal(run.invoke("shard", "add", "p1", pgbouncer.url(direct)))
    assert "'p1'" in line
    assert catalog.list_shards() == []
    assert tables(direct) == set()  # nothing prepared
    # Said outright, the same.
    line = one_line_refusal(run.invoke("shard", "add", "p1", pgbouncer.url(direct), "--pooled"))
    assert catalog.list_shards() == []


def test_shard_add_detects_the_pooler(
    catalog: Catalog, make_pg_database: DatabaseFactory, pgbouncer: TempPgBouncer
) -> None:
    direct, other = make_pg_database(0), make_pg_database(0)
    run = Run(catalog_url(catalog))
    doc = run.json("shard", "add", "p1", pgbouncer.url(direct), "--admin-url", direct)
    assert doc["pooled"] is True
    assert catalog.get_shard("p1").pooled
    # The server's own URL is not a pooler.
    doc = run.json("shard", "add", "d1", other)
    assert doc["pooled"] is False
    listed = {s["name"]: s["pooled"] for s in run.json("shard", "list")}
    assert listed == {"p1": True, "d1": False}


def test_shard_add_pooled_sqlite_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    run = Run(catalog_url(catalog))
    result = run.invoke("shard", "add", "q1", f"sqlite:///{tmp_path / 'q1.db'}", "--pooled")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    lines = stderr_of(result).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "pooler" in lines[0] and "PostgreSQL" in lines[0], lines[0]
    assert catalog.list_shards() == []
