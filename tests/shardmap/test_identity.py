"""Every shard database has an identity: one database is never two shards.

A database registered as 'pool-a' through 127.0.0.1 is refused as 'pool-a-again'
through localhost (and a SQLite file under a relative and an absolute path); a
database cloned from a template gets an identity of its own; ``migrate upgrade`` fills
the identities of a fleet registered before they existed, and reports two names for
one database.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry import Catalog, DatabaseAlreadyRegistered, Shard, ShardExists, load_settings
from tenantry.cli import cli
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.shardmap.catalog import prepare_shard
from tenantry.shardmap.identity import ensure_identity, live_database, read_identity
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import shard_identity, shards
from tenantry.testing import DatabaseFactory


def localhost(url: str) -> str:
    """The same database, its host spelled ``localhost`` instead of ``127.0.0.1``."""
    parsed = make_url(url)
    assert parsed.host == "127.0.0.1"
    return parsed.set(host="localhost").render_as_string(hide_password=False)


def stored_row(url: str) -> tuple[str, str | None, int | None]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    shard_identity.c.database_id,
                    shard_identity.c.system_identifier,
                    shard_identity.c.database_oid,
                )
            ).one()
    finally:
        engine.dispose()
    return row[0], row[1], row[2]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    cat = Catalog(url, settings=load_settings(catalog_url=url, alembic_config=str(MIGRATIONS)))
    cat.init()
    return cat


def test_one_postgresql_database_under_two_spellings_is_refused(
    catalog: Catalog, pg_url: str
) -> None:
    catalog.add_shard("pool-a", pg_url)
    before = (catalog.map_version(), catalog.list_shards(), catalog.database_ids())
    assert before[2]["pool-a"] is not None

    with pytest.raises(DatabaseAlreadyRegistered) as caught:
        catalog.add_shard("pool-a-again", localhost(pg_url))
    assert isinstance(caught.value, ShardExists)
    message = str(caught.value)
    assert "\n" not in message
    assert "already registered as shard 'pool-a'" in message
    assert "another spelling of its URL" in message
    assert caught.value.shard == "pool-a-again" and caught.value.existing == "pool-a"
    assert (catalog.map_version(), catalog.list_shards(), catalog.database_ids()) == before

    # the identity recorded is the one stored in the database, with the live server's
    database_id, system_identifier, oid = stored_row(pg_url)
    assert catalog.database_ids() == {"pool-a": database_id}
    engine = sa.create_engine(pg_url, poolclass=NullPool)
    with engine.connect() as conn:
        live = conn.execute(
            sa.text(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text,"
                " (SELECT oid FROM pg_database WHERE datname = current_database())::bigint"
            )
        ).one()
        # the routing role's PUBLIC has no access to the identity table
        acl = conn.execute(
            sa.text("SELECT relacl::text FROM pg_class WHERE relname = 'tenantry_shard_identity'")
        ).scalar_one()
    engine.dispose()
    assert (system_identifier, oid) == (live[0], live[1])
    assert acl is None or not [e for e in acl.strip("{}").split(",") if e.startswith("=")]


def test_the_cli_refuses_the_second_name_in_one_line(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'cli-catalog.db'}"
    runner = CliRunner(env={"COLUMNS": "400"})

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli, ["--catalog", url, *args], prog_name="tenantry")
        return result.exit_code, result.stdout, result.stderr

    assert invoke("init")[0] == 0
    assert invoke("shard", "add", "pool-a", pg_url)[0] == 0
    code, out, err = invoke("shard", "add", "pool-a-again", localhost(pg_url))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "error: cannot add shard 'pool-a-again': its database is already registered as "
        "shard 'pool-a' (same database, another spelling of its URL): use that shard"
    ]
    code, out, _ = invoke("shard", "list", "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["pool-a"]


def test_a_database_cloned_from_a_template_gets_its_own_identity(
    catalog: Catalog, make_pg_database: DatabaseFactory
) -> None:
    template_url = make_pg_database(0)
    template = prepare_shard(Shard("template", template_url))
    name = make_url(template_url).database
    clone_url = make_pg_database(0, template=name)

    # the clone carries the template's row: not its identity
    copied_id, copied_system, copied_oid = stored_row(clone_url)
    assert copied_id == template.database_id
    with operator_transaction(Shard("clone", clone_url)) as conn:
        assert read_identity(conn) is None
        live = live_database(conn, repair=False)
        assert live.identity is None and live.database_oid != copied_oid

    catalog.add_shard("clone", clone_url, tier="dedicated")
    catalog.add_shard("template", template_url, tier="dedicated")
    ids = catalog.database_ids()
    assert ids["template"] == template.database_id
    assert ids["clone"] not in (None, template.database_id)
    clone_id, clone_system, clone_oid = stored_row(clone_url)
    assert clone_id == ids["clone"] and clone_system == copied_system
    assert clone_oid == live.database_oid

    # repairing is idempotent, and the template keeps its id
    with operator_transaction(Shard("clone", clone_url)) as conn:
        assert ensure_identity(conn).database_id == clone_id
    assert stored_row(template_url)[0] == template.database_id


def test_one_sqlite_file_under_a_relative_and_an_absolute_path_is_refused(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    monkeypatch.chdir(folder)
    catalog.add_shard("pool-a", "sqlite:///shard.db")
    with pytest.raises(DatabaseAlreadyRegistered, match="registered as shard 'pool-a'"):
        catalog.add_shard("pool-a-again", f"sqlite:///{folder / 'shard.db'}")
    with pytest.raises(DatabaseAlreadyRegistered, match="registered as shard 'pool-a'"):
        catalog.add_shard("pool-a-dots", f"sqlite:///{folder / '..' / 'files' / 'shard.db'}")
    assert [s.name for s in catalog.list_shards()] == ["pool-a"]
    # another file is another database
    catalog.add_shard("pool-b", "sqlite:///other.db")
    ids = catalog.database_ids()
    assert None not in ids.values() and ids["pool-a"] != ids["pool-b"]


def test_migrate_upgrade_fills_identities_and_reports_one_database_twice(
    catalog: Catalog, make_pg_database: DatabaseFactory, tmp_path: Path
) -> None:
    pool_a = make_pg_database(0)
    catalog.add_shard("pool-a", pool_a)
    catalog.add_shard("pool-b", make_pg_database(1))
    catalog.add_shard("lite", f"sqlite:///{tmp_path / 'lite.db'}")
    expected = catalog.database_ids()
    # a catalog that predates identities (c0005): none recorded; and a second name for
    # pool-a's database slipped in past the check
    with catalog.engine.begin() as conn:
        conn.execute(shards.update().values(database_id=None))
        conn.execute(
            shards.insert().values(
                name="pool-a-again",
                url=localhost(pool_a),
                admin_url=None,
                tier="shared",
                state="active",
                weight=1,
                created_at=sa.func.current_timestamp(),
                database_id=None,
            )
        )
    assert set(catalog.database_ids().values()) == {None}

    run = upgrade(catalog, jobs=1)
    results = {r.shard: r for r in run.results}
    assert {n for n, r in results.items() if r.ok} == {"lite", "pool-a", "pool-b"}
    again = results["pool-a-again"]
    assert again.result == "failed"
    assert again.error is not None and "\n" not in again.error
    assert "is the database of shard 'pool-a'" in again.error
    assert catalog.database_ids() == {**expected, "pool-a-again": None}

    # a second run changes nothing and still reports it
    run = upgrade(catalog, jobs=1)
    assert [r.shard for r in run.failed] == ["pool-a-again"]
    assert catalog.database_ids() == {**expected, "pool-a-again": None}
