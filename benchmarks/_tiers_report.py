"""tiers.py's report: the headline ratios, the Markdown sections and the charts, all
rendered from the results JSON alone (``run_all.py --report-only`` redraws them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import (
    fmt_bytes,
    machine_markdown,
    markdown_table,
)
from _tiers_fleet import (
    BIG_POOL,
    OPS,
    PLACEMENTS,
    label,
)

# -- figures the report leads with ----------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the report opens with."""
    lines: list[dict[str, Any]] = []

    def add(question: int, figure: str, value: float) -> None:
        lines.append({"question": question, "figure": figure, "value": value})

    def pairs(
        results: dict[str, dict[str, Any]], other: str = "dedicated"
    ) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        for n in sorted({v["n"] for v in results.values()}):
            shared, dedicated = results.get(f"shared-{n}"), results.get(f"{other}-{n}")
            if shared and dedicated:
                yield n, shared, dedicated

    for other in ("dedicated", "dedicated-pool8"):
        for n, shared, dedicated in pairs(data.get("throughput", {}), other):
            ops = _ratio(shared["ops_per_s"], dedicated["ops_per_s"])
            p99 = _ratio(shared["latency_ms"]["p99"], dedicated["latency_ms"]["p99"])
            add(1, f"throughput, shared / {label(other)}, N={n}", ops)
            add(1, f"p99 latency, shared / {label(other)}, N={n}", p99)
    for condition, c in data.get("noisy", {}).get("conditions", {}).items():
        if condition != "quiet":
            add(2, f"victim p99 under load / quiet, heavy tenant on {condition}", c["p99_ratio"])
    for n, shared, dedicated in pairs(data.get("footprint", {})):
        disk = _ratio(dedicated["disk"]["per_tenant_bytes"], shared["disk"]["per_tenant_bytes"])
        add(3, f"disk per tenant, dedicated / shared, N={n}", disk)
    for other in ("dedicated", "dedicated-pool8"):
        for n, shared, dedicated in pairs(data.get("footprint", {}), other):
            held = _ratio(connections(dedicated), connections(shared))
            add(3, f"server connections, {label(other)} / shared, N={n}", held)
    onboarding = data.get("onboarding", {})
    if onboarding:
        shared_ms = onboarding["shared: add_tenant"]["total"].get("median_ms")
        for variant, v in onboarding.items():
            if variant.startswith("dedicated"):
                how = variant.split(": ", 1)[1].removesuffix(", add_tenant")
                slower = _ratio(v["total"].get("median_ms"), shared_ms)
                add(4, f"time to add a tenant, {how} / shared add_tenant", slower)
    return lines


# -- report --------------------------------------------------------------------------------


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _rounds_spread(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if values else ""


def _ordered(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results.values(), key=lambda v: (v["n"], PLACEMENTS.index(v["tier"])))


def section_throughput(data: dict[str, Any]) -> str:
    thr = data["throughput"]
    cfg = data["config"]
    ratio_rows = []
    for n in sorted({v["n"] for v in thr.values()}):
        shared = thr.get(f"shared-{n}")
        for other in PLACEMENTS[1:]:
            o = thr.get(f"{other}-{n}")
            if shared and o:
                ratio_rows.append(
                    [
                        n,
                        f"shared / {label(other)}",
                        fmt_ratio(_ratio(shared["ops_per_s"], o["ops_per_s"])),
                        fmt_ratio(_ratio(shared["latency_ms"]["p50"], o["latency_ms"]["p50"])),
                        fmt_ratio(_ratio(shared["latency_ms"]["p99"], o["latency_ms"]["p99"])),
                    ]
                )
    rows = []
    for v in _ordered(thr):
        lat, by_op = v["latency_ms"], v["by_op"]
        rows.append(
            [
                v["n"],
                label(v["tier"]),
                v["dedicated_databases"],
                f"{v['ops_per_s']:,.0f}",
                _rounds_spread(v["ops_per_s_rounds"]),
                _ms(lat["p50"]),
                _ms(lat["p95"]),
                _ms(lat["p99"]),
                " / ".join(_ms(by_op[op].get("p99")) for op in OPS),
                f"{v['new_connections_per_1000_ops']:.1f}",
                v.get("connections_held", ""),
                sum(v["errors"].values()),
            ]
        )
    skipped = [f"{label(s['tier'])} N={s['n']}: {s['reason']}" for s in data["skipped"]]
    lines = [
        f"{cfg['threads']} worker threads in one process, through `router.session(t)`; each "
        "operation is one transaction for a uniformly random tenant: "
        f"{cfg['mix']['read']:.0%} point reads, {cfg['mix']['write']:.0%} small writes "
        f"(insert one row, commit), {cfg['mix']['aggregate']:.0%} per-tenant aggregates "
        f"(energy per charger over the tenant's sessions). Every tenant holds {cfg['users']} "
        f"users, {cfg['chargers']} chargers and {cfg['sessions']} charging sessions. "
        f"{cfg['rounds']} rounds of {cfg['window_s']} s per layout, layouts in a fresh random "
        "order each round. *Shared* is a pool of two databases, one per server; dedicated "
        "databases alternate between the servers; *mixed* has every tenth tenant dedicated. "
        f"*dedicated* uses tenantry's default pools (2 connections per database, "
        f"{cfg['max_overflow']} overflow connections closed after use), *dedicated, pool "
        f"{BIG_POOL}* keeps {BIG_POOL} per database. *New conns* are connections opened "
        "during the rounds per 1000 operations (pool churn); *held* are the routing role's "
        "backends on the layout's databases after the last round.",
        "",
        markdown_table(["N", "ratio", "ops/s", "p50", "p99"], ratio_rows, align="rlrrr"),
        "",
        markdown_table(
            [
                "N",
                "placement",
                "dedicated DBs",
                "ops/s",
                "rounds min-max",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "p99 read / write / aggregate",
                "new conns /1000 ops",
                "held",
                "errors",
            ],
            rows,
            align="rl" + "r" * 10,
        ),
    ]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    mixed = [
        f"N={v['n']}: shared {_ms(b['shared']['p50'])} / {_ms(b['shared']['p99'])}, "
        f"dedicated {_ms(b['dedicated']['p50'])} / {_ms(b['dedicated']['p99'])}"
        for v in _ordered(thr)
        if v["tier"] == "mixed" and {"shared", "dedicated"} <= set(b := v["by_tenant_tier"])
    ]
    if mixed:
        lines += [
            "",
            "Within the mixed layouts, by the tenant's own tier (p50 / p99 ms): "
            + "; ".join(mixed)
            + ".",
        ]
    return "\n".join(lines)


def section_noisy(data: dict[str, Any]) -> str:
    noisy = data["noisy"]
    cfg = data["config"]
    rows = []
    for condition, c in noisy["conditions"].items():
        lat = c["victim_ms"]
        spread = c["p99_ratio_rounds"]
        rows.append(
            [
                condition if condition == "quiet" else f"heavy tenant on {condition}",
                fmt_ratio(c["p99_ratio"]),
                f"{min(spread):.2f}-{max(spread):.2f}" if condition != "quiet" else "",
                fmt_ratio(c["p50_ratio"]),
                _ms(lat["p50"]),
                _ms(lat["p99"]),
                lat["n"],
                f"{c['heavy_queries_per_s']:.1f}" if c["heavy_queries"] else "",
                _ms(c["heavy_query_ms"].get("p50")) if c["heavy_queries"] else "",
            ]
        )
    return "\n".join(
        [
            f"The victim (a shared tenant of the standard size) runs the workload from "
            f"{cfg['victim_threads']} threads while {cfg['heavy_threads']} threads run a large "
            f"aggregate (count, sum and mean duration per charger over "
            f"{cfg['heavy_rows']:,} charging sessions) of a heavy tenant, back to back. The "
            "heavy tenant has a copy in each place; only where the load runs changes. "
            f"{cfg['noisy_rounds']} rounds of {cfg['noisy_window_s']} s per condition, in "
            "random order. *Ratio* is the victim's p99 under load / its quiet p99 (all "
            "rounds pooled); *rounds* is the min-max of the same ratio per round.",
            "",
            markdown_table(
                [
                    "condition",
                    "p99 ratio",
                    "rounds",
                    "p50 ratio",
                    "victim p50 ms",
                    "victim p99 ms",
                    "victim ops",
                    "heavy queries/s",
                    "heavy query ms",
                ],
                rows,
                align="l" + "r" * 8,
            ),
            "",
            f"CPU: {noisy.get('cpu_pinning', 'not pinned')}, as if the servers ran on "
            "hosts of their own. A dedicated database on the same server shares that "
            "server's CPU, memory and disk with the victim's database; one on the other "
            "server shares only what the two servers still share here (one machine's "
            "memory bandwidth and caches).",
        ]
    )


def connections(footprint: dict[str, Any]) -> int:
    """Connections a router holds: after question 1's rounds if run, else the fresh one's."""
    held = footprint.get("connections_held")
    return int(held if held is not None else footprint["process"]["connections"])


def section_footprint(data: dict[str, Any]) -> str:
    foot = data["footprint"]
    rows = []
    for v in _ordered(foot):
        p, d = v["process"], v["disk"]
        held = connections(v)
        rows.append(
            [
                v["n"],
                label(v["tier"]),
                v["databases"],
                held,
                f"{held / v['n']:.2f}",
                p["connections"],
                fmt_bytes(p["rss_bytes"]),
                fmt_bytes(p["rss_delta_bytes"]),
                fmt_bytes(d["database_bytes"]),
                fmt_bytes(d["per_tenant_bytes"]),
                fmt_bytes(d["per_tenant_delta_bytes"]),
                fmt_bytes(d["per_tenant_table_bytes"]),
            ]
        )
    empty = next(iter(foot.values()))["disk"]["empty_database_bytes"] if foot else 0
    cfg = data["config"]
    return "\n".join(
        [
            "*Connections held* are the routing role's backends on the layout's databases "
            "after the rounds of question 1 (one router, warm pools); *fresh router* counts "
            "those of a new process that ran a `Router` over the layout, read every tenant "
            f"once, then ran the workload for {cfg['footprint_s']} s from {cfg['threads']} "
            "threads (`pg_stat_activity` by `application_name`; the router's one LISTEN "
            "connection to the catalog is not counted). *RSS* is that process's resident "
            "memory at the end; *router RSS* is what the router, its engines and pools added "
            "to a process that had imported everything. Disk is measured right after "
            "seeding: *per tenant* is the size of all the layout's databases / N; *data "
            f"only* first subtracts an empty migrated database ({fmt_bytes(empty)}) per "
            "database; *tables* is the tenant tables' size / N (heap, indexes, TOAST).",
            "",
            markdown_table(
                [
                    "N",
                    "placement",
                    "databases",
                    "connections held",
                    "per tenant",
                    "fresh router",
                    "RSS",
                    "router RSS",
                    "disk",
                    "disk per tenant",
                    "data only",
                    "tables",
                ],
                rows,
                align="rl" + "r" * 10,
            ),
            "",
            f"Pools: {cfg['pool_size_shared']} connections per shared database, "
            f"{cfg['pool_size_dedicated']} per dedicated one ({BIG_POOL} in *dedicated, pool "
            f"{BIG_POOL}*), {cfg['max_overflow']} overflow; max_engines {cfg['max_engines']}, "
            f"connection_budget {cfg['connection_budget']}.",
        ]
    )


def section_operations(data: dict[str, Any]) -> str:
    onboarding = data["onboarding"]
    shared_ms = onboarding["shared: add_tenant"]["total"].get("median_ms")
    rows = [
        [
            variant,
            fmt_ratio(_ratio(v["total"].get("median_ms"), shared_ms)),
            _ms(v["total"].get("median_ms")),
            f"{_ms(v['total'].get('min_ms'))}-{_ms(v['total'].get('max_ms'))}",
            _ms(v["provision"].get("median_ms")) if v["provision"].get("n") else "",
            v["total"]["n"],
        ]
        for variant, v in onboarding.items()
    ]
    lines = [
        "### Adding a tenant",
        "",
        "`catalog.add_tenant(t)` (a residency row on the shard, a catalog row) against "
        "`migrations.provision(...)` of a new dedicated database plus its `add_tenant`; "
        "samples interleaved in random order.",
        "",
        markdown_table(
            ["how", "vs shared", "median ms", "min-max ms", "of which provision", "n"],
            rows,
            align="lrrrrr",
        ),
        "",
        "### Fleet migration, base to head",
        "",
        "`tenantry.migrations.upgrade(catalog, 'head', jobs=J)` over each layout's shards "
        "(the demo app's two revisions: three tables, foreign keys, one index; RLS policies "
        "re-installed on shared databases), after an untimed downgrade to base.",
        "",
    ]
    mig = data["migrations"]
    by_key = {(r["tier"], r["n"], r["jobs"]): r for r in mig}
    mig_rows = []
    for r in mig:
        shared = by_key.get(("shared", r["n"], r["jobs"]))
        mig_rows.append(
            [
                r["n"],
                r["tier"],
                r["databases"],
                r["jobs"],
                f"{r['seconds']:.2f}",
                f"{r['per_database_ms']:.0f}",
                fmt_ratio(_ratio(r["seconds"], shared["seconds"])) if shared else "n/a",
            ]
        )
    lines += [
        markdown_table(
            ["N", "tier", "databases", "jobs", "seconds", "ms per database", "vs shared"],
            mig_rows,
            align="rlrrrrr",
        ),
        "",
        "### Promote and demote",
        "",
        "A shared tenant promoted to a new dedicated database on the other server "
        "(`moves.promote(..., server=...)`: provision, copy, verify, switch, clean), then "
        "demoted back into its shared database (`moves.demote(..., drop_source=True)`). "
        "*Freeze* is how long the tenant's writes were refused.",
        "",
    ]
    move_rows = []
    for m in data["moves"]:
        if "skipped" in m:
            move_rows.append([f"{m['rows']:,}", m["mode"], "skipped", "", "", "", m["skipped"]])
            continue
        for name in ("promote", "demote"):
            s = m[name]
            move_rows.append(
                [
                    f"{m['rows']:,}",
                    s["mode"],
                    name,
                    f"{m[name + '_s']:.2f}",
                    f"{s['copy_s']:.2f}" if s.get("copy_s") is not None else "",
                    f"{s['freeze_s']:.3f}" if s.get("freeze_s") is not None else "",
                    f"{s['rows_copied'] / m[name + '_s']:,.0f} rows/s"
                    if s.get("rows_copied")
                    else "",
                ]
            )
    lines.append(
        markdown_table(
            ["rows", "mode", "move", "seconds", "copy s", "freeze s", "overall rate"],
            move_rows,
            align="rllrrrr",
        )
    )
    return "\n".join(lines)


TITLES = {
    "throughput": "1. Throughput and latency by tier",
    "noisy": "2. Noisy neighbour",
    "footprint": "3. Footprint",
    "operations": "4. Onboarding and operations",
}


def sections(data: dict[str, Any]) -> dict[str, str]:
    """Markdown of each question measured, by part name (see TITLES)."""
    render = {
        "throughput": section_throughput,
        "noisy": section_noisy,
        "footprint": section_footprint,
        "operations": section_operations,
    }
    present = {**data, "operations": data.get("onboarding")}
    return {part: fn(data) for part, fn in render.items() if present.get(part)}


def headline_table(data: dict[str, Any]) -> str:
    return markdown_table(
        ["figure", "ratio"], [[h["figure"], fmt_ratio(h["value"])] for h in data["headline"]]
    )


def render_markdown(data: dict[str, Any], charts: Sequence[str] = ()) -> str:
    parts = sections(data)
    lines = [
        "# Isolation tiers: shared, dedicated, mixed",
        "",
        f"Mode: {data['config']['mode']}. Ratios first; absolute figures depend on the "
        "machine (below). Method: the docstring of `benchmarks/tiers.py`.",
        "",
        headline_table(data),
        "",
    ]
    for part, text in parts.items():
        lines += [f"## {TITLES[part]}", "", text, ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts] + [""]
    lines += [
        "## Machine",
        "",
        machine_markdown(data["machine"]),
        "",
        "PostgreSQL settings: "
        + ", ".join(f"{k} {v}" for k, v in data.get("postgres_settings", {}).items())
        + ".",
        "",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in data["phases_s"].items()) + ".",
    ]
    return "\n".join(lines)


# -- charts ----------------------------------------------------------------------------------

COLOURS = {
    "shared": "#4C72B0",
    "dedicated": "#DD8452",
    "dedicated-pool8": "#F2B880",
    "mixed": "#55A868",
}


def _by_tier(
    results: Sequence[dict[str, Any]], pick: Callable[[dict[str, Any]], float]
) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for v in results:
        out[v["tier"]][v["n"]] = pick(v)
    return out


def _grouped_bars(
    ax: Any,
    results: Sequence[dict[str, Any]],
    pick: Callable[[dict[str, Any]], float],
    fmt: Callable[[float], str],
) -> None:
    """Bars of *pick* by N (groups) and tier (colours); a missing pair says "not run"."""
    values = _by_tier(results, pick)
    sizes = sorted({v["n"] for v in results})
    shown = [p for p in PLACEMENTS if p in values]
    width = 0.8 / len(shown)
    for i, tier in enumerate(shown):
        xs, ys = [], []
        for j, n in enumerate(sizes):
            x = j + (i - (len(shown) - 1) / 2) * width
            value = values.get(tier, {}).get(n)
            if value is None:
                ax.text(
                    x, 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=7,
                    transform=ax.get_xaxis_transform(),
                )  # fmt: skip
                continue
            xs.append(x)
            ys.append(value)
        bars = ax.bar(xs, ys, width, label=label(tier), color=COLOURS[tier])
        for bar, value in zip(bars, ys, strict=True):
            ax.annotate(
                fmt(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.12)


def _hbars(ax: Any, labels: Sequence[str], values: Sequence[float], notes: Sequence[str]) -> None:
    colours = [COLOURS["shared"], COLOURS["dedicated"], COLOURS["dedicated-pool8"], "#8172B3"]
    bars = ax.barh(range(len(labels)), values, color=colours[: len(labels)])
    for bar, note in zip(bars, notes, strict=True):
        ax.annotate(
            note,
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
            xytext=(4, 0),
            textcoords="offset points",
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([*values, 1.0]) * 1.5)
    ax.spines[["top", "right"]].set_visible(False)


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)


def chart_throughput(plt: Any, data: dict[str, Any], title: str) -> Any:
    results = list(data["throughput"].values())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _grouped_bars(left, results, lambda v: v["ops_per_s"], lambda x: f"{x:,.0f}")
    left.set_title("Throughput (operations/s; higher is better)", fontsize=10)
    _grouped_bars(right, results, lambda v: v["latency_ms"]["p99"], lambda x: f"{x:.1f}")
    right.set_title("p99 latency (ms; lower is better)", fontsize=10)
    _legend_below(fig, left)
    fig.suptitle(f"One workload by placement and number of tenants: {title}", fontsize=10)
    return fig


def chart_noisy(plt: Any, data: dict[str, Any], title: str) -> Any:
    conditions = data["noisy"]["conditions"]
    labels = [c for c in conditions if c != "quiet"]
    ratios = [conditions[c]["p99_ratio"] for c in labels]
    notes = []
    for c in labels:
        spread = conditions[c]["p99_ratio_rounds"]
        notes.append(
            f"{conditions[c]['p99_ratio']:.2f}x (rounds {min(spread):.2f}-{max(spread):.2f})"
        )
    fig, ax = plt.subplots(figsize=(8, 3.6))
    _hbars(ax, [f"heavy tenant on\n{c}" for c in labels], ratios, notes)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("victim's p99 under load / its quiet p99 (1.0 = unaffected)")
    fig.suptitle(f"Noisy neighbour, victim on a shared database: {title}", fontsize=10)
    return fig


def chart_footprint(plt: Any, data: dict[str, Any], title: str) -> Any:
    results = list(data["footprint"].values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    _grouped_bars(axes[0], results, connections, lambda x: f"{x:.0f}")
    axes[0].set_title("Server connections held by the router", fontsize=10)
    _grouped_bars(
        axes[1], results, lambda v: v["process"]["rss_delta_bytes"] / 2**20, lambda x: f"{x:.1f}"
    )
    axes[1].set_title("Memory the router added to its process (RSS, MiB)", fontsize=10)
    # dedicated-pool8 has the very databases of dedicated: the same bar twice.
    _grouped_bars(
        axes[2],
        [v for v in results if v["tier"] != "dedicated-pool8"],
        lambda v: v["disk"]["per_tenant_bytes"] / 2**10,
        lambda x: f"{x / 1024:.1f} MiB" if x >= 1000 else f"{x:.0f} KiB",
    )
    axes[2].set_yscale("log")
    axes[2].set_title("Disk per tenant (KiB, log scale)", fontsize=10)
    axes[2].set_ylim(bottom=10)
    _legend_below(fig, axes[0])
    fig.suptitle(f"Footprint: {title}", fontsize=10)
    return fig


def chart_operations(plt: Any, data: dict[str, Any], title: str) -> Any:
    onboarding = data["onboarding"]
    labels = [v.replace(": ", ":\n").removesuffix(", add_tenant") for v in onboarding]
    medians = [v["total"].get("median_ms", 0.0) for v in onboarding.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[1, 1.3])
    _hbars(left, labels, medians, [f"{m:.0f} ms" for m in medians])
    left.set_title("Time to add one tenant (median ms)", fontsize=10)
    migrated = data["migrations"]
    jobs = min(r["jobs"] for r in migrated)
    _grouped_bars(
        right,
        [r for r in migrated if r["jobs"] == jobs],
        lambda r: r["seconds"],
        lambda x: f"{x:.1f}",
    )
    right.set_title(f"Fleet migration, base to head (s, jobs={jobs})", fontsize=10)
    _legend_below(fig, right)
    fig.suptitle(f"Onboarding and operations: {title}", fontsize=10)
    return fig


CHARTS = {
    "throughput": ("tiers_throughput.png", chart_throughput),
    "noisy": ("tiers_noisy_neighbour.png", chart_noisy),
    "footprint": ("tiers_footprint.png", chart_footprint),
    "onboarding": ("tiers_operations.png", chart_operations),
}


def draw_charts(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNG charts of the parts measured; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = data["machine"]
    version = str(machine.get("postgresql") or "?").split(" ")[0]
    title = f"{machine.get('cores')} cores, PostgreSQL {version}, {data['config']['mode']} run"
    paths = []
    for part, (name, chart) in CHARTS.items():
        if not data.get(part):
            continue
        fig = chart(plt, data, title)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
