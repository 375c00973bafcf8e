"""How much data a rebalance moves when a shard joins the pool, against a naive rehash.

    python benchmarks/rebalance.py [--tenants 500] [--exponent 1.0] [--seed 1] [--seeds 20]
                                   [--no-apply] [--out DIR]

**The pool.** ``--tenants`` tenants whose sizes follow a Zipf law (the k-th largest
holds ``top / k**s`` bytes, ``s = --exponent``; the order of tenant ids is shuffled),
placed on three equal shared shards by tenantry's placement ring and then balanced by
the planner, as a maintained pool would be. A fourth, empty shard of the same weight
then joins. Everything below is computed by the planner on synthetic sizes: no
database is needed.

**Compared, on the same tenants, in one run:**

- *planner*: ``plan_rebalance(strategy="by_size", threshold=0.10)`` once the fourth
  shard joins;
- *naive rehash*: ``md5(tenant) % 3`` before, ``md5(tenant) % 4`` after (a stable hash:
  Python's ``hash()`` is salted per process); every tenant whose slot changes moves;
- *consistent hash*: tenantry's own placement ring over three shards, then over four;
  every tenant whose ring position changes moves (what hashing instead of a directory
  would cost).

**Figures:** tenants and bytes moved, against the ideal 1/4 (the new shard's share:
the least any placement can move to fill it; within the 10% threshold, 22.5% suffices);
the spread before and after (the planner's measure: the largest relative distance of
an active shard's load from its weighted share, load = bytes + 64 KiB per tenant);
planning time (median of repeats), also at 10x and 100x the tenants. Over ``--seeds``
random pools the same figures are summarised (median and worst).

**End to end** (skip with ``--no-apply``): 40 tenants with Zipf-distributed rows on
three SQLite shards, a fourth added, sizes measured (``tenantry tenant sizes
--refresh``), the plan applied through the mover (offline moves), the sizes measured
again: the spread reached, the bytes moved, how long it took, and every tenant's row
count unchanged.

Results go to ``benchmarks/results/rebalance.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    RESULTS_DIR,
    console,
    machine_info,
    machine_markdown,
    markdown_table,
    write_results,
)
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import Base
from tenantry.migrations import upgrade
from tenantry.moves.planner import BASE_COST_BYTES, TenantSize, by_size, plan_rebalance, spread
from tenantry.moves.rebalance import apply_plan, plan_for
from tenantry.moves.sizes import measure_sizes
from tenantry.shardmap.model import MapSnapshot, Shard, Tenant
from tenantry.shardmap.ring import PlacementRing

NAME = "rebalance"
OLD = ("s1", "s2", "s3")
NEW = "s4"
ALL = (*OLD, NEW)
THRESHOLD = 0.10
#: Bytes of the largest tenant; the rest fall off from it.
TOP_BYTES = 2 * 2**30


# -- pools -----------------------------------------------------------------------------


def zipf_sizes(count: int, exponent: float, rng: random.Random) -> dict[str, int]:
    """Tenant id -> bytes: the k-th largest holds TOP_BYTES / k**exponent."""
    sizes = [int(TOP_BYTES / k**exponent) for k in range(1, count + 1)]
    rng.shuffle(sizes)
    return {f"t{i:06d}": size for i, size in enumerate(sizes)}


def snapshot(placement: Mapping[str, str], shards: Sequence[str]) -> MapSnapshot:
    return MapSnapshot(
        1,
        {s: Shard(s, f"sqlite:///{s}.db") for s in shards},
        {t: Tenant(t, home) for t, home in placement.items()},
    )


def loads(placement: Mapping[str, str], sizes: Mapping[str, int]) -> dict[str, float]:
    found = dict.fromkeys(ALL, 0.0)
    for tenant, home in placement.items():
        found[home] += by_size(Tenant(tenant, home), TenantSize(bytes=sizes[tenant]))
    return found


def pool_spread(
    placement: Mapping[str, str], sizes: Mapping[str, int], shards: Sequence[str]
) -> float:
    return spread(loads(placement, sizes), {s: 1 / len(shards) for s in shards})


def md5_slot(tenant: str, slots: int) -> int:
    return int.from_bytes(hashlib.md5(tenant.encode()).digest()[:8], "big") % slots


def moved(
    before: Mapping[str, str], after: Mapping[str, str], sizes: Mapping[str, int]
) -> tuple[int, int]:
    tenants = [t for t in before if before[t] != after[t]]
    return len(tenants), sum(sizes[t] for t in tenants)


def timed(action: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The result of *action* and its median wall time in seconds over *repeats*."""
    times: list[float] = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def scenario(count: int, exponent: float, seed: int, repeats: int) -> dict[str, Any]:
    """Every placement's figures for one random pool."""
    rng = random.Random(seed)
    sizes = zipf_sizes(count, exponent, rng)
    total_bytes = sum(sizes.values())
    ideal = {"tenants": count / 4, "bytes": total_bytes / 4}

    def row(
        name: str, before: Mapping[str, str], after: Mapping[str, str], **extra: Any
    ) -> dict[str, Any]:
        tenants, size = moved(before, after, sizes)
        return {
            "placement": name,
            "tenants_moved": tenants,
            "tenants_vs_ideal": tenants / ideal["tenants"],
            "bytes_moved": size,
            "bytes_fraction": size / total_bytes,
            "bytes_vs_ideal": size / ideal["bytes"],
            "spread_before": pool_spread(before, sizes, OLD),
            "spread_after": pool_spread(after, sizes, ALL),
            "new_shard_share": loads(after, sizes)[NEW] / sum(loads(after, sizes).values()),
            **extra,
        }

    # The planner: ring placement on three shards, balanced, then the fourth joins.
    ring3, ring4 = PlacementRing(dict.fromkeys(OLD, 1)), PlacementRing(dict.fromkeys(ALL, 1))
    placed = {t: str(ring3.place(t)) for t in sizes}
    sized = {t: TenantSize(rows=b // 200, bytes=b) for t, b in sizes.items()}
    settle = plan_rebalance(snapshot(placed, OLD), sized, threshold=THRESHOLD)
    settled = dict(placed)
    for m in settle.moves:
        settled[m.tenant_id] = m.target
    plan, seconds = timed(
        lambda: plan_rebalance(snapshot(settled, ALL), sized, threshold=THRESHOLD), repeats
    )
    planned = dict(settled)
    for m in plan.moves:
        planned[m.tenant_id] = m.target
    assert plan.spread_after() == pool_spread(planned, sizes, ALL)
    rows = [
        row(
            "planner (by_size, 10%)",
            settled,
            planned,
            planning_s=seconds,
            reason=plan.reason,
            settling_moves=len(settle.moves),
            settling_bytes=settle.bytes,
        ),
        row(
            "naive rehash (md5 % 4)",
            {t: OLD[md5_slot(t, 3)] for t in sizes},
            {t: ALL[md5_slot(t, 4)] for t in sizes},
        ),
        row(
            "consistent hash (ring)",
            placed,
            {t: str(ring4.place(t)) for t in sizes},
        ),
    ]
    return {
        "seed": seed,
        "tenants": count,
        "total_bytes": total_bytes,
        "largest_fraction": max(sizes.values()) / total_bytes,
        "ideal": ideal,
        "rows": rows,
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for i, name in enumerate(r["placement"] for r in runs[0]["rows"]):
        rows = [run["rows"][i] for run in runs]
        entry: dict[str, Any] = {"placement": name, "pools": len(rows)}
        for key in ("tenants_moved", "bytes_vs_ideal", "spread_after"):
            values = [r[key] for r in rows]
            entry[key] = {"median": statistics.median(values), "worst": max(values)}
        entry["within_threshold"] = sum(r["spread_after"] <= THRESHOLD for r in rows)
        found.append(entry)
    return found


# -- end to end on SQLite --------------------------------------------------------------


def seed_rows(engine: sa.Engine, tenant: str, sessions: int) -> None:
    tables = Base.metadata.tables
    begin = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            tables["users"].insert(),
            [{"tenant_id": tenant, "id": 1, "email": f"u@{tenant}", "name": "User"}],
        )
        conn.execute(
            tables["chargers"].insert(),
            [
                {
                    "tenant_id": tenant,
                    "id": 1,
                    "name": "C1",
                    "location": "bay",
                    "power_kw": Decimal("22.50"),
                    "status": "available",
                }
            ],
        )
        conn.execute(
            tables["charging_sessions"].insert(),
            [
                {
                    "tenant_id": tenant,
                    "id": i,
                    "charger_id": 1,
                    "user_id": 1,
                    "started_at": begin + timedelta(minutes=i),
                    "ended_at": begin + timedelta(minutes=i + 30),
                    "energy_kwh": Decimal("1.125") * i,
                }
                for i in range(1, sessions + 1)
            ],
        )


def row_counts(catalog: Catalog) -> dict[str, int]:
    found = {}
    for tenant in catalog.list_tenants():
        engine = sa.create_engine(catalog.get_shard(tenant.shard).url, poolclass=NullPool)
        with engine.connect() as conn:
            found[tenant.id] = sum(
                conn.execute(
                    sa.text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": tenant.id}
                ).scalar_one()
                for t in ("users", "chargers", "charging_sessions")
            )
        engine.dispose()
    return found


def end_to_end(count: int, exponent: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sessions = [max(1, int(3000 / k**exponent)) for k in range(1, count + 1)]
    rng.shuffle(sessions)
    with tempfile.TemporaryDirectory(prefix="tenantry-rebalance-") as folder:
        root = Path(folder)
        settings = load_settings(
            catalog_url=f"sqlite:///{root / 'catalog.db'}", alembic_config=str(MIGRATIONS)
        )
        with Catalog(settings=settings) as catalog:
            catalog.init()
            for name in OLD:
                catalog.add_shard(name, f"sqlite:///{root / name}.db")
            assert upgrade(catalog, jobs=1).ok
            for i, n in enumerate(sessions):
                tenant = catalog.add_tenant(f"e{i:03d}")
                engine = sa.create_engine(catalog.get_shard(tenant.shard).url, poolclass=NullPool)
                seed_rows(engine, tenant.id, n)
                engine.dispose()
            settle = plan_for(catalog, refresh=True, threshold=THRESHOLD)
            settled = apply_plan(catalog, settle, mode="offline")
            assert all(r.ok for r in settled), [r.error for r in settled if not r.ok]
            counts = row_counts(catalog)
            catalog.add_shard(NEW, f"sqlite:///{root / NEW}.db")
            assert upgrade(catalog, jobs=1, shards=[NEW]).ok
            start = time.perf_counter()
            plan = plan_for(catalog, refresh=True, threshold=THRESHOLD)
            planned_s = time.perf_counter() - start
            start = time.perf_counter()
            results = apply_plan(catalog, plan, mode="offline")
            apply_s = time.perf_counter() - start
            measured = measure_sizes(catalog)
            after = plan_rebalance(catalog.snapshot(), measured, threshold=THRESHOLD)
            total = sum(s.bytes for s in measured.values())
            load = sum(plan.before.values())
            return {
                "tenants": count,
                "rows": sum(counts.values()),
                "bytes": total,
                "moves": len(plan.moves),
                "ok": sum(r.ok for r in results),
                "bytes_moved": plan.bytes,
                "bytes_vs_ideal": plan.bytes / (total / 4),
                "load_vs_ideal": sum(m.cost for m in plan.moves) / (load / 4),
                "base_cost_fraction": count * BASE_COST_BYTES / load,
                "spread_before": plan.spread_before(),
                "spread_planned": plan.spread_after(),
                "spread_measured_after": after.spread_before(),
                "plan_with_refresh_s": planned_s,
                "apply_s": apply_s,
                "seconds_per_move": apply_s / max(1, len(plan.moves)),
                "rows_unchanged": row_counts(catalog) == counts,
            }


# -- output ----------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def render_markdown(data: dict[str, Any]) -> str:
    head = data["headline"]
    cfg = data["config"]
    out = [
        "# Rebalancing: a fourth shard joins",
        "",
        f"`python benchmarks/rebalance.py {' '.join(data['machine']['argv'])}`".replace(" `", "`")
        + f" — {data['machine']['when']}, {data['duration_s']} s.",
        "",
        f"{cfg['tenants']} tenants, Zipf sizes (exponent {cfg['exponent']}, largest "
        f"{size(TOP_BYTES)} = {pct(head['largest_fraction'])} of {size(head['total_bytes'])}), "
        f"seed {head['seed']}. Three equal shards, placed by the ring and balanced by the "
        "planner; then a fourth, empty one. Ideal: the new shard's share, 1/4 = "
        f"{head['ideal']['tenants']:.0f} tenants or {size(head['ideal']['bytes'])} "
        f"(22.5% of the bytes is enough to be within the {THRESHOLD:.0%} threshold).",
        "",
        markdown_table(
            [
                "placement",
                "tenants moved",
                "vs 1/4",
                "bytes moved",
                "of the pool",
                "vs 1/4",
                "spread before",
                "spread after",
                "new shard's share",
                "planning",
            ],
            [
                [
                    r["placement"],
                    r["tenants_moved"],
                    f"{r['tenants_vs_ideal']:.2f}x",
                    size(r["bytes_moved"]),
                    pct(r["bytes_fraction"]),
                    f"{r['bytes_vs_ideal']:.2f}x",
                    pct(r["spread_before"]),
                    pct(r["spread_after"]),
                    pct(r["new_shard_share"]),
                    seconds(r["planning_s"]) if "planning_s" in r else "",
                ]
                for r in head["rows"]
            ],
        ),
        "",
        f"Planner: {head['rows'][0]['reason']}. Settling the three-shard pool first took "
        f"{head['rows'][0]['settling_moves']} move(s) "
        f"({size(head['rows'][0]['settling_bytes'])}). Spread: the largest relative "
        "distance of a shard's load (bytes + 64 KiB per tenant) from its share; "
        "'before' is each placement's own three-shard pool.",
        "",
        f"## Over {len(data['seeds'])} random pools",
        "",
        markdown_table(
            [
                "placement",
                "tenants moved (median / worst)",
                "bytes vs 1/4 (median / worst)",
                "spread after (median / worst)",
                f"pools within {THRESHOLD:.0%}",
            ],
            [
                [
                    s["placement"],
                    f"{s['tenants_moved']['median']:.0f} / {s['tenants_moved']['worst']}",
                    f"{s['bytes_vs_ideal']['median']:.2f}x / {s['bytes_vs_ideal']['worst']:.2f}x",
                    f"{pct(s['spread_after']['median'])} / {pct(s['spread_after']['worst'])}",
                    f"{s['within_threshold']} of {s['pools']}",
                ]
                for s in data["summary"]
            ],
        ),
        "",
        "## Planning time by pool size",
        "",
        markdown_table(
            ["tenants", "moves", "bytes vs 1/4", "spread after", "planning (median)"],
            [
                [
                    f"{s['tenants']:,}",
                    s["moves"],
                    f"{s['bytes_vs_ideal']:.2f}x",
                    pct(s["spread_after"]),
                    seconds(s["planning_s"]),
                ]
                for s in data["scaling"]
            ],
        ),
    ]
    e2e = data.get("end_to_end")
    if e2e:
        out += [
            "",
            "## End to end on SQLite",
            "",
            f"{e2e['tenants']} tenants, {e2e['rows']:,} rows, {size(e2e['bytes'])} measured; "
            "a fourth shard added, `plan_for(refresh=True)`, `apply_plan(mode='offline')`, "
            "sizes measured again. With data this small the planner's base cost per tenant "
            f"(64 KiB) is {pct(e2e['base_cost_fraction'])} of the load, so the plan evens "
            "tenant counts as much as bytes: judge it by the load moved "
            f"({e2e['load_vs_ideal']:.2f}x of 1/4), not the bytes.",
            "",
            markdown_table(
                [
                    "moves (ok)",
                    "bytes moved",
                    "vs 1/4",
                    "spread before",
                    "planned after",
                    "measured after",
                    "plan (measuring)",
                    "apply",
                    "per move",
                    "rows unchanged",
                ],
                [
                    [
                        f"{e2e['moves']} ({e2e['ok']})",
                        size(e2e["bytes_moved"]),
                        f"{e2e['bytes_vs_ideal']:.2f}x",
                        pct(e2e["spread_before"]),
                        pct(e2e["spread_planned"]),
                        pct(e2e["spread_measured_after"]),
                        seconds(e2e["plan_with_refresh_s"]),
                        seconds(e2e["apply_s"]),
                        seconds(e2e["seconds_per_move"]),
                        "yes" if e2e["rows_unchanged"] else "NO",
                    ]
                ],
            ),
        ]
    out += ["", "## Machine", "", machine_markdown(data["machine"])]
    return "\n".join(out)


def print_summary(data: dict[str, Any]) -> None:
    for r in data["headline"]["rows"]:
        console.print(
            f"{r['placement']:<24} {r['tenants_moved']:>4} tenants "
            f"({r['tenants_vs_ideal']:.2f}x of 1/4), {size(r['bytes_moved']):>10} "
            f"({pct(r['bytes_fraction'])}, {r['bytes_vs_ideal']:.2f}x of 1/4), spread "
            f"{pct(r['spread_before'])} -> {pct(r['spread_after'])}"
            + (f", planned in {seconds(r['planning_s'])}" if "planning_s" in r else "")
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What a rebalance moves when a shard joins.")
    parser.add_argument("--tenants", type=int, default=500, help="tenants (default: 500)")
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent (1.0)")
    parser.add_argument("--seed", type=int, default=1, help="the headline pool's seed (1)")
    parser.add_argument("--seeds", type=int, default=20, help="random pools summarised (20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed plans per pool (5)")
    parser.add_argument("--no-apply", action="store_true", help="skip the SQLite run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    info = machine_info()
    headline = scenario(args.tenants, args.exponent, args.seed, args.repeats)
    runs = [
        scenario(args.tenants, args.exponent, args.seed + 1000 + i, 1) for i in range(args.seeds)
    ]
    scaling = []
    for count in (args.tenants, 10 * args.tenants, 100 * args.tenants):
        run = (
            headline
            if count == args.tenants
            else scenario(count, args.exponent, args.seed, args.repeats if count <= 5000 else 1)
        )
        planner = run["rows"][0]
        scaling.append(
            {
                "tenants": count,
                "moves": planner["tenants_moved"],
                "bytes_vs_ideal": planner["bytes_vs_ideal"],
                "spread_after": planner["spread_after"],
                "planning_s": planner["planning_s"],
            }
        )
    data: dict[str, Any] = {
        "benchmark": NAME,
        "config": {
            "tenants": args.tenants,
            "exponent": args.exponent,
            "top_bytes": TOP_BYTES,
            "threshold": THRESHOLD,
            "seeds": args.seeds,
            "repeats": args.repeats,
        },
        "machine": info,
        "headline": headline,
        "seeds": [run["seed"] for run in runs],
        "summary": summarise(runs),
        "pools": runs,
        "scaling": scaling,
    }
    if not args.no_apply:
        data["end_to_end"] = end_to_end(40, args.exponent, args.seed)
    data["duration_s"] = round(time.monotonic() - started, 1)
    json_path, md_path = write_results(NAME, data, render_markdown(data), args.out)
    print_summary(data)
    console.print(f"wrote {json_path} and {md_path} ({data['duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
