"""Several processes change one catalog at the same moment: nothing is lost.

Each worker is a separate Python process (its own connections, its own SQLite locks,
no shared interpreter state). For each catalog in turn (SQLite, then PostgreSQL) they
wait at a start line, then all run ``init`` on the fresh catalog and each adds two
shards and 25 tenants, interleaved, as fast as it can. The same processes serve both
catalogs, which halves the cost of starting them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tenantry import Catalog, Shard, load_settings
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import residency
from tenantry.shardmap.scripts import CATALOG
from tenantry.testing import DatabaseFactory

WORKERS = 4
TENANTS_PER_WORKER = 25
SHARDS_PER_WORKER = 2

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from tenantry import Catalog, load_settings

    worker = int(sys.argv[1])
    print(json.dumps({"ready": worker}), flush=True)
    for line in sys.stdin:  # one job per catalog: {"catalog": url, "shards": [...], "go": path}
        job = json.loads(line)
        url = job["catalog"]
        catalog = Catalog(url, settings=load_settings(catalog_url=url))
        while not os.path.exists(job["go"]):  # the start line: the workers really overlap
            time.sleep(0.002)
        done = {"start": time.time(), "init": catalog.init(), "shards": [], "tenants": {}}
        for i in range(%(tenants)d):
            if i in (0, 12):
                name = f"w{worker}-s{len(done['shards'])}"
                catalog.add_shard(name, job["shards"][len(done["shards"])])
                done["shards"].append(name)
            tenant = catalog.add_tenant(f"w{worker}-t{i:02d}")
            done["tenants"][tenant.id] = tenant.shard
        done["end"] = time.time()
        catalog.close()
        print(json.dumps(done), flush=True)
    """
) % {"tenants": TENANTS_PER_WORKER}


class Workers:
    """WORKERS processes that take catalog jobs on stdin and answer on stdout."""

    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(w)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(WORKERS)
        ]
        for w, proc in enumerate(self.procs):  # each has imported tenantry
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, self.stop()
            assert json.loads(line) == {"ready": w}

    def run(self, catalog_url: str, shard_urls: list[list[str]], go: Path) -> list[Any]:
        for w, proc in enumerate(self.procs):
            assert proc.stdin is not None
            job = {"catalog": catalog_url, "shards": shard_urls[w], "go": str(go)}
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        go.touch()
        results = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, self.stop()  # a worker died: show what it said
            results.append(json.loads(line))
        return results

    def stop(self) -> str:
        errors = []
        for proc in self.procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert "Traceback" not in err, err
            errors.append(err)
        return "\n".join(errors)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def residency_rows(shard: Shard) -> set[str]:
    with operator_transaction(shard) as conn:
        return set(conn.execute(sa.select(residency.c.tenant_id)).scalars())


def check(catalog_url: str, results: list[Any]) -> None:
    with Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url)) as catalog:
        snap = catalog.snapshot()
    assert all(r["init"] == CATALOG.head for r in results)
    reported = {t: s for r in results for t, s in r["tenants"].items()}
    assert len(reported) == WORKERS * TENANTS_PER_WORKER
    # every change landed, each exactly once, and each bumped the version once
    assert {t.id: t.shard for t in snap.tenants.values()} == reported
    assert set(snap.shards) == {s for r in results for s in r["shards"]}
    assert len(snap.shards) == WORKERS * SHARDS_PER_WORKER
    assert snap.version == 1 + WORKERS * (TENANTS_PER_WORKER + SHARDS_PER_WORKER)
    # the workers really ran at the same time
    assert max(r["start"] for r in results) < min(r["end"] for r in results)
    # every tenant's residency row is on its shard, and only there
    resident: Counter[str] = Counter()
    for shard in snap.shards.values():
        rows = residency_rows(shard)
        assert all(reported[t] == shard.name for t in rows), (shard.name, rows)
        resident.update(rows)
    assert resident == Counter(reported.keys())


def test_concurrent_writers_lose_nothing(tmp_path: Path, make_pg_database: DatabaseFactory) -> None:
    sqlite_catalog = f"sqlite:///{tmp_path / 'catalog.db'}"
    sqlite_shards = [
        [f"sqlite:///{tmp_path / f'w{w}-s{s}.db'}" for s in range(SHARDS_PER_WORKER)]
        for w in range(WORKERS)
    ]
    pg_catalog = make_pg_database(0)
    pg_shards = [
        [make_pg_database(s % 2) for s in range(SHARDS_PER_WORKER)] for _ in range(WORKERS)
    ]

    workers = Workers(tmp_path)
    try:
        on_sqlite = workers.run(sqlite_catalog, sqlite_shards, tmp_path / "go-sqlite")
        on_postgresql = workers.run(pg_catalog, pg_shards, tmp_path / "go-postgresql")
        workers.stop()  # end of input: they exit; nothing on stderr but warnings
    finally:
        workers.kill()

    check(sqlite_catalog, on_sqlite)
    check(pg_catalog, on_postgresql)
