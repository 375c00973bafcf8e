"""``moves gc``: tenantry replication objects that no live move owns, found and dropped.

Two real PostgreSQL servers (``wal_level=logical``). Orphans are made by hand, the
way an abandoned move or a bug would leave them: a publication and a logical slot on
the source, a subscription using that slot on the target.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import suppress

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from movefleet import (
    Fleet,
    assert_one_home,
    build_fleet,
    replication_objects,
    seed,
    tenant_rows,
)

from tenantry import moves
from tenantry.cli import cli
from tenantry.demo import MIGRATIONS
from tenantry.errors import TenantryError
from tenantry.moves import Leftover, collect_garbage
from tenantry.moves.replication import artifact_name, source_conninfo
from tenantry.shardmap.schema import moves as moves_table

ORPHAN_ID = 999


def orphan(fleet: Fleet) -> str:
    """The name a move 999 of this fleet would give its objects."""
    return artifact_name(ORPHAN_ID, fleet.catalog.fleet_id())


@pytest.fixture
def fleet(make_pg_database, tmp_path) -> Iterator[Fleet]:
    """s1 (server 0) and s2 (server 1), q1 on SQLite (gc skips it); acme on s1."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("q1", f"sqlite:///{tmp_path / 'q1.db'}", "shared"),
        ],
    )
    built.catalog.add_tenant("acme", shard="s1")
    engine = built.engine("s1")
    seed(engine, "acme")
    engine.dispose()
    try:
        yield built
    finally:
        # What a failed test left would stop the databases from being dropped.
        for live in moves.list_moves(built.catalog, live=True):
            with suppress(TenantryError):
                moves.abort(built.catalog, live.id)
        collect_garbage(built.catalog, apply=True)
        built.close()


def _autocommit(fleet: Fleet, shard: str) -> sa.Engine:
    return sa.create_engine(fleet.urls[shard], isolation_level="AUTOCOMMIT")


def make_orphans(fleet: Fleet, name: str | None = None) -> set[tuple[str, str, str]]:
    """A publication and slot on s1 and a subscription on s2 that streams from them,
    named like a move's of this fleet; plus the application's own publication, which is
    not ours."""
    name = name or orphan(fleet)
    source = _autocommit(fleet, "s1")
    with source.connect() as conn:
        conn.exec_driver_sql(f"CREATE PUBLICATION {name} FOR TABLE users WHERE (tenant_id = 'x')")
        conn.execute(
            sa.text("SELECT pg_create_logical_replication_slot(:n, 'pgoutput')"), {"n": name}
        )
        conn.exec_driver_sql("CREATE PUBLICATION app_changes FOR TABLE chargers")
    source.dispose()
    target = _autocommit(fleet, "s2")
    conninfo = source_conninfo(fleet.catalog.get_shard("s1").operations_url).replace("'", "''")
    with target.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE SUBSCRIPTION {name} CONNECTION '{conninfo}' PUBLICATION {name}"
            f" WITH (copy_data = false, create_slot = false, slot_name = '{name}')"
        )
    target.dispose()
    return {("s1", "publication", name), ("s1", "slot", name), ("s2", "subscription", name)}


def listed(found: list[Leftover]) -> set[tuple[str, str, str]]:
    assert all(f.error is None for f in found), found
    return {(f.shard, f.kind, f.name) for f in found}


def test_dry_run_lists_orphans_and_apply_drops_them(fleet):
    orphans = make_orphans(fleet)
    assert replication_objects(fleet) == orphans | {("s1", "publication", "app_changes")}
    dry = collect_garbage(fleet.catalog)
    assert listed(dry) == orphans
    assert not any(f.dropped for f in dry)
    # Subscriptions first: dropping one frees the slot it streams from.
    assert [f.kind for f in dry] == ["subscription", "slot", "publication"]
    assert replication_objects(fleet) == orphans | {("s1", "publication", "app_changes")}
    applied = collect_garbage(fleet.catalog, apply=True)
    assert listed(applied) == orphans
    assert all(f.dropped for f in applied)
    # Only the application's own publication is left.
    assert replication_objects(fleet) == {("s1", "publication", "app_changes")}
    assert collect_garbage(fleet.catalog) == []


def test_objects_of_a_live_move_are_never_listed(fleet):
    orphans = make_orphans(fleet)
    before = tenant_rows(fleet.engine("s1"), "acme")

    class CollectMidMove:
        """Runs gc, dry and then applied, while the move is live and replicating."""

        def checkpoint(self, name: str) -> None:
            if name == "online-synced":
                (self.live,) = moves.list_moves(fleet.catalog, live=True)
                self.mine = {("s1", "publication"), ("s1", "slot"), ("s2", "subscription")}
                self.present = {(s, k) for s, k, n in replication_objects(fleet) if n == self.name}
                self.dry = collect_garbage(fleet.catalog)
                self.applied = collect_garbage(fleet.catalog, apply=True)

        @property
        def name(self) -> str:
            return artifact_name(self.live.id, fleet.catalog.fleet_id())

    hooks = CollectMidMove()
    done = moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=hooks)
    # The move's publication, slot and subscription were there, never listed, and kept:
    # the move went on through them to the end.
    assert hooks.present == hooks.mine
    assert listed(hooks.dry) == orphans
    assert listed(hooks.applied) == orphans and all(f.dropped for f in hooks.applied)
    assert done.succeeded
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert replication_objects(fleet) == {("s1", "publication", "app_changes")}


def test_objects_of_an_abandoned_move_are_collected(fleet):
    class Crash(BaseException):  # the process dies here: no step's error handling runs
        pass

    class CrashWhenSynced:
        def checkpoint(self, name: str) -> None:
            if name == "online-synced":
                raise Crash

    with pytest.raises(Crash):
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=CrashWhenSynced())
    (live,) = moves.list_moves(fleet.catalog, live=True)
    name = artifact_name(live.id, fleet.catalog.fleet_id())
    left = {("s1", "publication", name), ("s1", "slot", name), ("s2", "subscription", name)}
    assert replication_objects(fleet) == left
    # Live: its objects are its own, however long it has been stopped.
    assert collect_garbage(fleet.catalog, apply=True) == []
    assert replication_objects(fleet) == left
    # Its journal entry lost (by hand, or a bug): now they are orphans.
    with fleet.catalog.engine.begin() as conn:
        conn.execute(moves_table.delete().where(moves_table.c.id == live.id))
    assert listed(collect_garbage(fleet.catalog)) == left
    assert listed(collect_garbage(fleet.catalog, apply=True)) == left
    assert replication_objects(fleet) == set()


def test_cli_moves_gc(fleet):
    orphans = make_orphans(fleet)
    runner = CliRunner()
    base = ["--catalog", fleet.catalog_url]
    env = {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)}

    table = runner.invoke(cli, [*base, "moves", "gc"], env=env)
    assert table.exit_code == 0, table.output
    assert orphan(fleet) in table.output and "would drop" in table.output
    assert "dry run: run `tenantry moves gc --apply` to drop them" in table.output

    dry = runner.invoke(cli, [*base, "moves", "gc", "--json"], env=env)
    assert dry.exit_code == 0, dry.output
    records = json.loads(dry.output)
    assert {(r["shard"], r["kind"], r["name"]) for r in records} == orphans
    assert all(r["dropped"] is False and r["error"] is None for r in records)
    assert len(replication_objects(fleet)) == 4  # nothing dropped

    applied = runner.invoke(cli, [*base, "moves", "gc", "--apply", "--json"], env=env)
    assert applied.exit_code == 0, applied.output
    records = json.loads(applied.output)
    assert {(r["shard"], r["kind"], r["name"]) for r in records} == orphans
    assert all(r["dropped"] is True for r in records)
    assert replication_objects(fleet) == {("s1", "publication", "app_changes")}

    empty = runner.invoke(cli, [*base, "moves", "gc", "--json"], env=env)
    assert empty.exit_code == 0 and json.loads(empty.output) == []
