"""How much data a rebalance moves when a shard joins the pool, against hashing.

    python benchmarks/rebalance.py [--tenants 500] [--exponent 1.0] [--seed 1] [--seeds 20]
                                   [--long-tail-tenants 10000] [--no-apply] [--out DIR]

**What the planner balances.** The default strategy, ``by_size``, balances the bytes
the tenants occupy; the planner adds to every tenant a base of 1% of the pool's mean
tenant size (``base_cost``: all bases together are 1% of the pool's bytes), so the
planner's load is bytes + that base. ``by_size_and_count`` adds the mean itself, so
tenant count weighs as much as bytes. Until the 1% base was introduced the default
added a fixed 64 KiB per tenant; an *old default* row emulates it with a custom cost
function (bytes + 65536 per tenant, no base) passed to ``plan_rebalance``, to show
what changed.

**Two pools**, each with three equal shared shards placed by tenantry's placement
ring and then settled by the planner (each strategy settles its own pool, as a pool
maintained with it would be); a fourth, empty shard of the same weight then joins:

- *Zipf*: ``--tenants`` tenants whose sizes follow a Zipf law (the k-th largest holds
  ``top / k**s`` bytes, ``s = --exponent``; the order of tenant ids is shuffled);
- *long tail*: ``--long-tail-tenants`` tenants (10,000), 95% of them under 100 rows
  (rows uniform in 1..99) and 5% with Zipf rows from ~1M down to 3,000 (the k-th
  largest holds ``1M / k**s`` rows, ``s`` such that the last holds 3,000), 200 bytes a
  row. Here most tenants are tiny, the mean tenant size is small, and a fixed per-tenant
  base would be a large part of the load.

Everything is computed by the planner on synthetic sizes: no database is needed.

**Compared, on the same tenants, in one run:**

- *planner*: ``plan_rebalance(strategy="by_size", threshold=0.10)`` once the fourth
  shard joins; in the long tail also ``by_size_and_count``; and the *old default*;
- *naive rehash*: ``md5(tenant) % 3`` before, ``md5(tenant) % 4`` after (a stable hash:
  Python's ``hash()`` is salted per process); every tenant whose slot changes moves;
- *consistent hash*: tenantry's own placement ring over three shards, then over four;
  every tenant whose ring position changes moves (what hashing instead of a directory
  would cost).

**Figures:** tenants and bytes moved, against the ideal 1/4 (the new shard's share:
the least any placement can move to fill it; within the 10% threshold, 22.5% suffices);
the spread of the measured bytes before (each placement's own three-shard pool) and
after (the largest relative distance of an active shard's bytes from its weighted
share, ``Plan.bytes_spread_after()``); the spread of the strategy's own load after
(what the planner brought within 10%: bytes + its base for ``by_size`` and
``by_size_and_count``, bytes + 64 KiB for the old default); the new shard's share of
the bytes and its tenants; planning time (median of repeats), also at 10x and 100x the
Zipf pool's tenants. Over ``--seeds`` random pools the same figures are summarised
(median and worst).

**End to end** (skip with ``--no-apply``): 40 tenants with Zipf-distributed rows on
three SQLite shards, a fourth added, sizes measured (``tenantry tenant sizes
--refresh``), the plan applied through the mover (offline moves), the sizes measured
again: the spread reached (of the planner's load and of the bytes), the bytes moved,
the base's part of the load (``base_cost``), how long it took, and every tenant's row
count unchanged.

Results go to ``benchmarks/results/rebalance.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    RESULTS_DIR,
    console,
    finish,
    fmt_bytes,
    machine_info,
    machine_markdown,
    markdown_table,
)
from _rebalance_pools import (
    BY_SIZE_AND_COUNT,
    BYTES_PER_ROW,
    NAME,
    NEW,
    OLD,
    OLD_BASE_BYTES,
    OLD_DEFAULT,
    PLANNER,
    TAIL_LOW_ROWS,
    TAIL_SMALL,
    TAIL_TOP_ROWS,
    THRESHOLD,
    TOP_BYTES,
    long_tail,
    scenario,
    summarise,
)
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import Base
from tenantry.migrations import upgrade
from tenantry.rebalance.apply import apply_plan, plan_for
from tenantry.rebalance.planner import (
    BASE_FRACTION,
    base_cost,
    by_size,
    plan_rebalance,
)
from tenantry.rebalance.sizes import measure_sizes, stored_sizes

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
            # The sizes the plan used (plan_for stored what it measured).
            used = [size for size, _shard, _when in stored_sizes(catalog).values()]
            base = base_cost(by_size, used)
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
                "base_cost": base,
                "base_cost_fraction": len(used) * base / load,
                "spread_before": plan.spread_before(),
                "spread_planned": plan.spread_after(),
                "spread_measured_after": after.spread_before(),
                "bytes_spread_before": plan.bytes_spread_before(),
                "bytes_spread_planned": plan.bytes_spread_after(),
                "bytes_spread_measured_after": after.bytes_spread_before(),
                "new_shard_share": after.bytes_before.get(NEW, 0.0) / total,
                "plan_with_refresh_s": planned_s,
                "apply_s": apply_s,
                "seconds_per_move": apply_s / max(1, len(plan.moves)),
                "rows_unchanged": row_counts(catalog) == counts,
            }


# -- output ----------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def placement_table(rows: Sequence[dict[str, Any]]) -> str:
    return markdown_table(
        [
            "placement",
            "tenants moved",
            "vs 1/4",
            "bytes moved",
            "of the pool",
            "vs 1/4",
            "bytes spread before",
            "bytes spread after",
            "strategy's spread after",
            "new shard: bytes",
            "new shard: tenants",
            "planning",
        ],
        [
            [
                r["placement"],
                f"{r['tenants_moved']:,}",
                f"{r['tenants_vs_ideal']:.2f}x",
                fmt_bytes(r["bytes_moved"]),
                pct(r["bytes_fraction"]),
                f"{r['bytes_vs_ideal']:.2f}x",
                pct(r["bytes_spread_before"]),
                pct(r["bytes_spread_after"]),
                "" if r["strategy_spread_after"] is None else pct(r["strategy_spread_after"]),
                pct(r["new_shard_share"]),
                f"{r['new_shard_tenants']:,}",
                seconds(r["planning_s"]) if "planning_s" in r else "",
            ]
            for r in rows
        ],
    )


def summary_table(summary: Sequence[dict[str, Any]]) -> str:
    return markdown_table(
        [
            "placement",
            "tenants moved (median / worst)",
            "bytes vs 1/4 (median / worst)",
            "bytes spread after (median / worst)",
            "new shard's bytes (median, range)",
            f"pools within {THRESHOLD:.0%} in bytes",
        ],
        [
            [
                s["placement"],
                f"{s['tenants_moved']['median']:,.0f} / {s['tenants_moved']['worst']:,}",
                f"{s['bytes_vs_ideal']['median']:.2f}x / {s['bytes_vs_ideal']['worst']:.2f}x",
                f"{pct(s['bytes_spread_after']['median'])} / "
                f"{pct(s['bytes_spread_after']['worst'])}",
                f"{pct(s['new_shard_share']['median'])} "
                f"({pct(s['new_shard_share']['min'])}-{pct(s['new_shard_share']['max'])})",
                f"{s['within_threshold']} of {s['pools']}",
            ]
            for s in summary
        ],
    )


def row_named(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in rows if r["placement"] == name)


def render_markdown(data: dict[str, Any]) -> str:
    head = data["headline"]
    cfg = data["config"]
    planner = row_named(head["rows"], PLANNER)
    old = row_named(head["rows"], OLD_DEFAULT)
    out = [
        "# Rebalancing: a fourth shard joins",
        "",
        f"`python benchmarks/rebalance.py {' '.join(data['machine']['argv'])}`".replace(" `", "`")
        + f" — {data['machine']['when']}, {data['duration_s']} s.",
        "",
        "What is measured: the bytes each placement moves when a fourth shard joins three, "
        "and how evenly the shards then hold the bytes. The planner's default strategy, "
        "`by_size`, balances bytes plus a base per tenant of "
        f"{BASE_FRACTION:.0%} of the pool's mean tenant size (`base_cost`); *bytes spread* "
        "is the largest relative distance of a shard's measured bytes from its share "
        "(`Plan.bytes_spread_after()`), *strategy's spread* the same for the load the "
        "strategy balances (what the planner brings within "
        f"{THRESHOLD:.0%}). 'Before' is each placement's own three-shard pool (each planner "
        "strategy settles its own). The *old default* row emulates `by_size` before issue "
        f"14: a custom cost function, bytes + {fmt_bytes(OLD_BASE_BYTES)} per tenant. Ideal: the "
        f"new shard's share, 1/4 (22.5% of the bytes is enough to be within the "
        f"{THRESHOLD:.0%} threshold).",
        "",
        "## Zipf pool",
        "",
        f"{cfg['tenants']} tenants, Zipf sizes (exponent {cfg['exponent']}, largest "
        f"{fmt_bytes(TOP_BYTES)} = {pct(head['largest_fraction'])} of "
        f"{fmt_bytes(head['total_bytes'])}; "
        f"mean {fmt_bytes(head['mean_bytes'])}, so `by_size`'s base is "
        f"{fmt_bytes(head['base_cost'])} per tenant), seed {head['seed']}. Ideal: "
        f"{head['ideal']['tenants']:.0f} tenants or {fmt_bytes(head['ideal']['bytes'])}.",
        "",
        placement_table(head["rows"]),
        "",
        f"Planner: {planner['reason']}. Settling the three-shard pool first took "
        f"{planner['settling_moves']} move(s) ({fmt_bytes(planner['settling_bytes'])}). With "
        f"tenants this large the old fixed base was {pct(head['old_base_fraction'])} of the "
        f"load and changed little (old default: {old['bytes_vs_ideal']:.2f}x of 1/4 moved, "
        f"bytes spread after {pct(old['bytes_spread_after'])}).",
        "",
        f"### Over {len(data['seeds'])} random pools",
        "",
        summary_table(data["summary"]),
    ]
    tail = data.get("long_tail")
    if tail:
        t = tail["headline"]
        tp = row_named(t["rows"], PLANNER)
        to = row_named(t["rows"], OLD_DEFAULT)
        tc = row_named(t["rows"], BY_SIZE_AND_COUNT)
        out += [
            "",
            "## Long tail",
            "",
            f"{t['tenants']:,} tenants: {t['small_tenants']:,} "
            f"({pct(t['small_tenants'] / t['tenants'])}) with 1-99 rows (uniform), "
            f"{t['tenants'] - t['small_tenants']:,} with Zipf rows from "
            f"{TAIL_TOP_ROWS:,} down to {TAIL_LOW_ROWS:,} (exponent {t['exponent']:.3f}); "
            f"{BYTES_PER_ROW} bytes a row, {fmt_bytes(t['total_bytes'])} in all, of which the "
            f"small tenants hold {pct(t['small_bytes_fraction'])}; seed {t['seed']}. The mean "
            f"tenant is {fmt_bytes(t['mean_bytes'])}, so `by_size`'s base is "
            f"{fmt_bytes(t['base_cost'])} per tenant ({BASE_FRACTION:.0%} of the bytes in all); "
            f"the old fixed {fmt_bytes(OLD_BASE_BYTES)} was {pct(t['old_base_fraction'])} of the "
            f"old load. Ideal: {t['ideal']['tenants']:,.0f} tenants or "
            f"{fmt_bytes(t['ideal']['bytes'])}.",
            "",
            placement_table(t["rows"]),
            "",
            f"Planner: {tp['reason']}; the bytes end within "
            f"{pct(tp['bytes_spread_after'])} of their shares, the new shard holding "
            f"{pct(tp['new_shard_share'])} of them, for {tp['bytes_vs_ideal']:.2f}x of 1/4 "
            f"moved; it moves large tenants, so the new shard gets "
            f"{tp['new_shard_tenants']:,} of the {t['tenants']:,} tenants (`by_size` leaves "
            "tenant counts aside). The old default balanced its own load to "
            f"{pct(to['strategy_spread_after'])}, but that load counted "
            f"{fmt_bytes(OLD_BASE_BYTES)} for each tiny tenant: in measured bytes it left a "
            f"spread of {pct(to['bytes_spread_after'])} (new shard "
            f"{pct(to['new_shard_share'])} of the bytes) and moved "
            f"{to['bytes_vs_ideal']:.2f}x of 1/4. `by_size_and_count` counts every tenant "
            "as the pool's mean size on top of its bytes, so a shard's tenant count weighs "
            "as much as its bytes; the planner fills the new shard largest tenant first, so "
            f"with {tc['new_shard_tenants']:,} tenants it makes up in bytes for the count it "
            f"lacks: it ends with {pct(tc['new_shard_share'])} of the bytes, "
            f"{tc['bytes_vs_ideal']:.2f}x of 1/4 moved. In a long-tail pool that strategy "
            "evens neither the bytes nor the tenant counts.",
            "",
            f"### Over {len(tail['seeds'])} random pools",
            "",
            summary_table(tail["summary"]),
        ]
    out += [
        "",
        "## Planning time by pool size (Zipf, by_size)",
        "",
        markdown_table(
            ["tenants", "moves", "bytes vs 1/4", "bytes spread after", "planning (median)"],
            [
                [
                    f"{s['tenants']:,}",
                    s["moves"],
                    f"{s['bytes_vs_ideal']:.2f}x",
                    pct(s["bytes_spread_after"]),
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
            f"{e2e['tenants']} tenants, {e2e['rows']:,} rows, {fmt_bytes(e2e['bytes'])} measured; "
            "a fourth shard added, `plan_for(refresh=True)`, `apply_plan(mode='offline')`, "
            "sizes measured again. The planner's base per tenant is "
            f"{BASE_FRACTION:.0%} of the mean tenant size ({fmt_bytes(e2e['base_cost'])}, "
            f"`base_cost`), {pct(e2e['base_cost_fraction'])} of the load: the plan balances "
            f"the bytes ({e2e['bytes_vs_ideal']:.2f}x of 1/4 moved, the load "
            f"{e2e['load_vs_ideal']:.2f}x). Spreads: of the planner's load, then of the "
            "measured bytes.",
            "",
            markdown_table(
                [
                    "moves (ok)",
                    "bytes moved",
                    "vs 1/4",
                    "spread before",
                    "planned after",
                    "measured after",
                    "bytes spread planned",
                    "bytes spread measured",
                    "new shard: bytes",
                    "plan (measuring)",
                    "apply",
                    "per move",
                    "rows unchanged",
                ],
                [
                    [
                        f"{e2e['moves']} ({e2e['ok']})",
                        fmt_bytes(e2e["bytes_moved"]),
                        f"{e2e['bytes_vs_ideal']:.2f}x",
                        pct(e2e["spread_before"]),
                        pct(e2e["spread_planned"]),
                        pct(e2e["spread_measured_after"]),
                        pct(e2e["bytes_spread_planned"]),
                        pct(e2e["bytes_spread_measured_after"]),
                        pct(e2e["new_shard_share"]),
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


def print_rows(title: str, rows: Sequence[dict[str, Any]]) -> None:
    console.print(title)
    for r in rows:
        console.print(
            f"  {r['placement']:<30} {r['tenants_moved']:>5} tenants "
            f"({r['tenants_vs_ideal']:.2f}x of 1/4), {fmt_bytes(r['bytes_moved']):>10} "
            f"({pct(r['bytes_fraction'])}, {r['bytes_vs_ideal']:.2f}x of 1/4), bytes spread "
            f"{pct(r['bytes_spread_before'])} -> {pct(r['bytes_spread_after'])}, new shard "
            f"{pct(r['new_shard_share'])}"
            + (f", planned in {seconds(r['planning_s'])}" if "planning_s" in r else "")
        )


def print_summary(data: dict[str, Any]) -> None:
    print_rows(f"Zipf pool, {data['headline']['tenants']:,} tenants:", data["headline"]["rows"])
    if "long_tail" in data:
        tail = data["long_tail"]["headline"]
        print_rows(f"Long tail, {tail['tenants']:,} tenants:", tail["rows"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What a rebalance moves when a shard joins.")
    parser.add_argument("--tenants", type=int, default=500, help="Zipf pool's tenants (500)")
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent (1.0)")
    parser.add_argument(
        "--long-tail-tenants",
        type=int,
        default=10_000,
        help="long-tail pool's tenants (10000; 0 skips it)",
    )
    parser.add_argument("--seed", type=int, default=1, help="the headline pools' seed (1)")
    parser.add_argument("--seeds", type=int, default=20, help="random pools summarised (20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed plans per pool (5)")
    parser.add_argument("--no-apply", action="store_true", help="skip the SQLite run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    info = machine_info()
    seeds = [args.seed + 1000 + i for i in range(args.seeds)]
    headline = scenario(args.tenants, args.exponent, args.seed, args.repeats)
    runs = [scenario(args.tenants, args.exponent, seed, 1) for seed in seeds]
    scaling = []
    for count in (args.tenants, 10 * args.tenants, 100 * args.tenants):
        run = (
            headline
            if count == args.tenants
            else scenario(count, args.exponent, args.seed, args.repeats if count <= 5000 else 1)
        )
        planner = row_named(run["rows"], PLANNER)
        scaling.append(
            {
                "tenants": count,
                "moves": planner["tenants_moved"],
                "bytes_vs_ideal": planner["bytes_vs_ideal"],
                "spread_after": planner["spread_after"],
                "bytes_spread_after": planner["bytes_spread_after"],
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
            "base_fraction": BASE_FRACTION,
            "old_base_bytes": OLD_BASE_BYTES,
            "long_tail": {
                "tenants": args.long_tail_tenants,
                "small_fraction": TAIL_SMALL,
                "small_rows": [1, 99],
                "top_rows": TAIL_TOP_ROWS,
                "low_rows": TAIL_LOW_ROWS,
                "bytes_per_row": BYTES_PER_ROW,
            },
            "seeds": args.seeds,
            "repeats": args.repeats,
        },
        "machine": info,
        "headline": headline,
        "seeds": seeds,
        "summary": summarise(runs),
        "pools": runs,
        "scaling": scaling,
    }
    if args.long_tail_tenants > 0:
        tail_runs = [long_tail(args.long_tail_tenants, seed, 1) for seed in seeds]
        data["long_tail"] = {
            "headline": long_tail(args.long_tail_tenants, args.seed, args.repeats),
            "seeds": seeds,
            "summary": summarise(tail_runs),
            "pools": tail_runs,
        }
    if not args.no_apply:
        data["end_to_end"] = end_to_end(40, args.exponent, args.seed)
    data["duration_s"] = round(time.monotonic() - started, 1)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
