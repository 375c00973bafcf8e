"""How long a tenant's writes wait during a move, online against offline.

    python benchmarks/online_moves.py [--quick] [--rows N] [--moves N] [--rate W]
                                      [--writers N] [--max-freeze S] [--pg-url URL ...]

A tenant of ``--rows`` (default 1,000,000) rows over the demo app's three tables
(users 10 %, chargers 5 %, charging sessions 85 %; loaded with ``INSERT ... SELECT
generate_series``) lives on shard ``a`` (server 0); shard ``b`` is on server 1; the
catalog is a PostgreSQL database on server 0 (map changes reach routers by NOTIFY).
``--writers`` processes (default 2) write the tenant through ``tenantry.Router`` at a
steady ``--rate`` in all (default 200 writes/s: insert, update, insert, delete of
charging sessions, one transaction each), retrying TenantFrozen and StaleRoute every
5 ms, for the whole run; the first 5 s, before any move, give the gaps' noise floor.

The tenant then moves back and forth between the two shards ``--moves`` times in each
mode (default 5 online, 5 offline), the modes in the order ABBA... so that each mode
goes both ways and drifts in the machine's load hit both alike. Untimed between moves:
a second of steady writes, then VACUUM ANALYZE of both shards (a move deletes the
tenant's rows at its source).

Per move:

- **freeze, as the writers see it**: the longest gap between two acknowledged writes
  (of any writer) from the move's start to a second after its end;
- the move's **duration** (``tenantry.moves.move`` start to return);
- the mover's own figures: ``freeze_seconds`` from the journal (freeze commit to the
  end of the switch) and how many freeze attempts an online move needed;
- a **breakdown** from the mover's checkpoints: online, the replication (initial copy
  and catch-up), the cut's short freeze and the full verification at the cut (counts
  and checksums of both snapshots, outside any freeze), the final cut-over (freeze,
  wait out older transactions, sentinel written and awaited, the rows changed since
  the cut compared: the part ``--max-freeze`` bounds) and the switch; offline, the
  wait-out, the copy, verification and the switch. Online moves also report how many
  rows changed since the cut (``tail_rows``).

Targets (DESIGN.md, "The move protocol"): online freeze p99 <= 250 ms; online /
offline freeze (p99) <= 0.05.
``--quick``: 100,000 rows, 2 + 2 moves, about two minutes. Results go to
``benchmarks/results/online_moves.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event
from typing import Any

import sqlalchemy as sa
from _common import (
    console,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    percentile,
    pg_servers,
    progress,
    verdict,
    write_results,
)
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings, moves
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.testing import DatabaseFactory

NAME = "online_moves"
TENANT = "bigco"
TABLES = ("users", "chargers", "charging_sessions")
TARGET_FREEZE_P99 = 0.250
TARGET_RATIO = 0.05
SETTLE = 1.0  # seconds of writes after each move that still count toward its freeze
QUIET = 5.0  # seconds of writes before the first move: the gaps' noise floor


# -- the tenant ----------------------------------------------------------------------------


def load_tenant(url: str, rows: int) -> dict[str, int]:
    """The tenant's rows, generated on the server; return rows per table."""
    users, chargers = rows // 10, rows // 20
    sessions = rows - users - chargers
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO users (tenant_id, id, email, name)"
                " SELECT :t, g, 'user' || g || '@bigco.example', 'User ' || g"
                " FROM generate_series(1, :n) g"
            ),
            {"t": TENANT, "n": users},
        )
        conn.execute(
            sa.text(
                "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                " SELECT :t, g, 'Charger ' || g, 'Bay ' || (g % 400), 11 + (g % 12) * 3.5,"
                " 'available' FROM generate_series(1, :n) g"
            ),
            {"t": TENANT, "n": chargers},
        )
        conn.execute(
            sa.text(
                "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id,"
                " started_at, ended_at, energy_kwh)"
                " SELECT :t, g, 1 + g % :c, 1 + g % :u,"
                " timestamptz '2026-01-01' + g * interval '37 seconds',"
                " CASE WHEN g % 9 = 0 THEN NULL"
                " ELSE timestamptz '2026-01-01' + g * interval '37 seconds' + interval '40 min'"
                " END, (g % 9000) / 125.0"
                " FROM generate_series(1, :n) g"
            ),
            {"t": TENANT, "n": sessions, "c": chargers, "u": users},
        )
    vacuum(url)
    engine.dispose()
    return {"users": users, "chargers": chargers, "charging_sessions": sessions}


def vacuum(url: str) -> None:
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for table in TABLES:
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
    engine.dispose()


def count_rows(url: str) -> int:
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        total = sum(
            conn.execute(
                sa.text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": TENANT}
            ).scalar_one()
            for t in TABLES
        )
    engine.dispose()
    return int(total)


# -- the writer (a process of its own, so the mover's Python work does not delay it) ------


def write_steadily(catalog_url: str, rate: float, first_id: int, stop: Event, out: Pipe) -> None:
    """Write the tenant at *rate* writes/s until *stop*; send back every ack's time."""
    from tenantry import Router, TenantryError

    settings = load_settings(catalog_url=catalog_url, allow_unsafe_routing_role=True)
    router = Router(catalog_url, settings=settings)
    statements = {
        "insert": sa.text(
            "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id, started_at,"
            " energy_kwh) VALUES (:t, :i, 1, 1, now(), 1.5)"
        ),
        "update": sa.text(
            "UPDATE charging_sessions SET energy_kwh = energy_kwh + 1, ended_at = now()"
            " WHERE tenant_id = :t AND id = :i"
        ),
        "delete": sa.text("DELETE FROM charging_sessions WHERE tenant_id = :t AND id = :i"),
    }
    acks: list[float] = []
    errors: list[str] = []
    retries = inserted = deleted = missing = 0
    mine: deque[int] = deque()
    next_id = first_id
    period = 1.0 / rate
    due = time.monotonic()
    step = 0
    while not stop.is_set():
        op = ("insert", "update", "insert", "delete")[step % 4]
        if op != "insert" and not mine:
            op = "insert"
        row = next_id if op == "insert" else (mine[-1] if op == "update" else mine[0])
        while True:
            try:
                with router.connection(TENANT) as conn:
                    changed = conn.execute(statements[op], {"t": TENANT, "i": row}).rowcount
                break
            except TenantryError as exc:
                if not getattr(exc, "retryable", False) or stop.is_set():
                    errors.append(f"{op}: {exc}")
                    changed = None
                    break
                retries += 1
                time.sleep(0.005)
            except sa.exc.SQLAlchemyError as exc:
                errors.append(f"{op}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                changed = None
                break
        if changed is not None:
            acks.append(time.monotonic())
            if changed != 1:
                missing += 1  # an acknowledged row not found at the tenant's home
            if op == "insert":
                mine.append(next_id)
                next_id += 1
                inserted += 1
            elif op == "delete":
                mine.popleft()
                deleted += 1
        step += 1
        due += period
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            due = now  # behind (frozen, or a slow write): carry on, no burst
    router.close()
    out.send(
        {
            "acks": acks,
            "errors": errors[:20],
            "error_count": len(errors),
            "retries": retries,
            "inserted": inserted,
            "deleted": deleted,
            "missing": missing,
        }
    )
    out.close()


# -- moves ---------------------------------------------------------------------------------


class Timeline:
    """The mover's steps, notes and checkpoints, each with the time it happened."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.notes: list[str] = []

    # MoveObserver
    def step(self, move_id: int, state: str) -> None:
        self.marks.append((f"step:{state}", time.monotonic()))

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)

    # Checkpoints
    def checkpoint(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def first(self, name: str) -> float | None:
        return next((t for n, t in self.marks if n == name), None)

    def last(self, name: str) -> float | None:
        return next((t for n, t in reversed(self.marks) if n == name), None)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 4)


def breakdown(mode: str, timeline: Timeline) -> dict[str, float | None]:
    """Seconds per phase, from the mover's checkpoints."""
    t = timeline
    if mode == "online":
        return {
            "replicate_s": _span(t.first("copied"), t.first("online-cut-frozen")),
            # Freeze, snapshots, unfreeze: the cut (the journal has its exact freeze).
            "cut_s": _span(t.last("online-cut-frozen"), t.first("online-cut")),
            # Counts and checksums on the two snapshots, the tenant writing meanwhile.
            "cut_verify_s": _span(t.first("online-cut"), t.first("frozen")),
            # The last attempt's freeze up to the sentinel's arrival and the changed rows'
            # comparison (what --max-freeze bounds).
            "cutover_s": _span(t.last("online-frozen"), t.first("verified")),
            "verify_s": _span(t.first("verified"), t.first("switched")),
            "switch_s": _span(t.first("switched"), t.first("cleaned")),
            "clean_s": _span(t.first("cleaned"), t.first("step:done")),
        }
    return {
        "wait_out_s": _span(t.first("frozen"), t.first("copied")),
        "copy_s": _span(t.first("copied"), t.first("verified")),
        "verify_s": _span(t.first("verified"), t.first("switched")),
        "switch_s": _span(t.first("switched"), t.first("cleaned")),
        "clean_s": _span(t.first("cleaned"), t.first("step:done")),
    }


def writer_freeze(acks: Sequence[float], start: float, end: float) -> float:
    """The longest gap between two acknowledged writes in [start, end]."""
    times = [start, *(a for a in acks if start < a < end), end]
    return max(b - a for a, b in itertools.pairwise(times))


def merge(replies: Sequence[dict[str, Any]], expected: int) -> dict[str, Any]:
    """The writers' reports as one: acks merged in time order, counts added up."""
    merged: dict[str, Any] = {"acks": sorted(a for r in replies for a in r.get("acks", []))}
    for key in ("retries", "inserted", "deleted", "missing", "error_count"):
        merged[key] = sum(int(r.get(key, 0)) for r in replies)
    merged["errors"] = [e for r in replies for e in r.get("errors", [])][:20]
    if len([r for r in replies if r]) != expected:
        merged["error_count"] += 1
        merged["errors"].append("a writer did not report")
    return merged


def gaps(acks: Sequence[float], start: float, end: float) -> list[float]:
    """Time between consecutive acknowledged writes within [start, end]."""
    inside = [a for a in acks if start <= a <= end]
    return [b - a for a, b in itertools.pairwise(inside)]


def mode_plan(count: int) -> list[str]:
    """ABBA order: online, offline, offline, online, ... (count of each)."""
    plan: list[str] = []
    while len(plan) < 2 * count:
        plan += ["online", "offline"] if (len(plan) // 2) % 2 == 0 else ["offline", "online"]
    return plan[: 2 * count]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    started_run = time.monotonic()
    load_start = load_average()
    with pg_servers(args.pg_url, count=2) as servers, DatabaseFactory(servers) as databases:
        catalog_url = databases(0)
        urls = {"a": databases(0), "b": databases(1)}
        # The shards are reached as the superuser, as before routing roles were checked:
        # this measures the moves' freeze, not row-level security.
        settings = load_settings(
            catalog_url=catalog_url, alembic_config=str(MIGRATIONS), allow_unsafe_routing_role=True
        )
        catalog = Catalog(settings=settings)
        catalog.init()
        for name, url in urls.items():
            catalog.add_shard(name, url, tier="shared")
        assert upgrade(catalog, jobs=1).ok
        catalog.add_tenant(TENANT, shard="a")
        console.print(f"loading {args.rows:,} rows ...")
        began = time.monotonic()
        per_table = load_tenant(catalog.get_shard("a").url, args.rows)
        load_seconds = time.monotonic() - began

        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        pipes, writers = [], []
        for i in range(args.writers):
            receive, send = context.Pipe(duplex=False)
            writer = context.Process(
                target=write_steadily,
                args=(catalog_url, args.rate / args.writers, 50_000_000 * (i + 1), stop, send),
                daemon=True,
            )
            writer.start()
            pipes.append(receive)
            writers.append(writer)
        time.sleep(3.0)  # the writers import, connect and settle
        quiet = (time.monotonic(), time.monotonic() + QUIET)
        time.sleep(QUIET)  # the noise floor: gaps between writes with no move running

        results: list[dict[str, Any]] = []
        plan = mode_plan(args.moves)
        try:
            with progress() as bar:
                task = bar.add_task("moves", total=len(plan))
                for mode in plan:
                    source = catalog.get_tenant(TENANT).shard
                    target = "b" if source == "a" else "a"
                    timeline = Timeline()
                    start = time.monotonic()
                    done = moves.move(
                        catalog,
                        TENANT,
                        target,
                        mode=mode,
                        max_freeze=args.max_freeze,
                        observer=timeline,
                        hooks=timeline,
                    )
                    end = time.monotonic()
                    assert done.succeeded, done
                    results.append(
                        {
                            "mode": mode,
                            "from": source,
                            "to": target,
                            "start": start,
                            "end": end,
                            "duration_s": round(end - start, 3),
                            "journal_freeze_s": done.stats.get("freeze_seconds"),
                            "freeze_attempts": done.stats.get("freeze_attempts"),
                            "cut_freeze_s": done.stats.get("cut_freeze_seconds"),
                            "tail_rows": done.stats.get("tail_rows"),
                            "breakdown": breakdown(mode, timeline),
                            "notes": [n for n in timeline.notes if "lag" not in n][:10],
                        }
                    )
                    time.sleep(SETTLE)
                    for url in urls.values():
                        vacuum(url)
                    bar.advance(task)
        finally:
            stop.set()
            replies = [pipe.recv() if pipe.poll(60) else {} for pipe in pipes]
            for writer in writers:
                writer.join(30)
        writes = merge(replies, args.writers)
        home = catalog.get_tenant(TENANT).shard
        other = "b" if home == "a" else "a"
        expected = args.rows + writes["inserted"] - writes["deleted"]
        found = {name: count_rows(catalog.get_shard(name).url) for name in urls}
        catalog.close()

    acks: list[float] = writes.pop("acks")
    for move in results:
        move["writer_freeze_s"] = round(writer_freeze(acks, move["start"], move["end"] + SETTLE), 4)
        move["writes_during"] = sum(1 for a in acks if move["start"] <= a <= move["end"])
    span = (acks[-1] - acks[0]) if len(acks) > 1 else 0.0
    floor = gaps(acks, *quiet)
    return {
        "config": {
            "rows": args.rows,
            "rows_per_table": per_table,
            "moves_per_mode": args.moves,
            "rate_target": args.rate,
            "writers": args.writers,
            "max_freeze": args.max_freeze,
            "quick": args.quick,
        },
        "load_seconds": round(load_seconds, 2),
        "writer": {
            **{k: v for k, v in writes.items()},
            "acks": len(acks),
            "rate_achieved": round(len(acks) / span, 1) if span else None,
            "quiet_rate": round(len(floor) / QUIET, 1),
            "quiet_gap_p99_s": percentile(floor, 99),
            "quiet_gap_max_s": max(floor) if floor else None,
        },
        "check": {
            "home": home,
            "rows_expected": expected,
            "rows_found": found[home],
            "rows_left_at_other": found[other],
            "ok": found[home] == expected
            and found[other] == 0
            and writes.get("missing", 0) == 0
            and writes.get("error_count", 0) == 0,
        },
        "moves": [{k: v for k, v in m.items() if k not in ("start", "end")} for m in results],
        "seconds": round(time.monotonic() - started_run, 1),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    by_mode = {
        mode: [m for m in data["moves"] if m["mode"] == mode] for mode in ("online", "offline")
    }
    stats: dict[str, Any] = {}
    for mode, found in by_mode.items():
        stats[mode] = {
            "writer_freeze_s": summary([m["writer_freeze_s"] for m in found]),
            "journal_freeze_s": summary(
                [m["journal_freeze_s"] for m in found if m["journal_freeze_s"] is not None]
            ),
            "duration_s": summary([m["duration_s"] for m in found]),
            "breakdown_p50_s": {
                key: percentile([m["breakdown"][key] for m in found if m["breakdown"][key]], 50)
                for key in (found[0]["breakdown"] if found else {})
            },
        }
    online, offline = stats["online"]["writer_freeze_s"], stats["offline"]["writer_freeze_s"]
    ratio = {q: online[q] / offline[q] for q in ("p50", "p99", "max")}
    targets = [
        {
            "figure": "online freeze p99 (writers)",
            "value": online["p99"],
            "target": f"<= {TARGET_FREEZE_P99 * 1000:.0f} ms",
            "verdict": verdict(online["p99"], TARGET_FREEZE_P99),
        },
        {
            "figure": "online / offline freeze p99 (writers)",
            "value": ratio["p99"],
            "target": f"<= {TARGET_RATIO}",
            "verdict": verdict(ratio["p99"], TARGET_RATIO),
        },
    ]
    return {"by_mode": stats, "ratio_online_offline": ratio, "targets": targets}


# -- output --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.0f} ms"


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} s"


MOVE_COLUMNS = (
    "#",
    "mode",
    "from",
    "to",
    "freeze (writers)",
    "journal",
    "attempts",
    "duration",
    "cut-over / wait-out",
    "cut freeze",
    "rows changed since the cut",
    "copy",
    "verify",
    "switch",
)


def markdown(data: dict[str, Any], info: dict[str, Any]) -> str:
    cfg, result = data["config"], data["summary"]
    stats, ratio = result["by_mode"], result["ratio_online_offline"]
    met = sum(t["verdict"] == "PASS" for t in result["targets"])
    lines = [
        "# Online moves: the writes' freeze, online against offline",
        "",
        f"`python benchmarks/online_moves.py {' '.join(info['argv'])}`".replace(" `", "`"),
        f"— {info['when']}, {data['seconds']:.0f} s on {info['cores']} cores. A tenant of "
        f"{cfg['rows']:,} rows (users {cfg['rows_per_table']['users']:,}, chargers "
        f"{cfg['rows_per_table']['chargers']:,}, charging sessions "
        f"{cfg['rows_per_table']['charging_sessions']:,}) moved {cfg['moves_per_mode']} times "
        f"online and {cfg['moves_per_mode']} times offline between two PostgreSQL servers "
        f"(ABBA order), while {cfg['writers']} writer processes wrote it through "
        f"`tenantry.Router` at {cfg['rate_target']:g} writes/s in all (achieved "
        f"{data['writer']['rate_achieved']}/s over the run, {data['writer']['quiet_rate']}/s "
        "with no move running), "
        f"`--max-freeze {cfg['max_freeze']:g}`. Load average "
        f"{data['load_average_start']} at the start, {data['load_average_end']} at the end.",
        "",
        f"**{met} of {len(result['targets'])} targets met.**",
        "",
        "## Targets",
        "",
        markdown_table(
            ["figure", "value", "target", "verdict"],
            [
                [
                    t["figure"],
                    _ms(t["value"])
                    if "ratio" not in t["figure"] and "/" not in t["figure"]
                    else f"{t['value']:.3f}",
                    t["target"],
                    f"**{t['verdict']}**",
                ]
                for t in result["targets"]
            ],
            align="lrrc",
        ),
        "",
        "## Freeze as the writers see it, and the move's duration",
        "",
        "Freeze: the longest gap between two acknowledged writes of the tenant, from the "
        "move's start to a second after its end. Journal: the mover's `freeze_seconds` "
        "(freeze committed to the end of the switch).",
        "",
        markdown_table(
            ["mode", "n", "freeze p50", "p99", "max", "journal p50", "duration p50", "p99", "max"],
            [
                [
                    mode,
                    s["writer_freeze_s"]["n"],
                    _ms(s["writer_freeze_s"]["p50"]),
                    _ms(s["writer_freeze_s"]["p99"]),
                    _ms(s["writer_freeze_s"]["max"]),
                    _ms(s["journal_freeze_s"].get("p50")),
                    _s(s["duration_s"]["p50"]),
                    _s(s["duration_s"]["p99"]),
                    _s(s["duration_s"]["max"]),
                ]
                for mode, s in stats.items()
            ],
        ),
        "",
        f"Online / offline freeze: p50 {ratio['p50']:.3f}, p99 {ratio['p99']:.3f}, "
        f"max {ratio['max']:.3f}. Noise floor, {QUIET:g} s of writes before the first move: "
        f"gap p99 {_ms(data['writer']['quiet_gap_p99_s'])}, max "
        f"{_ms(data['writer']['quiet_gap_max_s'])}.",
        "",
        "## Where an online move's freeze goes (p50 of each phase)",
        "",
        "Cut: the short freeze that takes a snapshot on both ends. Cut verify: row counts "
        "and checksums of the two snapshots, with the tenant writing again. Cut-over: the "
        "last freeze attempt, from the freeze's commit through waiting out older "
        "transactions and the sentinel's arrival on the target to the comparison of the "
        "rows changed since the cut — the part `--max-freeze` bounds. Verify (nothing left "
        "to do after a cut-over in the same process) and the switch run after it, still "
        "frozen.",
        "",
        markdown_table(
            ["mode", *stats["online"]["breakdown_p50_s"]],
            [
                ["online", *(_ms(v) for v in stats["online"]["breakdown_p50_s"].values())],
            ],
        ),
        "",
        markdown_table(
            ["mode", *stats["offline"]["breakdown_p50_s"]],
            [
                ["offline", *(_ms(v) for v in stats["offline"]["breakdown_p50_s"].values())],
            ],
        ),
        "",
        "## Every move",
        "",
        markdown_table(
            [*MOVE_COLUMNS],
            [
                [
                    i + 1,
                    m["mode"],
                    m["from"],
                    m["to"],
                    _ms(m["writer_freeze_s"]),
                    _ms(m["journal_freeze_s"]),
                    m["freeze_attempts"] or "",
                    _s(m["duration_s"]),
                    _ms(m["breakdown"].get("cutover_s", m["breakdown"].get("wait_out_s"))),
                    _ms(m.get("cut_freeze_s")),
                    "" if m.get("tail_rows") is None else f"{m['tail_rows']:,}",
                    _s(m["breakdown"].get("replicate_s", m["breakdown"].get("copy_s"))),
                    _ms(m["breakdown"]["verify_s"]),
                    _ms(m["breakdown"]["switch_s"]),
                ]
                for i, m in enumerate(data["moves"])
            ],
        ),
        "",
        "(copy: for online moves, the initial copy and catch-up while the tenant writes.)",
        "",
        "## Nothing lost",
        "",
        f"Writer: {data['writer']['acks']:,} acknowledged writes, "
        f"{data['writer']['retries']:,} retries of TenantFrozen/StaleRoute, "
        f"{data['writer']['error_count']} other errors, {data['writer']['missing']} updates or "
        f"deletes that found no row. Rows at the final home ({data['check']['home']}): "
        f"{data['check']['rows_found']:,} (expected {data['check']['rows_expected']:,}); left "
        f"at the other shard: {data['check']['rows_left_at_other']}. "
        f"**{'OK' if data['check']['ok'] else 'NOT OK'}**.",
        "",
        "## Machine",
        "",
        machine_markdown(info),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 2 + 2 moves")
    parser.add_argument("--rows", type=int, help="rows of the tenant [1,000,000]")
    parser.add_argument("--moves", type=int, help="moves per mode [5]")
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s in all [200]")
    parser.add_argument("--writers", type=int, default=2, help="writer processes [2]")
    parser.add_argument("--max-freeze", type=float, default=1.0, help="online budget, s [1.0]")
    parser.add_argument("--pg-url", nargs="*", help="superuser URLs of running servers")
    args = parser.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.moves = args.moves or (2 if args.quick else 5)
    if args.rows < 100 or args.moves < 1 or args.rate <= 0 or args.writers < 1:
        parser.error("--rows must be >= 100, --moves >= 1, --rate > 0, --writers >= 1")

    data = run(args)
    data["summary"] = summarize(data)
    info = machine_info(args.pg_url or ())
    json_path, md_path = write_results(NAME, {"machine": info, **data}, markdown(data, info))
    stats = data["summary"]["by_mode"]
    for mode in ("online", "offline"):
        f = stats[mode]["writer_freeze_s"]
        console.print(
            f"{mode:>7}: freeze p50 {_ms(f['p50'])}, p99 {_ms(f['p99'])}, max {_ms(f['max'])}; "
            f"duration p50 {_s(stats[mode]['duration_s']['p50'])}; "
            f"phases p50 { {k: _ms(v) for k, v in stats[mode]['breakdown_p50_s'].items()} }"
        )
    for target in data["summary"]["targets"]:
        style = "green" if target["verdict"] == "PASS" else "red"
        console.print(
            f"[{style}]{target['verdict']}[/] {target['figure']}: "
            f"{target['value']:.3f} (target {target['target']})"
        )
    console.print(f"nothing lost: {'OK' if data['check']['ok'] else 'NOT OK'} {data['check']}")
    console.print(f"wrote {json_path} and {md_path}")
    return 0 if data["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
