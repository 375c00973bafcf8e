"""Fleet migrations over two shared and four dedicated PostgreSQL databases on two
servers, and a SQLite shard: upgrade, downgrade, status, selection, resumption, failure."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fleet_helpers import PASSWORD, RAISING, Cli, Fleet, query, table_rows

from tenantry import migrations
from tenantry.errors import ConfigurationError, UnknownShard
from tenantry.migrations import FleetRun, ShardMigration

ALL = ["d1", "d2", "d3", "d4", "lite", "s1", "s2"]  # the catalog lists shards by name
APP_TABLES = {"users", "chargers", "charging_sessions"}


def outcome(run: FleetRun) -> dict[str, tuple[str | None, str | None, str]]:
    """shard -> (from, to, result)."""
    return {r.shard: (r.before, r.after, r.result) for r in run.results}


def test_upgrade_step_by_step_then_downgrade(fleet: Fleet) -> None:
    cat = fleet.catalog
    assert {s.verdict for s in migrations.status(cat).shards} == {"unknown"}

    seen: list[ShardMigration] = []
    run = migrations.upgrade(cat, "d0001", jobs=1, on_result=seen.append)
    assert run.ok and run.target == "d0001"
    assert outcome(run) == dict.fromkeys(ALL, (None, "d0001", "upgraded"))
    assert [r.shard for r in seen] == ALL  # one report per shard, as it finishes
    for name in ALL:
        assert fleet.tables(name) >= {"users", "chargers", "tenantry_residency"}
        assert "charging_sessions" not in fleet.tables(name)

    run = migrations.upgrade(cat, jobs=1)
    assert outcome(run) == dict.fromkeys(ALL, ("d0001", "d0002", "upgraded"))
    assert fleet.revisions() == dict.fromkeys(ALL, "d0002")
    fks = query(
        fleet.urls["d2"],
        "SELECT count(*) FROM pg_constraint "
        "WHERE conrelid = 'charging_sessions'::regclass AND contype = 'f'",
    )
    assert fks == [(2,)]

    # re-running does nothing anywhere
    run = migrations.upgrade(cat, jobs=1)
    assert outcome(run) == dict.fromkeys(ALL, ("d0002", "d0002", "skipped"))
    fleet_status = migrations.status(cat)
    assert fleet_status.in_step and fleet_status.head == "d0002"
    assert fleet_status.verdict == "in step: all 7 shard(s) at d0002"
    assert {s.tenantry_revision for s in fleet_status.shards} != {None}

    run = migrations.downgrade(cat, "d0001", jobs=1)
    assert outcome(run) == dict.fromkeys(ALL, ("d0002", "d0001", "downgraded"))
    assert all("charging_sessions" not in fleet.tables(n) for n in ALL)
    assert {s.verdict for s in migrations.status(cat).shards} == {"behind"}
    run = migrations.downgrade(cat, "d0001", jobs=1)
    assert outcome(run) == dict.fromkeys(ALL, ("d0001", "d0001", "skipped"))

    run = migrations.downgrade(cat, "base", jobs=1)
    assert outcome(run) == dict.fromkeys(ALL, ("d0001", None, "downgraded"))
    for name in ALL:
        # the application's tables are gone; tenantry's own per-shard tables stay
        assert not fleet.tables(name) & APP_TABLES
        assert "tenantry_residency" in fleet.tables(name)
    assert {s.verdict for s in migrations.status(cat).shards} == {"unknown"}


def test_status_tells_every_verdict(fleet: Fleet, run: Cli) -> None:
    cat = fleet.catalog
    migrations.upgrade(cat, jobs=1)
    migrations.downgrade(cat, "d0001", shards=["d1"], jobs=1)  # behind
    migrations.downgrade(cat, "base", shards=["d3"], jobs=1)  # unknown
    # a newer release migrated d2 to a revision this code does not know
    query(fleet.urls["d2"], "UPDATE alembic_version SET version_num = 'zzz999'")
    cat.add_shard(
        "gone",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/gone",
        tier="dedicated",
        prepare=False,
    )

    found = migrations.status(cat)
    verdicts = {s.shard: s.verdict for s in found.shards}
    assert verdicts == {
        "d1": "behind",
        "d2": "ahead",
        "d3": "unknown",
        "d4": "ok",
        "gone": "unreachable",
        "lite": "ok",
        "s1": "ok",
        "s2": "ok",
    }
    revisions = {s.shard: s.revision for s in found.shards}
    assert revisions["d1"] == "d0001" and revisions["d2"] == "zzz999"
    assert revisions["d3"] is None and revisions["gone"] is None
    assert not found.in_step
    assert found.verdict == (
        "out of step (1 ahead, 1 behind, 1 unknown, 1 unreachable): run `tenantry migrate upgrade`"
    )
    gone = next(s for s in found.shards if s.shard == "gone")
    assert gone.error is not None and "refused" in gone.error and PASSWORD not in gone.error

    doc = run.json("migrate", "status", status=1)
    assert {s["shard"]: s["status"] for s in doc["shards"]} == verdicts
    assert doc["in_step"] is False and doc["head"] == "d0002"
    rows = table_rows(run("migrate", "status", status=1))
    assert rows["d2"] == ["dedicated", "zzz999", "ahead"]
    assert rows["d1"] == ["dedicated", "d0001", "behind"]
    assert rows["gone"][2].startswith("unreachable: ")

    # an upgrade leaves the database that is ahead alone and says why
    result = migrations.upgrade(cat, jobs=1)
    by_shard = {r.shard: r for r in result.results}
    assert by_shard["d2"].result == "failed" and "zzz999" in (by_shard["d2"].error or "")
    assert by_shard["gone"].result == "failed"
    assert {by_shard[n].result for n in ("d1", "d3")} == {"upgraded"}
    assert {by_shard[n].result for n in ("d4", "lite", "s1", "s2")} == {"skipped"}
    assert fleet.revisions()["d2"] == "zzz999"
    assert {s.shard for s in migrations.status(cat).shards if s.verdict != "ok"} == {"d2", "gone"}


def test_shard_and_tier_select_what_is_migrated(fleet: Fleet, run: Cli) -> None:
    doc = run.json("migrate", "upgrade", "d0001", "--shard", "d4", "--shard", "s2", "-j", "1")
    assert doc["ok"] is True and doc["target"] == "d0001"
    assert [(s["shard"], s["from"], s["to"], s["result"]) for s in doc["shards"]] == [
        ("d4", None, "d0001", "upgraded"),
        ("s2", None, "d0001", "upgraded"),
    ]
    assert fleet.revisions() == {**dict.fromkeys(ALL), "d4": "d0001", "s2": "d0001"}

    doc = run.json("migrate", "upgrade", "--tier", "shared", "--jobs", "1")
    assert {s["shard"]: (s["from"], s["result"]) for s in doc["shards"]} == {
        "s1": (None, "upgraded"),
        "s2": ("d0001", "upgraded"),
    }
    assert fleet.revisions() == {**dict.fromkeys(ALL), "d4": "d0001", "s1": "d0002", "s2": "d0002"}

    result = migrations.upgrade(fleet.catalog, tier="dedicated", jobs=1)
    assert [r.shard for r in result.results] == ["d1", "d2", "d3", "d4", "lite"]
    assert fleet.revisions() == dict.fromkeys(ALL, "d0002")

    doc = run.json(
        "migrate", "downgrade", "d0001", "--tier", "dedicated", "--shard", "d2", "-j", "1"
    )
    assert [(s["shard"], s["result"]) for s in doc["shards"]] == [("d2", "downgraded")]
    assert fleet.revisions() == {**dict.fromkeys(ALL, "d0002"), "d2": "d0001"}

    with pytest.raises(UnknownShard):
        migrations.upgrade(fleet.catalog, shards=["d1", "nope"], jobs=1)
    assert fleet.revisions()["d2"] == "d0001"  # nothing migrated
    with pytest.raises(ConfigurationError, match="jobs must be at least 1"):
        migrations.upgrade(fleet.catalog, jobs=0)


def test_jobs_1_and_jobs_4_give_the_same_result(fleet: Fleet, run: Cli) -> None:
    def essentials(doc: dict[str, object]) -> list[tuple[object, ...]]:
        shards = doc["shards"]
        assert isinstance(shards, list)
        return [
            (s["shard"], s["tier"], s["from"], s["to"], s["result"], s["error"]) for s in shards
        ]

    serial = run.json("migrate", "upgrade", "--jobs", "1")
    schema = {name: fleet.tables(name) for name in ALL}
    migrations.downgrade(fleet.catalog, "base", jobs=1)
    assert {s.verdict for s in migrations.status(fleet.catalog).shards} == {"unknown"}

    parallel = run.json("migrate", "upgrade", "--jobs", "4")
    assert essentials(parallel) == essentials(serial)
    assert [s["shard"] for s in parallel["shards"]] == ALL  # catalog order, not finish order
    assert {s["result"] for s in parallel["shards"]} == {"upgraded"}
    assert {name: fleet.tables(name) for name in ALL} == schema
    assert fleet.revisions() == dict.fromkeys(ALL, "d0002")


def test_one_failing_database_does_not_stop_the_others(fleet: Fleet, run: Cli) -> None:
    migrations.upgrade(fleet.catalog, "d0001", jobs=1)
    # Someone created a table by hand in d3 that d0002 also creates: d0002 fails only there.
    query(fleet.urls["d3"], "CREATE TABLE charging_sessions (note text)")
    query(fleet.urls["d3"], "INSERT INTO charging_sessions VALUES ('keep me')")

    out = run("migrate", "upgrade", "--jobs", "1", status=1)
    rows = table_rows(out)
    assert rows["d3"][:4] == ["dedicated", "d0001", "-", "failed"]
    for name in set(ALL) - {"d3"}:
        assert rows[name][1:4] == ["d0001", "d0002", "upgraded"], name
    assert 'd3: relation "charging_sessions" already exists' in out
    assert "6 of 7 shard(s) at head" in out
    # the failed database is exactly as it was: the whole attempt rolled back
    assert fleet.revisions() == {**dict.fromkeys(ALL, "d0002"), "d3": "d0001"}
    assert query(fleet.urls["d3"], "SELECT note FROM charging_sessions") == [("keep me",)]

    doc = run.json("migrate", "upgrade", "--jobs", "1", status=1)
    assert doc["ok"] is False
    results = {s["shard"]: s for s in doc["shards"]}
    assert results["d3"]["result"] == "failed"
    assert 'relation "charging_sessions" already exists' in results["d3"]["error"]
    assert results["d3"]["from"] == "d0001" and results["d3"]["to"] is None
    assert {results[n]["result"] for n in set(ALL) - {"d3"}} == {"skipped"}
    assert {s.shard: s.verdict for s in migrations.status(fleet.catalog).shards}["d3"] == "behind"

    # repaired by hand: the re-run finishes d3 and only d3
    query(fleet.urls["d3"], "DROP TABLE charging_sessions")
    done = migrations.upgrade(fleet.catalog, jobs=1)
    assert done.ok
    assert outcome(done) == {
        **dict.fromkeys(ALL, ("d0002", "d0002", "skipped")),
        "d3": ("d0001", "d0002", "upgraded"),
    }


def test_a_migration_that_raises_is_reported_not_raised(
    make_fleet: Callable[..., Fleet],
) -> None:
    """A Python error in the application's migration (not the database's) fails that
    database like any other error, with --jobs 1 as with --jobs 4, and the CLI shows the
    message as it is (brackets are not markup)."""
    fleet = make_fleet(RAISING)
    run = Cli(fleet.catalog_url)

    result = migrations.upgrade(fleet.catalog, jobs=1)
    assert [(r.shard, r.result) for r in result.results] == [(n, "failed") for n in ALL]
    assert {r.error for r in result.results} == {"cannot backfill [users]: 3 rows without an email"}
    assert fleet.revisions() == dict.fromkeys(ALL)
    assert not any("backfilled" in fleet.tables(n) for n in ALL)  # rolled back

    out = run("migrate", "upgrade", "--alembic-config", str(RAISING), "-j", "1", status=1)
    assert "s1: cannot backfill [users]: 3 rows without an email" in out
    assert "0 of 7 shard(s) at head" in out
