"""routing_overhead.py's analysis and report: ratios over samples and blocks, the targets,
the Markdown rendered from the results JSON alone, and the printed summary.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from _common import (
    console,
    fmt_ns,
    machine_markdown,
    markdown_table,
    percentile,
    summarize,
    verdict,
)
from _routing_fleet import (
    ENDINGS,
    ROUTE_LABELS,
    ROUTES,
    STATEMENTS,
    TARGET_CPU_VS_BARE,
    TARGET_LOOKUP_NS,
    TARGET_VS_BARE,
    TARGET_VS_LEGACY,
    TARGET_VS_SETTING,
    VARIANTS,
    Variant,
)
from _routing_measure import (
    Samples,
)
from _routing_policy import (
    POLICY_LABELS,
)

# -- analysis -----------------------------------------------------------------------------


def ratio(num: Samples, den: Samples, blocks: int) -> dict[str, Any]:
    """num / den: p50 and p99 over the run, client CPU, and the p50 ratio per block."""
    num_all, den_all = num.latencies, den.latencies
    per_block = [
        percentile(a, 50) / percentile(b, 50)
        for a, b in zip(num.blocks(blocks), den.blocks(blocks), strict=True)
    ]
    return {
        "p50": percentile(num_all, 50) / percentile(den_all, 50),
        "p99": percentile(num_all, 99) / percentile(den_all, 99),
        # CPU: the cheapest round of each, the least disturbed by others.
        "client_cpu_min": min(num.cpu_per_tx) / min(den.cpu_per_tx),
        "blocks_p50": {
            "median": statistics.median(per_block),
            "min": min(per_block),
            "max": max(per_block),
            "all": per_block,
        },
    }


def ratio_rows(results: dict[int, dict[Variant, Samples]], blocks: int) -> list[dict[str, Any]]:
    """For every cell: routed / setting, bare, plain and legacy (the router before the
    signed fence), and legacy / setting and bare (the ratios as they were)."""
    rows = []
    for n, by_variant in results.items():
        for statements in STATEMENTS:
            for ending in ENDINGS:
                cell = {r: by_variant[Variant(r, statements, ending)] for r in ROUTES}
                row: dict[str, Any] = {"threads": n, "statements": statements, "ending": ending}
                for base in ("setting", "bare", "plain", "legacy"):
                    row[base] = ratio(cell["routed"], cell[base], blocks)
                for base in ("setting", "bare"):
                    row[f"legacy_vs_{base}"] = ratio(cell["legacy"], cell[base], blocks)
                row["verdicts"] = {
                    "setting_p50": verdict(row["setting"]["p50"], TARGET_VS_SETTING),
                    "bare_p50": verdict(row["bare"]["p50"], TARGET_VS_BARE[statements]),
                    "legacy_p50": verdict(row["legacy"]["p50"], TARGET_VS_LEGACY),
                }
                rows.append(row)
    return rows


def latency_rows(results: dict[int, dict[Variant, Samples]]) -> list[dict[str, Any]]:
    rows = []
    for n, by_variant in results.items():
        for variant in VARIANTS:
            samples = by_variant[variant]
            cpu = sorted(samples.cpu_per_tx)
            rows.append(
                {
                    "threads": n,
                    "route": variant.route,
                    "statements": variant.statements,
                    "ending": variant.ending,
                    "us": summarize(samples.latencies, scale=1_000),
                    "round_p50_us": [percentile(r, 50) / 1_000 for r in samples.rounds],
                    "round_max_us": [max(r) / 1_000 for r in samples.rounds],
                    # The benchmark process's CPU (all threads) per transaction: the
                    # Python side's cost, without network and server time.
                    "client_cpu_us": {
                        "min": cpu[0] / 1_000,
                        "p25": percentile(cpu, 25) / 1_000,
                        "median": percentile(cpu, 50) / 1_000,
                    },
                }
            )
    return rows


# -- report ---------------------------------------------------------------------------


def _x(value: float) -> str:
    return f"{value:.3f}"


def _spread(d: dict[str, Any]) -> str:
    return f"{d['min']:.2f}-{d['max']:.2f}"


def _cell(r: dict[str, Any]) -> str:
    selects = "1 select" if r["statements"] == 1 else f"{r['statements']} selects"
    return f"{r['threads']} thr, {selects}, {r['ending']}"


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target, cell by cell: value, target, PASS or MISS, and the blocks' spread."""
    out = []
    bases: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("legacy", lambda _r: TARGET_VS_LEGACY),
        ("setting", lambda _r: TARGET_VS_SETTING),
        ("bare", lambda r: TARGET_VS_BARE[r["statements"]]),
    ]
    for base, target_of in bases:
        for r in data["ratios"]:
            target = target_of(r)
            out.append(
                {
                    "figure": f"routed / {base} p50 ({_cell(r)})",
                    "value": _x(r[base]["p50"]),
                    "target": f"<= {target}",
                    "verdict": verdict(r[base]["p50"], target),
                    "spread": _spread(r[base]["blocks_p50"]),
                }
            )
    for r in data["ratios"]:
        cpu = r["bare"]["client_cpu_min"]
        out.append(
            {
                "figure": f"routed / bare client CPU per transaction ({_cell(r)})",
                "value": _x(cpu),
                "target": f"<= {TARGET_CPU_VS_BARE}",
                "verdict": verdict(cpu, TARGET_CPU_VS_BARE),
                "spread": "",
            }
        )
    out += async_targets(data)
    lookup = data["lookup"]["router.shard_for(t)"]["median_ns"]
    out.append(
        {
            "figure": "lookup alone, router.shard_for(t)",
            "value": fmt_ns(lookup),
            "target": f"<= {fmt_ns(TARGET_LOOKUP_NS)}",
            "verdict": verdict(lookup, TARGET_LOOKUP_NS),
            "spread": "",
        }
    )
    return out


def render_markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    empty = data["policy"]["functions"]["(empty loop)"]
    model = data["policy"]["server_model"]
    machine = data["machine"]
    batches = ", ".join(
        f"{size} transactions per variant{' per thread' if n > 1 else ''} at {n} "
        f"thread{'s' if n > 1 else ''}"
        for n, size in cfg["batch"]
    )
    misses = sum(t["verdict"] == "MISS" for t in data["targets"])
    lines = [
        "# Routing overhead",
        "",
        f"`python benchmarks/routing_overhead.py {' '.join(machine['argv'])}`".replace(" `", "`")
        + f" — {machine['when']}, {cfg['mode']} run of {data['duration_s']} s on "
        f"{machine['cores']} cores. {cfg['rounds']} rounds; each round runs every variant at "
        f"every thread count in a fresh random order ({batches}); "
        f"{cfg['tenants']} tenants on the shared shard and {cfg['tenants']} on the legacy "
        "shard (a second database on the same server), one drawn at random per transaction; "
        "every session connects as a NOSUPERUSER NOBYPASSRLS routing role. "
        f"Load average {machine['load_average']} at the start, {data['load_average_end']} at "
        "the end: other work shared the machine, so read the spread between blocks "
        f"({cfg['blocks']} blocks of consecutive rounds) next to each ratio.",
        "",
        f"**{len(data['targets']) - misses} of {len(data['targets'])} targets met; "
        f"{misses} missed.**",
        "",
        "## Targets",
        "",
        markdown_table(
            ["figure", "value", "target", "verdict", "blocks min-max"],
            [
                [t["figure"], t["value"], t["target"], f"**{t['verdict']}**", t["spread"]]
                for t in data["targets"]
            ],
            align="lrrcr",
        ),
        "",
        "## Before and after the signed fence",
        "",
        "*Before*: `legacy` (the same Router, the fence statement of commit 2cc1d25, the "
        "classic `current_setting` policy) over `setting` (Session + set_config on the "
        "classic policy); *after*: `routed` (signed fence, signed policies) over the same "
        "`setting`. *routed / legacy* is what the signed fence adds (target "
        f"<= {TARGET_VS_LEGACY}); *blocks*: its min-max over blocks of consecutive rounds.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "before: legacy / setting",
                "after: routed / setting",
                "routed / legacy",
                "blocks",
                "verdict",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    _x(r["legacy_vs_setting"]["p50"]),
                    _x(r["setting"]["p50"]),
                    _x(r["legacy"]["p50"]),
                    _spread(r["legacy"]["blocks_p50"]),
                    f"**{r['verdicts']['legacy_p50']}**",
                ]
                for r in data["ratios"]
            ],
            align="rrlrrrrc",
        ),
        "",
        "In the server, by "
        f"{data['policy']['server_basis']} time (the loops below, which the load on the "
        "machine stretches far less than the transactions' wall time): the signed fence "
        f"costs {model['fence_extra_us']:+.1f} µs over the old fence statement, and each "
        f"point select {model['per_select_extra_us']:+.1f} µs under the signed policy over "
        "the classic one, so a routed transaction costs the server "
        + " and ".join(
            f"{v:+.0f} µs ({n} select{'s' if n != '1' else ''})"
            for n, v in model["transaction_extra_us"].items()
        )
        + " more than before the signed fence.",
        "",
        "## What a policy costs per statement",
        "",
        f"Inside one routed transaction of a tenant of {data['policy']['tenant_rows']:,} "
        "rows (after its signed fence), raw psycopg: a point select by `(tenant_id, id)` and "
        "a scan of all the tenant's rows, on the table with the signed policies, the classic "
        "policy and no policy, and on the signed table as the operations role (a "
        "superuser, which bypasses row-level security); every statement of every variant in "
        "a fresh random order. Prepared (psycopg prepares from the 6th execution; the first "
        f"{cfg['policy_warmup']} iterations of each transaction are not counted). "
        "*In the server*: the same statement in a loop inside a DO block "
        f"({data['policy']['server_loop_n']['point']} point selects, "
        f"{data['policy']['server_loop_n']['scan']} scans; `PERFORM`, so no rows are "
        "sent), divided by the count: *wall* by `clock_timestamp()`, *CPU* the backend "
        "process's CPU time (`/proc/<pid>/schedstat`; the server runs on this machine), "
        "which waiting for a core does not stretch. Medians over "
        f"{cfg['policy_rounds'] * 2} loops of each.",
        "",
        markdown_table(
            [
                "statement",
                "variant",
                "n",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "server wall µs",
                "server CPU µs",
            ],
            [
                [
                    st["statement"],
                    POLICY_LABELS[name],
                    d["n"],
                    f"{d['p50']:.1f}",
                    f"{d['p90']:.1f}",
                    f"{d['p99']:.1f}",
                    f"{st['server_wall_us'][name]['median']:.1f}",
                    f"{st['server_cpu_us'][name]['median']:.1f}" if "server_cpu_us" in st else "",
                ]
                for st in data["policy"]["statements"]
                for name, d in st["us"].items()
            ],
            align="llrrrrrr",
        ),
        "",
        "The policies' functions alone, per call, in the same routed transaction (a loop "
        f"of {data['policy']['server_loop_n']['function']} calls; median, p25-p75; *net*: "
        "less the empty loop's):",
        "",
        markdown_table(
            ["function", "server wall µs", "net", "server CPU µs", "net", "CPU p25-p75"],
            [
                [
                    f"`{name}`" if name.endswith(")") and not name.startswith("(") else name,
                    f"{f['wall_us']['median']:.2f}",
                    f"{f['wall_us']['median'] - empty['wall_us']['median']:.2f}",
                    f"{f['cpu_us']['median']:.2f}" if "cpu_us" in f else "",
                    f"{f['cpu_us']['median'] - empty['cpu_us']['median']:.2f}"
                    if "cpu_us" in f
                    else "",
                    f"{f['cpu_us']['p25']:.2f}-{f['cpu_us']['p75']:.2f}" if "cpu_us" in f else "",
                ]
                for name, f in data["policy"]["functions"].items()
            ],
        ),
        "",
        "*a - b*: difference of the p50s in µs (min-max over blocks of rounds); *paired*: "
        "median of the differences of statements of the same iteration (p25-p75); *a / b*: "
        "ratio of the p50s; *server*: the same from the loops in the server, by "
        f"{data['policy']['server_basis']} time (median of the differences within a pass, "
        "p25-p75; ratio of the medians).",
        "",
        markdown_table(
            [
                "statement",
                "a",
                "b",
                "a - b (µs)",
                "blocks",
                "paired (µs)",
                "a / b",
                "server a - b (µs)",
                "p25-p75",
                "server a / b",
            ],
            [
                [
                    st["statement"],
                    c["a"],
                    c["b"],
                    f"{c['diff_p50_us']:+.1f}",
                    f"{c['blocks_diff_us']['min']:+.1f} to {c['blocks_diff_us']['max']:+.1f}",
                    f"{c['paired_diff_us']['median']:+.1f} "
                    f"({c['paired_diff_us']['p25']:+.1f} to {c['paired_diff_us']['p75']:+.1f})",
                    f"{c['ratio_p50']:.3f}",
                    f"{c['server_diff_us']['median']:+.1f}",
                    f"{c['server_diff_us']['p25']:+.1f} to {c['server_diff_us']['p75']:+.1f}",
                    f"{c['server_ratio']:.3f}",
                ]
                for st in data["policy"]["statements"]
                for c in st["compare"]
            ],
            align="lllrrrrrrr",
        ),
        "",
        "## Row-level security binds the routing role",
        "",
        "Rows the routing role sees (`count(*)`, checked before measuring; the benchmark "
        "stops if any differs from what the policies should admit).",
        "",
        markdown_table(
            ["table, transaction", "rows"],
            [[k, f"{v:,}"] for k, v in data["isolation"].items()],
        ),
        "",
        "## Ratios (routed / baseline)",
        "",
        "p50 and p99 over every transaction of the run; *blocks* is the min-max of the p50 "
        "ratio over blocks of consecutive rounds; *CPU* is the ratio of the benchmark "
        "process's CPU time per transaction in each variant's least disturbed round.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "/setting p50",
                "p99",
                "blocks",
                "CPU",
                "/bare p50",
                "p99",
                "blocks",
                "CPU",
                "/plain p50",
                "/legacy p50",
                "p99",
                "CPU",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    _x(r["setting"]["p50"]),
                    _x(r["setting"]["p99"]),
                    _spread(r["setting"]["blocks_p50"]),
                    f"{r['setting']['client_cpu_min']:.2f}",
                    _x(r["bare"]["p50"]),
                    _x(r["bare"]["p99"]),
                    _spread(r["bare"]["blocks_p50"]),
                    f"{r['bare']['client_cpu_min']:.2f}",
                    _x(r["plain"]["p50"]),
                    _x(r["legacy"]["p50"]),
                    _x(r["legacy"]["p99"]),
                    f"{r['legacy']['client_cpu_min']:.2f}",
                ]
                for r in data["ratios"]
            ],
            align="rrl" + "r" * 12,
        ),
        "",
        "## Latency per transaction (µs)",
        "",
        "*CPU* is the benchmark process's CPU time per transaction (all threads; min and "
        "median over rounds): the Python side's cost plus the kernel's for the socket.",
        "",
        markdown_table(
            [
                "threads",
                "selects",
                "ending",
                "route",
                "n",
                "p50",
                "p90",
                "p99",
                "CPU min",
                "median",
            ],
            [
                [
                    r["threads"],
                    r["statements"],
                    r["ending"],
                    ROUTE_LABELS[r["route"]],
                    r["us"]["n"],
                    f"{r['us']['p50']:.0f}",
                    f"{r['us']['p90']:.0f}",
                    f"{r['us']['p99']:.0f}",
                    f"{r['client_cpu_us']['min']:.0f}",
                    f"{r['client_cpu_us']['median']:.0f}",
                ]
                for r in data["latency"]
            ],
            align="rrllrrrrrr",
        ),
        "",
        "## The first statement at the driver level (µs)",
        "",
        "Raw psycopg as the routing role, no SQLAlchemy: BEGIN, the first statement, one "
        "point select of the table that goes with it, ROLLBACK (one thread, interleaved; "
        "the signed fence's HMAC is computed in Python in the timing, as the router does "
        "for a tenant new to the connection; the old fence runs on the legacy shard).",
        "",
        markdown_table(
            ["first statement", "n", "p50", "p99", "added to p50"],
            [
                [
                    name,
                    d["n"],
                    f"{d['p50']:.0f}",
                    f"{d['p99']:.0f}",
                    f"{d['added_p50_us']:+.0f}",
                ]
                for name, d in data["driver"].items()
            ],
        ),
        "",
        "## Lookup alone",
        "",
        f"Mean per call over {cfg['lookup_calls']:,} random tenants; median of "
        f"{cfg['lookup_repeats']} repeats (min-max).",
        "",
        markdown_table(
            ["call", "median", "min-max"],
            [
                [name, fmt_ns(v["median_ns"]), f"{fmt_ns(v['min_ns'])}-{fmt_ns(v['max_ns'])}"]
                for name, v in data["lookup"].items()
            ],
        ),
        "",
        f"## Map snapshot of {cfg['snapshot_tenants']:,} tenants",
        "",
        "`catalog.snapshot()` timed without tracemalloc; memory from one more call under "
        "tracemalloc (*held*: what the snapshot keeps alive; *peak*: while it loads). "
        "*Refresh after one change*: a `MapCache` refreshing after one tenant was pinned "
        "or unpinned (median; it reads the catalog's change log, the shards and that "
        "tenant, and applies them to its snapshot).",
        "",
        markdown_table(
            [
                "catalog",
                "load median",
                "min-max",
                "refresh after one change",
                "held",
                "per tenant",
                "peak",
            ],
            [
                [
                    backend,
                    fmt_ns(s["load_ns"]["p50"]),
                    f"{fmt_ns(s['load_ns']['min'])}-{fmt_ns(s['load_ns']['max'])}",
                    fmt_ns(s["refresh_ns"]["p50"]) if "refresh_ns" in s else "",
                    f"{s['memory_bytes'] / 2**20:.1f} MiB",
                    f"{s['bytes_per_tenant']:.0f} B",
                    f"{s['peak_bytes'] / 2**20:.1f} MiB",
                ]
                for backend, s in data["snapshot"].items()
            ],
        ),
        "",
        "## A new tenant reaching a second router process",
        "",
        "`catalog.add_tenant()` here; a `Router` in a subprocess watches its snapshot. "
        "Latency from add_tenant's return (the commit) until the other process has the "
        "tenant in its map (CLOCK_MONOTONIC on both sides).",
        "",
        markdown_table(
            ["how", "tenants in map", "n", "median", "max", "missed", "add_tenant itself"],
            [
                [
                    p["label"],
                    f"{p['tenants_in_map']:,}",
                    p["latency_ns"].get("n", 0),
                    fmt_ns(p["latency_ns"].get("p50", math.nan)),
                    fmt_ns(p["latency_ns"].get("max", math.nan)),
                    p["missed"],
                    fmt_ns(p["add_tenant_ns"].get("p50", math.nan)),
                ]
                for p in data["propagation"]
            ],
        ),
        "",
        *async_markdown(data),
        *network_markdown(data),
        "## Machine",
        "",
        machine_markdown(machine),
        "",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in data["phases_s"].items()) + ".",
        "",
        "Method: `benchmarks/README.md`. Every figure unrounded, with each round's p50, is "
        "in `routing_overhead.json`.",
    ]
    return "\n".join(lines)


def print_summary(data: dict[str, Any]) -> None:
    console.rule("routing overhead: targets")
    for t in data["targets"]:
        colour = "green" if t["verdict"] == "PASS" else "red"
        spread = f"  blocks {t['spread']}" if t["spread"] else ""
        console.print(
            f"[{colour}]{t['verdict']}[/]  {t['value']:>8} {t['target']:<9} {t['figure']:<52}"
            f"{spread}"
        )
    console.rule("before (legacy) and after (routed) the signed fence, p50 / setting")
    for r in data["ratios"]:
        console.print(
            f"{_cell(r):<32} before {_x(r['legacy_vs_setting']['p50'])}, "
            f"after {_x(r['setting']['p50'])}, routed/legacy {_x(r['legacy']['p50'])} "
            f"(blocks {_spread(r['legacy']['blocks_p50'])})"
        )
    console.rule("policy cost per statement (p50)")
    for st in data["policy"]["statements"]:
        for c in st["compare"]:
            console.print(
                f"{st['statement']:<6} {c['a']:>22} - {c['b']:<8} {c['diff_p50_us']:+7.1f} µs "
                f"(blocks {c['blocks_diff_us']['min']:+.1f} to {c['blocks_diff_us']['max']:+.1f}"
                f", paired {c['paired_diff_us']['median']:+.1f}), ratio {c['ratio_p50']:.3f}; "
                f"in the server {c['server_diff_us']['median']:+.1f} µs, "
                f"ratio {c['server_ratio']:.3f}"
            )
    functions = data["policy"]["functions"]
    basis = "cpu_us" if data["policy"]["server_basis"] == "cpu" else "wall_us"
    empty = functions["(empty loop)"][basis]["median"]
    console.print(
        "the functions alone, per call in the server, net of the empty loop: "
        + ", ".join(
            f"{name} {f[basis]['median'] - empty:.2f} µs"
            for name, f in functions.items()
            if name != "(empty loop)"
        )
        + f" ({data['policy']['server_basis']} time)"
    )
    model = data["policy"]["server_model"]
    console.print(
        f"server {data['policy']['server_basis']} time added by the signed fence: fence "
        f"{model['fence_extra_us']:+.1f} µs, per point select {model['per_select_extra_us']:+.1f}"
        " µs; per transaction "
        + ", ".join(f"{n} select(s) {v:+.0f} µs" for n, v in model["transaction_extra_us"].items())
    )
    console.rule("other figures")
    for r in data["ratios"]:
        console.print(
            f"{_cell(r):<32} p99 ratios: /setting {_x(r['setting']['p99'])}, "
            f"/bare {_x(r['bare']['p99'])}, /legacy {_x(r['legacy']['p99'])}"
        )
    driver = data["driver"]
    console.print(
        "driver level, added to a 1-select transaction (p50): "
        + ", ".join(f"{name} {d['added_p50_us']:+.0f} µs" for name, d in driver.items())
    )
    for backend, s in data["snapshot"].items():
        console.print(
            f"snapshot of {s['tenants']:,} tenants ({backend}): {fmt_ns(s['load_ns']['p50'])}, "
            f"refresh after one change {fmt_ns(s['refresh_ns']['p50'])}, "
            f"{s['memory_bytes'] / 2**20:.1f} MiB held, {s['peak_bytes'] / 2**20:.1f} MiB peak"
        )
    for p in data["propagation"]:
        lat = p["latency_ns"]
        console.print(
            f"propagation, {p['label']}: median {fmt_ns(lat.get('p50', math.nan))}, "
            f"max {fmt_ns(lat.get('max', math.nan))} (n={lat.get('n', 0)}, "
            f"missed {p['missed']})"
        )
    for route, report in data.get("profile", {}).items():
        console.rule(f"profile: {route}")
        console.print(report, markup=False)


def network_markdown(data: dict[str, Any]) -> list[str]:
    """The round trips counted on the wire and the figures at added round-trip times."""
    net = data.get("network")
    if not net:
        return []
    direct = {
        (r["route"], r["statements"], r["ending"]): r["us"]["p50"]
        for r in data["latency"]
        if r["threads"] == 1
    }
    trips = {
        (r["route"], r["statements"], r["ending"]): r["round_trips"] for r in net["round_trips"]
    }
    rtts = sorted({r["rtt_ms"] for r in net["latency"]})
    measured = {r["rtt_ms"]: r["measured_rtt_ms"] for r in net["latency"]}
    p50 = {
        (r["rtt_ms"], r["route"], r["statements"], r["ending"]): r["p50_us"] for r in net["latency"]
    }
    headers = ["route", "selects", "ending", "round trips", "direct p50"]
    for rtt in rtts[1:]:
        headers += [f"modelled at {rtt} ms", f"through proxy, +{rtt} ms"]
    rows = []
    for key, count in trips.items():
        row: list[object] = [*key, f"{count:.2f}", f"{direct.get(key, math.nan):.0f} µs"]
        for rtt in rtts[1:]:
            row += [
                f"{direct.get(key, math.nan) + count * rtt * 1000:.0f} µs",
                f"{p50[(rtt, *key)]:.0f} µs",
            ]
        rows.append(row)
    async_rows = [
        [r["route"], r["statements"], r["ending"], f"{r['round_trips']:.2f}"]
        for r in net.get("async_round_trips", ())
    ]
    async_part = (
        [
            "Round trips per asyncio transaction (AsyncRouter; *routed (apart)*: "
            "`fence_with_begin` off, BEGIN in a message of its own):",
            "",
            markdown_table(["route", "selects", "ending", "round trips"], async_rows, align="lrlr"),
            "",
        ]
        if async_rows
        else []
    )
    return [
        "## Round trips and the network",
        "",
        "Counted on the wire by a TCP proxy in front of the shard server (a client message "
        "after a server one is a round trip), one thread, "
        f"{net['rounds']} interleaved rounds. *Modelled*: the direct p50 (1 thread, above) "
        "plus round trips x the round-trip time. *Through proxy*: measured with the proxy "
        "delaying each packet; the round-trip time it really added (SELECT 1, median): "
        + ", ".join(
            f"{measured[r] - measured[0.0]:+.2f} ms when asked for {r} ms" for r in rtts[1:]
        )
        + f" (the proxy itself costs {measured[0.0]:.2f} ms a round trip).",
        "",
        markdown_table(headers, rows, align="llr" + "r" * (len(headers) - 3)),
        "",
        *async_part,
    ]


def async_ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """AsyncRouter's cells: routed / setting and routed / bare, p50 and CPU."""
    part = data.get("async")
    if not part:
        return []
    by = {(r["tasks"], r["route"], r["statements"], r["ending"]): r for r in part["latency"]}
    rows = []
    for (tasks, route, statements, ending), r in by.items():
        if route != "routed":
            continue
        row: dict[str, Any] = {"tasks": tasks, "statements": statements, "ending": ending}
        for base in ("setting", "bare"):
            b = by[(tasks, base, statements, ending)]
            row[base] = r["us"]["p50"] / b["us"]["p50"]
            row[f"{base}_cpu"] = r["cpu_us"] / b["cpu_us"]
        rows.append(row)
    return rows


def _async_cell(r: dict[str, Any]) -> str:
    selects = "1 select" if r["statements"] == 1 else f"{r['statements']} selects"
    return f"asyncio, {r['tasks']} task{'s' if r['tasks'] > 1 else ''}, {selects}, {r['ending']}"


def async_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in async_ratios(data):
        for figure, value, target in (
            ("routed / setting p50", r["setting"], TARGET_VS_SETTING),
            ("routed / bare p50", r["bare"], TARGET_VS_BARE[r["statements"]]),
            ("routed / bare CPU per transaction", r["bare_cpu"], TARGET_CPU_VS_BARE),
        ):
            out.append(
                {
                    "figure": f"{figure} ({_async_cell(r)})",
                    "value": _x(value),
                    "target": f"<= {target}",
                    "verdict": verdict(value, target),
                    "spread": "",
                }
            )
    return out


def async_markdown(data: dict[str, Any]) -> list[str]:
    """AsyncRouter against hand-written AsyncSessions: latencies and CPU per route."""
    part = data.get("async")
    if not part:
        return []
    rows = [
        [
            r["tasks"],
            r["route"],
            r["statements"],
            r["ending"],
            f"{r['us']['p50']:.0f}",
            f"{r['us']['p99']:.0f}",
            f"{r['cpu_us']:.0f}",
        ]
        for r in part["latency"]
    ]
    return [
        "## AsyncRouter",
        "",
        "`AsyncRouter.session(t)` (signed fence) against `AsyncSession(engine)` with "
        "`set_config` (classic policy) and a bare `AsyncSession` (no policy), on the same "
        f"pool, one event loop, {part['rounds']} interleaved rounds; CPU: the process's CPU "
        "time per transaction (median over rounds). The targets above hold them to the "
        "threaded ones.",
        "",
        markdown_table(
            ["tasks", "route", "selects", "ending", "p50 µs", "p99 µs", "CPU µs"],
            rows,
            align="rlrlrrr",
        ),
        "",
    ]
