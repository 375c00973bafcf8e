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

from tenantry import Catalog, MapSnapshot, load_settings
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.schema import shards, tenants

__all__ = ["lookup_ns", "populate", "refresh_cpu"]


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
    """CPU per map change of a router's refresh, in milliseconds: ``total_ms`` (what
    :meth:`MapCache.refresh` costs: read what changed, apply it, swap), its parts
    ``delta_ms`` (:meth:`Catalog.map_delta`) and ``apply_ms`` (:meth:`MapSnapshot.apply`),
    and ``idle_ms``, a refresh that finds nothing new (the poll).

    Each change pins or unpins one random tenant (one map version, one tenant changed);
    the catalog write is not counted.
    """
    rng = random.Random(seed)
    cache = MapCache(catalog, background=False)
    try:
        ids = list(cache.snapshot.tenants)
        delta_s = apply_s = total_s = idle_s = 0.0
        pinned: dict[str, bool] = {}
        for round_ in range(2 * changes):
            tenant = rng.choice(ids)
            pinned[tenant] = not pinned.get(tenant, False)
            catalog.set_pinned(tenant, pinned[tenant])
            if round_ % 2 == 0:
                # The refresh's two steps one by one, as MapCache runs them.
                snapshot = cache.snapshot
                t0 = time.process_time()
                delta = catalog.map_delta(snapshot.version)
                t1 = time.process_time()
                assert delta is not None, "the change log must reach back one version"
                fresh = snapshot.apply(delta)
                t2 = time.process_time()
                delta_s += t1 - t0
                apply_s += t2 - t1
                cache.snapshot = fresh
            else:
                t0 = time.process_time()
                cache.refresh()
                t1 = time.process_time()
                cache.refresh()  # nothing new
                total_s += t1 - t0
                idle_s += time.process_time() - t1
            assert cache.snapshot.tenants[tenant].pinned is pinned[tenant]
        return {
            "tenants": len(cache.snapshot.tenants),
            "shards": len(cache.snapshot.shards),
            "changes": changes,
            "total_ms": total_s / changes * 1000,
            "delta_ms": delta_s / changes * 1000,
            "apply_ms": apply_s / changes * 1000,
            "idle_ms": idle_s / changes * 1000,
        }
    finally:
        cache.close()


def lookup_ns(snapshot: MapSnapshot, lookups: int = 200_000, *, seed: int = 1) -> dict[str, float]:
    """The hot path's lookup, ``snapshot.tenants.get(t)``, against the same lookup in a
    plain dict of the same tenants: nanoseconds per lookup (best of three runs each,
    interleaved), random known ids."""
    rng = random.Random(seed)
    ids = list(snapshot.tenants)
    keys = [rng.choice(ids) for _ in range(lookups)]
    plain = dict(snapshot.tenants)
    best = {"snapshot_ns": float("inf"), "dict_ns": float("inf")}
    for _ in range(3):
        for name, mapping in (("snapshot_ns", snapshot.tenants), ("dict_ns", plain)):
            get = mapping.get
            t0 = time.process_time()
            for key in keys:
                get(key)
            best[name] = min(best[name], (time.process_time() - t0) / lookups * 1e9)
    return best


def _measure(server_url: str, sizes: Sequence[int], shard_count: int, changes: int) -> None:
    from tenantry.testing import DatabaseFactory

    print(
        "| tenants | shards | refresh CPU/change | delta | apply | idle poll "
        "| get (map) | get (dict) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with DatabaseFactory([server_url]) as make:
        for size in sizes:
            url = str(make(0))
            with Catalog(url, settings=load_settings(catalog_url=url)) as catalog:
                catalog.init()
                populate(catalog, size, shard_count)
                with catalog.read_transaction() as conn:
                    conn.execute(sa.text("ANALYZE"))
                got = refresh_cpu(catalog, changes)
                gets = lookup_ns(catalog.snapshot())
            print(
                f"| {got['tenants']:,} | {got['shards']:,} | {got['total_ms']:.3f} ms "
                f"| {got['delta_ms']:.3f} | {got['apply_ms']:.3f} | {got['idle_ms']:.3f} "
                f"| {gets['snapshot_ns']:.0f} ns | {gets['dict_ns']:.0f} ns |",
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
