"""Two runners on one fleet: the per-database advisory lock lets each database be
migrated exactly once; a runner waits for it, or with --no-wait leaves it as 'locked'."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import sqlalchemy as sa
from fleet_helpers import COUNTING, PASSWORD, Cli, Fleet, engine, query

from tenantry import migrations
from tenantry.migrations import FleetRun
from tenantry.migrations.fleet import MIGRATION_LOCK

PG = ["d1", "d2", "d3", "d4", "s1", "s2"]
ALL = ["d1", "d2", "d3", "d4", "lite", "s1", "s2"]


@contextmanager
def holding_lock(url: str) -> Iterator[None]:
    """Hold the migration lock of the database at *url*, as another runner would."""
    eng = engine(url)
    try:
        with eng.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            yield
    finally:
        eng.dispose()


@contextmanager
def holding_sqlite_write_lock(url: str) -> Iterator[None]:
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def lock_waiters(url: str) -> int:
    """Sessions waiting for the migration lock in the database at *url*."""
    rows = query(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND objid = :k AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())",
        k=MIGRATION_LOCK,
    )
    return int(rows[0][0])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_no_wait_leaves_a_locked_database_to_its_runner(fleet: Fleet, run: Cli) -> None:
    with holding_lock(fleet.urls["d2"]):
        result = migrations.upgrade(fleet.catalog, jobs=1, wait=False)
        by_shard = {r.shard: r for r in result.results}
        assert by_shard["d2"].result == "locked"
        assert by_shard["d2"].error == (
            "another runner is migrating this database; it was left to it"
        )
        assert not result.ok and [r.shard for r in result.failed] == ["d2"]
        assert {by_shard[n].result for n in ALL if n != "d2"} == {"upgraded"}
        assert fleet.revisions() == {**dict.fromkeys(ALL, "d0002"), "d2": None}

        doc = run.json("migrate", "upgrade", "--no-wait", "-j", "1", status=1)
        results = {s["shard"]: s["result"] for s in doc["shards"]}
        assert results == {**dict.fromkeys(ALL, "skipped"), "d2": "locked"}
        out = run("migrate", "upgrade", "--no-wait", "-j", "1", status=1)
        assert "d2: another runner is migrating this database" in out

    result = migrations.upgrade(fleet.catalog, jobs=1, wait=False)
    assert result.ok
    assert {r.shard: r.result for r in result.results} == {
        **dict.fromkeys(ALL, "skipped"),
        "d2": "upgraded",
    }


def test_a_runner_waits_for_the_lock(fleet: Fleet) -> None:
    results: list[FleetRun] = []
    url = fleet.urls["d1"]
    worker = threading.Thread(
        target=lambda: results.append(migrations.upgrade(fleet.catalog, shards=["d1"], jobs=1))
    )
    with holding_lock(url):
        worker.start()
        wait_for(lambda: lock_waiters(url) == 1, "the runner waits for the lock")
        time.sleep(0.2)
        assert worker.is_alive() and fleet.revisions()["d1"] is None
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [(r.shard, r.before, r.after, r.result) for r in results[0].results] == [
        ("d1", None, "d0002", "upgraded")
    ]


def start_runner(catalog_url: str, name: str, jobs: int, cwd: Path) -> subprocess.Popen[str]:
    """``tenantry migrate upgrade`` in a process of its own, as a second operator would."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TENANTRY_") or k == "TENANTRY_TEST_PG_URLS"
    }
    env.update(MIGRATION_RUNNER=name, MIGRATION_SLEEP="0.05")
    argv = [sys.executable, "-m", "tenantry", "--catalog", catalog_url, "migrate", "upgrade"]
    argv += ["--alembic-config", str(COUNTING), "--jobs", str(jobs), "--json"]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )


def test_two_runner_processes_migrate_each_database_exactly_once(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fleet = make_fleet(COUNTING)
    runners: dict[str, subprocess.Popen[str]] = {}
    try:
        with ExitStack() as held:
            # Every database is held, so both runners queue on the same databases and
            # race for each one once they are let go.
            for name in PG:
                held.enter_context(holding_lock(fleet.urls[name]))
            held.enter_context(holding_sqlite_write_lock(fleet.urls["lite"]))
            runners["A"] = start_runner(fleet.catalog_url, "A", 1, tmp_path)
            runners["B"] = start_runner(fleet.catalog_url, "B", 1, tmp_path)
            # d1 comes first for both: two sessions wait on it at once
            wait_for(lambda: lock_waiters(fleet.urls["d1"]) == 2, "both runners wait on d1")
        outputs = {name: proc.communicate(timeout=120) for name, proc in runners.items()}
    finally:
        for proc in runners.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    docs = {}
    for name, (out, err) in outputs.items():
        assert runners[name].returncode == 0, err
        assert PASSWORD not in out + err
        docs[name] = json.loads(out)
        assert docs[name]["ok"] is True
        assert [s["shard"] for s in docs[name]["shards"]] == ALL
        assert {s["error"] for s in docs[name]["shards"]} == {None}
        assert {s["to"] for s in docs[name]["shards"]} == {"c0001"}

    did = {name: {s["shard"]: s["result"] for s in doc["shards"]} for name, doc in docs.items()}
    for shard in ALL:
        assert sorted([did["A"][shard], did["B"][shard]]) == ["skipped", "upgraded"], shard
        log = query(fleet.urls[shard], "SELECT runner FROM migration_log")
        winner = "A" if did["A"][shard] == "upgraded" else "B"
        assert log == [(winner,)], shard  # exactly once, by the runner that says so
    assert fleet.revisions() == dict.fromkeys(ALL, "c0001")
