"""Run every benchmark on the same two PostgreSQL servers, then write one report.

    python benchmarks/run_all.py [--quick] [--pg-url URL ...] [--out DIR] [--only NAME ...]

Each benchmark runs as a process of its own (one that fails or hangs does not stop the
others), with ``--quick`` under ``--quick``, on two servers started here once
(``tenantry.testing``, room for 1000 connections each) or on the given ones. Then
every ``results/<name>.json`` written by this run is folded into ``results/report.md``:
the ratios first, then one section per question the benchmarks answer
(``BENCHMARKS``), then each benchmark's own tables. A benchmark that is missing,
fails or writes nothing is listed as such, and results left over from an earlier run
are never mixed in.

This is what ``make bench`` and ``tenantry bench`` run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, add_server_options, console, machine_markdown, markdown_table
from _tiers_fleet import bench_servers
from _tiers_report import TITLES, draw_charts, sections

HERE = Path(__file__).resolve().parent

#: Every benchmark, in the order they run: (name, the report's question it answers;
#: ``TITLES`` names them).
BENCHMARKS = (
    ("tiers", "1-4"),
    ("routing_overhead", "5"),
    ("move_throughput", "5"),
    ("online_moves", "5"),
    ("fleet_migrations", "4"),
    ("rebalance", "-"),
    ("pooler", "-"),
    ("fleet_scale", "-"),
)
TIMEOUT_S = {"quick": 15 * 60, "full": 45 * 60}
#: Options of a full run beyond each benchmark's defaults, to keep the whole run near
#: half an hour on a small machine (run a benchmark alone for its own full default).
FULL_ARGS = {"online_moves": ["--moves", "3"]}


@dataclass
class Outcome:
    """What happened to one benchmark in this run."""

    name: str
    question: str
    status: str = "not run"  # ok, failed, missing, timeout, no results
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""


# -- running ---------------------------------------------------------------------------------


@functools.cache
def _usage(script: Path) -> str:
    """*script*'s ``--help``: the options it takes (some come from ``_common``)."""
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def _accepts(script: Path, option: str) -> bool:
    return re.search(rf"{re.escape(option)}(?![\w-])", _usage(script)) is not None


def run_one(name: str, question: str, args: argparse.Namespace, urls: Sequence[str]) -> Outcome:
    outcome = Outcome(name, question)
    script = HERE / f"{name}.py"
    if not script.is_file():
        outcome.status = "missing"
        outcome.detail = f"benchmarks/{name}.py does not exist in this checkout"
        return outcome
    argv = [sys.executable, str(script)]
    notes = []
    if args.quick and _accepts(script, "--quick"):
        argv.append("--quick")
    if not args.quick and name in FULL_ARGS:
        argv += FULL_ARGS[name]
        notes.append("run with " + " ".join(FULL_ARGS[name]))
    if _accepts(script, "--pg-url"):
        argv += ["--pg-url", *urls]
    if _accepts(script, "--out"):
        argv += ["--out", str(args.out)]
    elif args.out != RESULTS_DIR:
        notes.append(f"{name}.py has no --out: its results went to {RESULTS_DIR}")
    outcome.detail = "; ".join(notes)
    mode = "quick" if args.quick else "full"
    started = time.time()
    begun = time.monotonic()
    # A session of its own, so a timeout stops the benchmark and whatever it started.
    child = subprocess.Popen(argv, cwd=HERE.parent, start_new_session=True)
    try:
        code = child.wait(timeout=TIMEOUT_S[mode])
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        outcome.status = "timeout"
        outcome.detail = f"stopped after {TIMEOUT_S[mode] // 60} minutes"
        outcome.seconds = time.monotonic() - begun
        return outcome
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGINT)
        child.wait()
        raise
    outcome.seconds = time.monotonic() - begun
    results_dir = args.out if _accepts(script, "--out") else RESULTS_DIR
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    fresh = json_path.is_file() and json_path.stat().st_mtime >= started
    if code != 0:
        outcome.status = "failed"
        outcome.detail = f"exit status {code}" + ("" if fresh else ", no results written")
    elif not fresh:
        outcome.status = "no results"
        outcome.detail = f"exit status 0 but {json_path.name} was not written by this run"
    else:
        outcome.status = "ok"
    if fresh:
        outcome.data = json.loads(json_path.read_text())
        outcome.markdown = md_path.read_text() if md_path.is_file() else ""
    return outcome


# -- headline figures of the other benchmarks --------------------------------------------------


def _num(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        found = re.match(r"\s*([-+]?\d+(?:\.\d+)?)", value)
        if found:
            return float(found.group(1))
    return math.nan


def routing_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """routed / hand-written session p50, one thread, rolled-back reads."""
    lines = []
    labels = {"setting": "Session + set_config", "bare": "bare Session"}
    for r in data.get("ratios", []):
        if r.get("threads") != 1 or r.get("ending") != "rollback":
            continue
        for base, text in labels.items():
            selects = r["statements"]
            lines.append(
                {
                    "figure": f"routed / {text}, p50, {selects} select{'s' * (selects > 1)}",
                    "value": r[base]["p50"],
                }
            )
    targets = data.get("targets", [])
    if targets:
        met = sum(t.get("verdict") == "PASS" for t in targets)
        lines.append({"figure": "routing targets met", "text": f"{met} of {len(targets)}"})
    return lines


def move_throughput_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """tenantry's copy against psql | psql on the same rows."""
    summary = data["summary"]
    ratio = summary["ratio"]
    return [
        {
            "figure": f"move copy throughput, tenantry / psql pipeline "
            f"(rounds {ratio['min']:.2f}-{ratio['max']:.2f})",
            "value": ratio["median"],
        },
        {
            "figure": "offline move of a 10,000-row tenant, whole move (median)",
            "value": summary["small"]["move_s"],
            "unit": "s",
        },
    ]


def online_moves_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """How long writers waited, online against offline."""
    summary = data["summary"]
    online = summary["by_mode"]["online"]["writer_freeze_s"]
    offline = summary["by_mode"]["offline"]["writer_freeze_s"]
    return [
        {
            "figure": "write freeze seen by writers, online / offline move (p99)",
            "value": summary["ratio_online_offline"]["p99"],
        },
        {"figure": "write freeze, online move (p99)", "value": online["p99"], "unit": "s"},
        {"figure": "write freeze, offline move (p99)", "value": offline["p99"], "unit": "s"},
    ]


def rebalance_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Bytes moved when a fourth shard joins, against the ideal quarter."""
    return [
        {"figure": f"bytes moved when a 4th shard joins / ideal, {r['placement']}", "value": v}
        for r in data["headline"]["rows"]
        if (v := r["bytes_vs_ideal"]) is not None
    ]


def fleet_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Parallel fleet migration against serial."""
    out = []
    for fleet in data["fleet"]:
        for run in fleet["runs"][1:]:
            out.append(
                {
                    "figure": f"fleet migration of {fleet['databases']} databases "
                    f"({fleet['schema']}), speed-up of jobs={run['jobs']} over serial",
                    "value": run["speedup"],
                }
            )
    return out


def pooler_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Through PgBouncer against direct: routed and bare p50 of a 1-select transaction,
    and the server connections many dedicated databases hold."""
    out = []
    for r in data["question_1"]["ratios"]:
        if r["kind"] == "select":
            out.append(
                {
                    "figure": f"{r['route']} 1-select transaction through PgBouncer / direct, "
                    f"p50, {r['threads']} threads",
                    "value": r["p50"],
                }
            )
    q2 = data["question_2"]
    databases = data["config"]["databases"]
    for path, ratio in q2["ratios"].items():
        out.append(
            {
                "figure": f"server connections of 4 routers over {databases} dedicated "
                f"databases, {path} / direct (peak)",
                "value": ratio["held_peak"],
            }
        )
    return out


def fleet_scale_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Dedicated against shared through one router (default settings), the server
    connections of 8 routers, map propagation and bulk registration at fleet scale."""
    out = []
    for r in data["question_1"]["ratios"]:
        if r["variant"] == "default":
            out.append(
                {
                    "figure": f"{r['choice']} dedicated / shared p50 over "
                    f"{data['config']['databases']} databases, one router",
                    "value": r["p50"],
                }
            )
    q2 = data["question_2"]
    out.append(
        {
            "figure": f"peak client backends of {q2['processes']} routers / max_connections",
            "value": q2["peak_client_backends"] / q2["max_connections"],
        }
    )
    out.append(
        {
            "figure": f"map propagation p99 to {data['question_3']['routers']} routers, ms",
            "value": data["question_3"]["propagation_ms"].get("p99"),
        }
    )
    out.append(
        {"figure": "add_tenants, tenants per second", "value": data["build"]["add_tenants"]["rate"]}
    )
    return out


def generic_headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A benchmark's own ``headline`` list ({figure, value or text}), if it has one."""
    found = data.get("headline")
    if not isinstance(found, list):
        return []
    return [h for h in found if isinstance(h, dict) and "figure" in h]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "routing_overhead": routing_headline,
    "move_throughput": move_throughput_headline,
    "online_moves": online_moves_headline,
    "fleet_migrations": fleet_headline,
    "rebalance": rebalance_headline,
    "pooler": pooler_headline,
    "fleet_scale": fleet_scale_headline,
}


def headline_of(outcome: Outcome) -> list[dict[str, Any]]:
    """The figures the report leads with; [] when the JSON has another shape (the
    benchmark's own section still shows everything)."""
    extract = EXTRACTORS.get(outcome.name, generic_headline)
    if not outcome.data:
        return []
    try:
        return extract(outcome.data)
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError):
        return generic_headline(outcome.data)


# -- the report -------------------------------------------------------------------------------


#: user:password@ in a URL; a benchmark may print the command line it was given.
PASSWORD = re.compile(r"(\w+://[^:/@\s]+):[^@\s]+@")


def embedded(markdown: str) -> str:
    """A benchmark's own report inside this one: title dropped, headings two levels
    down, machine section cut (the machine is described once, at the end), passwords
    masked."""
    out = []
    for line in PASSWORD.sub(r"\1:***@", markdown).splitlines():
        if line.startswith("# ") and not out:
            continue
        if re.match(r"#+ Machine\s*$", line):
            break
        out.append("##" + line if line.startswith("#") else line)
    return "\n".join(out).strip()


def _fmt(h: dict[str, Any]) -> str:
    if "text" in h:
        return str(h["text"])
    value = _num(h.get("value"))
    if math.isnan(value):
        return str(h.get("value", "n/a"))
    unit = h.get("unit", "x")
    if unit == "x":
        # Small ratios keep their digits: 0.005x is not 0.01x.
        return f"{value:.3f}x" if abs(value) < 0.1 else f"{value:.2f}x"
    return f"{value:.3g} {unit}"


def render_report(outcomes: Sequence[Outcome], mode: str, seconds: float) -> str:
    by_name = {o.name: o for o in outcomes}
    tiers = by_name.get("tiers")
    tiers_data = tiers.data if tiers and tiers.data else None
    headline_rows = sorted(
        (
            [str(h.get("question", o.question)), str(h["figure"]), _fmt(h), o.name]
            for o in outcomes
            for h in headline_of(o)
        ),
        key=lambda row: row[0].replace("-", "9"),  # stable: each benchmark's order kept
    )
    lines = [
        "# tenantry benchmarks: choosing an isolation tier",
        "",
        f"A {mode} run of `benchmarks/run_all.py` ({seconds / 60:.1f} minutes): every "
        "benchmark on the same two PostgreSQL servers. Ratios first, because absolute "
        "times vary between machines; every raw figure is in the JSON file of each "
        "benchmark (`tiers.json`, `routing_overhead.json`, ...) next to this report.",
        "",
    ]
    reruns = [o for o in outcomes if o.detail.startswith("re-run on its own")]
    if reruns:
        lines += [
            "> Re-run on their own after this run, on the same machine: "
            + ", ".join(f"`{o.name}` ({o.detail.split(' at ')[1].split(',')[0]})" for o in reruns)
            + ". Their figures below are from those later runs, not interleaved with the "
            "others.",
            "",
        ]
    lines += [
        "## Headline ratios",
        "",
        markdown_table(["Q", "figure", "ratio", "from"], headline_rows, align="clrl")
        if headline_rows
        else "No benchmark produced figures.",
        "",
    ]
    if tiers_data:
        if tiers_data.get("charts"):
            lines += ["## Charts", ""]
            lines += [f"![{Path(c).stem}]({c})" for c in tiers_data["charts"]] + [""]
        for part, text in sections(tiers_data).items():
            lines += [f"## {TITLES[part]}", "", text, ""]
    else:
        lines += ["Questions 1-4: `tiers.py` produced no results (see *Runs* below).", ""]
    groups = {
        "5": (
            "## 5. Routing overhead, move throughput, online against offline moves",
            "Each benchmark's own report, re-run here on the same servers (method: "
            "`benchmarks/README.md` and each script's docstring).",
        ),
        "other": (
            "## More figures",
            "The fleet-migration benchmark (parallel runs and provisioning; question 4 "
            "above migrates each layout serially), the rebalancing benchmark, and routing "
            "through a connection pooler (PgBouncer in transaction mode).",
        ),
    }
    for group, (title, intro) in groups.items():
        chosen = [
            o for o in outcomes if o.name != "tiers" and (o.question == "5") == (group == "5")
        ]
        if not chosen:
            continue
        lines += [title, "", intro, ""]
        for o in chosen:
            name = o.name.replace("_", " ")
            lines += [f"### {name[0].upper()}{name[1:]}", ""]
            if o.markdown:
                lines += [embedded(o.markdown), ""]
            else:
                lines += [f"Not measured: {o.status}. {o.detail}".rstrip(), ""]
    lines += [
        "## Runs",
        "",
        markdown_table(
            ["benchmark", "question", "status", "minutes", "note"],
            [
                [f"`{o.name}.py`", o.question, o.status, f"{o.seconds / 60:.1f}", o.detail]
                for o in outcomes
            ],
            align="lclrl",
        ),
        "",
    ]
    machine = (
        tiers_data["machine"]
        if tiers_data
        else next((o.data["machine"] for o in outcomes if o.data.get("machine")), None)
    )
    if machine:
        # The benchmarks' own command lines (throwaway servers' URLs) say nothing here.
        shown = {k: v for k, v in machine.items() if k != "argv"}
        lines += ["## Machine", "", machine_markdown(shown), ""]
        if tiers_data and tiers_data.get("postgres_settings"):
            settings = tiers_data["postgres_settings"]
            lines += [
                "PostgreSQL settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".",
                "",
            ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run every benchmark; write report.md.")
    parser.add_argument("--quick", action="store_true", help="every benchmark's --quick")
    add_server_options(parser, default="start two throwaway ones")
    names = [name for name, _q in BENCHMARKS]
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="NAME", help=f"run only these: {names}"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing; rebuild report.md and the charts from the JSON files there",
    )
    return parser.parse_args(argv)


#: What run_all.py did last (mode, time, each benchmark's status): --report-only reuses it.
RUNS_FILE = "run_all.json"


def save_runs(outcomes: Sequence[Outcome], mode: str, seconds: float, out: Path) -> None:
    runs = [
        {
            "name": o.name,
            "question": o.question,
            "status": o.status,
            "seconds": round(o.seconds, 1),
            "detail": o.detail,
        }
        for o in outcomes
    ]
    finished = datetime.now(UTC).replace(microsecond=0).isoformat()
    record = {"mode": mode, "seconds": round(seconds, 1), "finished": finished, "runs": runs}
    (out / RUNS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def rerun_after(outcome: Outcome, finished: str | None) -> str | None:
    """When *outcome*'s results were measured, if after the run that ended at *finished*
    (a benchmark re-run on its own since, e.g. after a change it measures)."""
    when = outcome.data.get("machine", {}).get("when")
    if finished and isinstance(when, str) and when > finished:
        return when
    return None


def load_existing(args: argparse.Namespace) -> tuple[list[Outcome], str, float]:
    """The results in the folder, with the mode and duration of the run that wrote them."""
    saved_path = args.out / RUNS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    runs = {r["name"]: r for r in saved.get("runs", [])}
    outcomes = []
    for name, question in BENCHMARKS:
        outcome = Outcome(name, question, status="missing", detail="no results file")
        script = HERE / f"{name}.py"
        folder = args.out if not script.is_file() or _accepts(script, "--out") else RESULTS_DIR
        path = folder / f"{name}.json"
        if path.is_file():
            run = runs.get(name, {})
            outcome.status = run.get("status", "ok")
            outcome.seconds = run.get("seconds", 0.0)
            outcome.detail = run.get("detail", "from an earlier run")
            outcome.data = json.loads(path.read_text())
            when = rerun_after(outcome, saved.get("finished"))
            if when:
                outcome.detail = f"re-run on its own at {when}, after this run"
            md = path.with_suffix(".md")
            outcome.markdown = md.read_text() if md.is_file() else ""
        outcomes.append(outcome)
    mode = saved.get("mode", "quick" if args.quick else "full")
    return outcomes, mode, saved.get("seconds", 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    mode = "quick" if args.quick else "full"
    if args.report_only:
        outcomes, mode, seconds = load_existing(args)
        tiers = next(o for o in outcomes if o.name == "tiers")
        if tiers.data:
            draw_charts(tiers.data, args.out)
    else:
        chosen = [(n, q) for n, q in BENCHMARKS if not args.only or n in args.only]
        outcomes = []
        with bench_servers(args.pg_url) as urls:
            for i, (name, question) in enumerate(chosen, 1):
                elapsed = (time.time() - started) / 60
                console.rule(f"[bold]{i}/{len(chosen)} {name}[/] ({elapsed:.1f} min so far)")
                outcome = run_one(name, question, args, urls)
                colour = "green" if outcome.status == "ok" else "yellow"
                console.print(
                    f"[{colour}]{name}: {outcome.status}[/] in {outcome.seconds / 60:.1f} min"
                    + (f" ({outcome.detail})" if outcome.detail else "")
                )
                outcomes.append(outcome)
        seconds = time.time() - started
        save_runs(outcomes, mode, seconds, args.out)
    report = args.out / "report.md"
    report.write_text(render_report(outcomes, mode, seconds).rstrip() + "\n")
    console.rule("[bold]headline ratios")
    for o in outcomes:
        for h in headline_of(o):
            console.print(f"{_fmt(h):>10}  {h['figure']}  ({o.name})")
    failed = [o for o in outcomes if o.status not in ("ok", "missing")]
    console.print(f"wrote {report} ({seconds / 60:.1f} min)")
    if failed:
        console.print("[red]not measured: " + ", ".join(f"{o.name} ({o.status})" for o in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
