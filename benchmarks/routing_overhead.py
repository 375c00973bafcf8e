"""What routing costs: router.session(t) against hand-made sessions on the same shard.

    python benchmarks/routing_overhead.py [--quick] [--pg-url URL ...] [--out DIR]

Every session connects as a NOSUPERUSER NOBYPASSRLS routing role (created here; the
shard's ``admin_url`` is the superuser URL, tenantry's operations role), so the
row-level-security policies run as in production. The shard database holds three
copies of the same rows (1000 tenants of 20 rows, and one tenant of 1,000 rows):

- ``bench_readings``: tenantry's signed policies (``install_rls``): reads compare the
  tenant column with ``(SELECT tenantry.tenant())``, which re-verifies the fence's
  HMAC once per statement;
- ``bench_readings_classic``: the classic hand-written policy,
  ``tenant_id = current_setting('tenantry.tenant_id', true)`` (tenantry's own policy
  before the signed fence);
- ``bench_readings_open``: no policy (row-level security off), readable by the role.

The same transaction (one point select of a row by ``(tenant_id, id)``, or five of
them) runs through

- ``routed``:  ``router.session(t)`` (map lookup, engine lease, the signed fence
  ``SELECT tenantry.fence(t, signature)``, ORM criteria) on ``bench_readings``;
- ``legacy``:  the same Router, on a second shard (a second database on the same
  server) whose fence is the statement tenantry ran before the signed fence
  (``SELECT set_config('tenantry.tenant_id', t, true), r.state, ... FROM
  tenantry_residency r``, with SELECT on the residency granted to the role; the
  benchmark swaps ``tenantry.router.fence._fence_postgresql`` for that shard only)
  and whose ``bench_readings`` has the classic policy: the router as it was, for a
  before/after comparison in the same run;
- ``setting``: ``Session(engine)`` that first runs
  ``SELECT set_config('tenantry.tenant_id', :t, true)``, then reads
  ``bench_readings_classic``: the standard row-level-security pattern written by hand;
- ``bare``:    ``Session(engine)`` with no setting, reading ``bench_readings_open``
  (as the same routing role, on the same pool: with no setting the classic policy
  would admit nothing, so the no-isolation baseline reads the table without policy);
- ``plain``:   ``bare`` on a second engine made with the same pool settings but
  without tenantry's engine events (for information; no target).

``routed``, ``setting`` and ``bare`` share ``router.engine_for(t)``, so their pools
are the same pool; ``legacy`` has the legacy shard's pool, made alike. Each
transaction ends like a typical read (session closed, so rolled back) or with a
commit: psycopg forgets its prepared statements at every ROLLBACK, so the two endings
differ. Tenants are drawn at random for each transaction. Rounds interleave every
variant and both thread counts in a fresh random order, so machine noise (other test
suites on the same machine) hits all variants alike; the per-round ratios show the
run's spread. The signed fence's cost is ``routed / legacy`` (target: at most 3%
more); ``legacy / setting`` and ``routed / setting`` are the before and after of the
ratio to the hand-written pattern.

Also measured: what each policy costs per statement (a point select and a 1,000-row
scan of one tenant, inside one routed transaction after the fence, on the three
tables, and on ``bench_readings`` as the operations role, which bypasses the
policies; interleaved); the first statement at the driver level; the lookup alone;
loading a 100,000-tenant map snapshot from a PostgreSQL and a SQLite catalog, and its
memory (tracemalloc); a map cache's refresh after one tenant changed (from the
catalog's change log); how long a new tenant takes to reach a second router process
by NOTIFY and by polling.

Without ``--pg-url`` throwaway PostgreSQL servers are started (tenantry.testing).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from _common import (
    Phases,
    add_server_options,
    finish,
    load_average,
    machine_info,
    pg_servers,
    timed,
)
from _routing_async import measure_async
from _routing_fleet import (
    FULL,
    NAME,
    QUICK,
    build_fleet,
)
from _routing_measure import (
    big_catalog,
    measure_driver,
    measure_lookup,
    measure_propagation,
    measure_snapshot,
    profile_paths,
    propagation_child,
    run_rounds,
)
from _routing_network import measure_network
from _routing_policy import (
    measure_policy,
)
from _routing_report import (
    latency_rows,
    print_summary,
    ratio_rows,
    render_markdown,
    targets,
)

from tenantry.testing import create_database, drop_database

# -- main -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    rng = random.Random(args.seed)
    phase = Phases()
    snapshot: dict[str, Any] = {}
    propagation: list[dict[str, Any]] = []
    profile = None
    with pg_servers(args.pg_url, count=2) as urls, ExitStack() as stack:
        info = machine_info(urls[:1])
        with phase("setup"):
            fleet = build_fleet(urls[0], urls[1], cfg, stack)
        with phase("lookup"):
            lookup = measure_lookup(fleet, cfg, args.seed)
        with phase("driver"):
            driver = measure_driver(fleet, cfg, args.seed)
        with phase("policy"):
            policy = measure_policy(fleet, cfg, args.seed)
        with phase("transactions"):
            results = run_rounds(fleet, cfg, args.seed)
        with phase("asyncio"):
            async_part = measure_async(fleet, cfg, args.seed)
        network = None
        if args.rtt:
            with phase("network"):
                network = measure_network(urls[0], urls[1], cfg, args.seed, args.rtt)
        if args.profile:
            with phase("profile"):
                profile = profile_paths(fleet, cfg, args.seed)
        with phase("propagation"):
            for mode in ("notify", "poll"):
                p = measure_propagation(
                    fleet.catalog,
                    fleet.shard.name,
                    mode,
                    cfg.poll_interval,
                    cfg.propagation_repeats,
                    rng,
                )
                p["label"] = (
                    "NOTIFY" if mode == "notify" else f"polling every {cfg.poll_interval} s"
                )
                propagation.append(p)
        with phase("snapshot, PostgreSQL"):
            big_url = create_database(urls[0])
            stack.callback(drop_database, big_url)
            with big_catalog(big_url, fleet.shard, cfg.snapshot_tenants) as catalog:
                snapshot["postgresql"] = measure_snapshot(catalog, cfg.snapshot_repeats)
                # A change reaches a router with a big map too (it reads only the change).
                p = measure_propagation(
                    catalog,
                    "bench-big",
                    "notify",
                    cfg.poll_interval,
                    max(2, cfg.propagation_repeats // 2),
                    rng,
                )
                p["label"] = f"NOTIFY, {cfg.snapshot_tenants:,}-tenant map"
                propagation.append(p)
        with phase("snapshot, SQLite"), tempfile.TemporaryDirectory(prefix="tenantry-") as folder:
            sqlite_url = f"sqlite:///{Path(folder) / 'catalog.db'}"
            with big_catalog(sqlite_url, fleet.shard, cfg.snapshot_tenants) as catalog:
                snapshot["sqlite"] = measure_snapshot(catalog, cfg.snapshot_repeats)

    data: dict[str, Any] = {
        "benchmark": NAME,
        "config": {**asdict(cfg), "threads": list(cfg.threads)},
        "seed": args.seed,
        "machine": info,
        "load_average_end": load_average(),
        "phases_s": phase.seconds,
        "ratios": ratio_rows(results, cfg.blocks),
        "latency": latency_rows(results),
        "isolation": fleet.checks,
        "driver": driver,
        "policy": policy,
        "lookup": lookup,
        "snapshot": snapshot,
        "propagation": propagation,
        "async": async_part,
    }
    data["targets"] = targets(data)
    if network is not None:
        data["network"] = network
    if profile is not None:
        data["profile"] = profile
    if args.raw_samples:
        data["samples_ns"] = {
            str(n): {v.key: s.rounds for v, s in by_variant.items()}
            for n, by_variant in results.items()
        }
    return data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="What routing costs: tenantry's Router against hand-made sessions."
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    add_server_options(parser)
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile routed and setting (into the JSON)"
    )
    parser.add_argument(
        "--rtt",
        type=float,
        nargs="*",
        default=[0.5],
        metavar="MS",
        help="round-trip times to add through a proxy (default: 0.5; none: skip that part)",
    )
    parser.add_argument(
        "--raw-samples", action="store_true", help="also write every latency into the JSON"
    )
    parser.add_argument("--child", choices=["notify", "poll"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return propagation_child(args.child)
    data = timed(run, args)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
