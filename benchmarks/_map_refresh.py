"""What one map change costs a router: the CPU of its refresh (read the version, read
what changed, apply it to the snapshot, swap), at a given map size.

A module for the fleet benchmarks to call (:func:`populate`, :func:`refresh_cpu`), and a
script that prints the figures at several sizes::

    .venv/bin/python benchmarks/_map_refresh.py                      # 1k, 10k, 100k tenants
    .venv/bin/python benchmarks/_map_refresh.py --tenants 100000 --shards 1000 \\
        --pg-url postgresql://postgres@127.0.0.1:5432/postgres

CPU is the process's CPU time (``time.process_time``) summed over many changes, so a
loaded machine slows the figures little: the catalog server's work is in other
processes and not counted. The catalog rows are written directly (shards with URLs that
are never connected to): a refresh reads only the catalog.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tenantry import Catalog, load_settings
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.schema import shards, tenants

__all__ = ["populate", "refresh_cpu"]


def populate(catalog: Catalog, tenant_count: int, shard_count: int = 10) -> None:
    """Register *shard_count* shared shards (never connected to) and *tenant_count*
    tenants spread over them, in one catalog transaction (one map version)."""
    now = datetime.now(UTC)
    names = [f"s{i:04d}" for i in range(shard_count)]
    with catalog.transaction() as (conn, _version):
        conn.execute(
            shards.insert(),
            [
                {
                    "name": name,
                    "url": f"postgresql+psycopg://app@127.0.0.1:9/{name}",
                    "admin_url": None,
                    "tier": "shared",
                    "state": "active",
                    "weight": 1,
                    "created_at": now,
                }
                for name in names
            ],
        )
        for start in range(0, tenant_count, 10_000):
            conn.execute(
                tenants.insert(),
                [
                    {
                        "id": f"t{i:07d}",
                        "shard": names[i % shard_count],
                        "tier": "shared",
                        "pinned": False,
                        "state": "active",
                        "created_at": now,
                    }
                    for i in range(start, min(start + 10_000, tenant_count))
                ],
            )


def refresh_cpu(catalog: Catalog, changes: int = 200, *, seed: int = 1) -> dict[str, Any]:
    """CPU per map change of a router's refresh, in milliseconds: ``total`` (what
    :meth:`MapCache.refresh` costs), and its parts ``version`` (read the map version),
    ``delta`` (read what changed) and ``apply`` (build the new snapshot).

    Each change pins or unpins one random tenant (one map version, one tenant changed);
    the catalog write is not counted.
    """
    rng = random.Random(seed)
    cache = MapCache(catalog, background=False)
    try:
        ids = list(cache.snapshot.tenants)
        parts = {"version": 0.0, "delta": 0.0, "apply": 0.0}
        total = 0.0
        pinned: dict[str, bool] = {}
        for round_ in range(2 * changes):
            tenant = rng.choice(ids)
            pinned[tenant] = not pinned.get(tenant, False)
            catalog.set_pinned(tenant, pinned[tenant])
            if round_ % 2 == 0:
                # The refresh's steps one by one, as MapCache runs them.
                snapshot = cache.snapshot
                t0 = time.process_time()
                catalog.map_version()
                t1 = time.process_time()
                delta = catalog.map_delta(snapshot.version)
                t2 = time.process_time()
                assert delta is not None, "the change log must reach back one version"
                fresh = snapshot.apply(delta)
                t3 = time.process_time()
                parts["version"] += t1 - t0
                parts["delta"] += t2 - t1
                parts["apply"] += t3 - t2
                cache.snapshot = fresh
            else:
                t0 = time.process_time()
                cache.refresh()
                total += time.process_time() - t0
            assert cache.snapshot.tenants[tenant].pinned is pinned[tenant]
        return {
            "tenants": len(cache.snapshot.tenants),
            "shards": len(cache.snapshot.shards),
            "changes": changes,
            "total_ms": total / changes * 1000,
            **{f"{name}_ms": value / changes * 1000 for name, value in parts.items()},
        }
    finally:
        cache.close()


def _measure(server_url: str, sizes: Sequence[int], shard_count: int, changes: int) -> None:
    from tenantry.testing import DatabaseFactory

    print("| tenants | shards | refresh CPU/change | version | delta | apply |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with DatabaseFactory([server_url]) as make:
        for size in sizes:
            url = str(make(0))
            with Catalog(url, settings=load_settings(catalog_url=url)) as catalog:
                catalog.init()
                populate(catalog, size, shard_count)
                with catalog.read_transaction() as conn:
                    conn.execute(sa.text("ANALYZE"))
                got = refresh_cpu(catalog, changes)
            print(
                f"| {got['tenants']:,} | {got['shards']:,} | {got['total_ms']:.3f} ms "
                f"| {got['version_ms']:.3f} | {got['delta_ms']:.3f} | {got['apply_ms']:.3f} |",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> None:
    """Print the refresh CPU per change at each ``--tenants`` size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--pg-url", help="superuser URL of a running server (default: start one)")
    args = parser.parse_args(argv)
    if args.pg_url:
        _measure(args.pg_url, args.tenants, args.shards, args.changes)
        return
    from tenantry.testing import PostgresServers

    with PostgresServers(count=1, name="tenantry-bench") as servers:
        _measure(servers.urls[0], args.tenants, args.shards, args.changes)


if __name__ == "__main__":
    main(sys.argv[1:])
