"""How fast `tenantry move` copies a tenant, against `psql | psql` on the same data.

    python benchmarks/move_throughput.py [--quick] [--rows N] [--rounds R]
                                         [--small-moves K] [--pg-url URL ...]

A tenant of ``--rows`` rows (default 1,000,000; ``--quick`` 100,000) over the demo
schema's three tables with foreign keys (users 1%, chargers 0.1%, charging sessions the
rest), beside a neighbour of 5% as many rows on the same shared shard, is moved between
two PostgreSQL servers. Each round measures both, one after the other, each from the
server that holds the tenant to the other one; over four rounds each goes first twice
and copies twice in each direction:

- **tenantry**: ``tenantry.moves.move(catalog, tenant, other, mode="offline")`` in this
  process. The copy step is the journal's ``copy_seconds`` (connections, reflection,
  the COPY streams of all three tables in one target transaction, its commit); the whole
  move is wall time from the call to its return (plan, freeze, copy, verify, switch,
  cleanup of the source); ``freeze_seconds`` says how long writes were refused.
- **psql**: per table, parents first, ``psql -c "\\copy (SELECT ... WHERE tenant_id =
  'big') TO STDOUT (FORMAT binary)" | psql -c "\\copy t FROM STDIN (FORMAT binary)"``
  into the same tables of the other shard that a move fills; the time of the three
  pipelines, process start-up included. Its rows are deleted again afterwards, untimed.

Both carry the same bytes (binary COPY of the same rows); rows/s and MB/s (10^6 bytes)
are reported for each, and their ratio (target >= 0.8, aim >= 0.95). Before each
measurement, untimed, both shards are vacuumed: both methods then write into tables
that held the tenant before and were emptied and vacuumed.

On a machine others share, wall time mostly says how busy they were; so the CPU each
copy cost is measured too: the client's (the mover's process, or the psql processes)
and every process of both servers (from /proc, once the copy's backends have ended;
local servers only). The catalog is a SQLite file, so the servers do nothing else.

Then a 10,000-row tenant (the common case) is moved back and forth ``--small-moves``
times: whole move, copy and freeze.

Without ``--pg-url`` two throwaway servers are started (tenantry.testing). Results go to
``benchmarks/results/move_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from _common import (
    add_server_options,
    console,
    finish,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    pg_servers,
    progress,
    timed,
    verdict,
)
from _procfs import CpuMeter, ServerCpu
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings, migrations, moves
from tenantry.demo import MIGRATIONS
from tenantry.moves import NullObserver
from tenantry.testing import create_database, drop_database, find_pg_bindir

NAME = "move_throughput"
BIG, SMALL, NEIGHBOUR = "big", "small", "neighbour"
SMALL_ROWS = 10_000
#: Parents first, as both the mover and the psql pipelines copy them.
TABLES = ("chargers", "users", "charging_sessions")
COLUMNS = {
    "users": "tenant_id, id, email, name",
    "chargers": "tenant_id, id, name, location, power_kw, status",
    "charging_sessions": "tenant_id, id, charger_id, user_id, started_at, ended_at, energy_kwh",
}
TARGET_RATIO, AIM_RATIO = 0.8, 0.95
MB = 1e6


# -- the fleet ---------------------------------------------------------------------------


def engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool)


def shape(rows: int) -> dict[str, int]:
    """Rows per table for a tenant of *rows* rows: 1% users, 0.1% chargers."""
    users = max(1, rows // 100)
    chargers = max(1, rows // 1000)
    return {"users": users, "chargers": chargers, "charging_sessions": rows - users - chargers}


def load_tenant(url: str, tenant: str, rows: int) -> dict[str, int]:
    """Generate the tenant's rows on the server: no data crosses the network."""
    counts = shape(rows)
    params = {
        "t": tenant,
        "u": counts["users"],
        "c": counts["chargers"],
        "s": counts["charging_sessions"],
    }
    db = engine(url)
    try:
        with db.begin() as conn:
            # The rows are consistent by construction: skip the per-row foreign-key
            # triggers while loading (superuser only), not while moving.
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            conn.execute(
                sa.text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " SELECT CAST(:t AS text), i, 'driver' || i || '@' || CAST(:t AS text)"
                    " || '.example', 'Driver number ' || i FROM generate_series(1, :u) AS i"
                ),
                params,
            )
            conn.execute(
                sa.text(
                    "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                    " SELECT :t, i, 'Charger ' || i, 'Car park level ' || (i % 7),"
                    " 3.70 + (i % 350) * 0.5,"
                    " CASE WHEN i % 5 = 0 THEN 'busy' ELSE 'available' END"
                    " FROM generate_series(1, :c) AS i"
                ),
                params,
            )
            conn.execute(
                sa.text(
                    "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id,"
                    " started_at, ended_at, energy_kwh)"
                    " SELECT :t, i, 1 + i % :c, 1 + i % :u,"
                    " timestamptz '2026-01-01 00:00+00' + i * interval '17 seconds',"
                    " CASE WHEN i % 9 = 0 THEN NULL"
                    " ELSE timestamptz '2026-01-01 00:45+00' + i * interval '17 seconds' END,"
                    " round((i % 9000) * 0.0137, 3)"
                    " FROM generate_series(1, :s) AS i"
                ),
                params,
            )
    finally:
        db.dispose()
    return counts


def vacuum(url: str) -> None:
    db = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with db.connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        db.dispose()


class Fleet:
    """Shared shards s1 (server 0) and s2 (server 1) in a SQLite catalog.

    Autovacuum stays on: without it, the cleanup's deletes of parent rows check their
    foreign keys against a child table full of dead rows, which takes minutes.
    """

    def __init__(self, servers: Sequence[str]) -> None:
        self.created: list[str] = []
        # A SQLite catalog: the servers' CPU is then the shards' work alone.
        self.folder = tempfile.TemporaryDirectory(prefix="move-throughput-")
        self.catalog_url = f"sqlite:///{self.folder.name}/catalog.db"
        self.urls = {"s1": self._database(servers[0]), "s2": self._database(servers[1])}
        # The shards are reached as the superuser, as before routing roles were checked:
        # a move copies rows, and row-level security is not what this measures.
        settings = load_settings(
            catalog_url=self.catalog_url,
            alembic_config=str(MIGRATIONS),
            freeze_timeout=60.0,
            allow_unsafe_routing_role=True,
        )
        self.catalog = Catalog(settings=settings)
        self.catalog.init()
        for name, url in self.urls.items():
            self.catalog.add_shard(name, url, tier="shared")
        run = migrations.upgrade(self.catalog, jobs=1)
        if not run.ok:
            raise SystemExit(f"migration failed: {[r.error for r in run.results]}")
        self.cpu = ServerCpu(servers)

    def _database(self, server: str) -> str:
        url = create_database(server)
        self.created.append(url)
        return url

    def home(self, tenant: str) -> str:
        return self.catalog.get_tenant(tenant).shard

    def close(self) -> None:
        self.catalog.close()
        while self.created:
            drop_database(self.created.pop())
        self.folder.cleanup()


# -- psql | psql -----------------------------------------------------------------------


def psql_binary() -> str:
    bindir = find_pg_bindir()
    if bindir is not None and (bindir / "psql").is_file():
        return str(bindir / "psql")
    found = shutil.which("psql")
    if found is None:
        raise SystemExit("psql not found: install the PostgreSQL client")
    return found


def libpq_url(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def copy_out(table: str, tenant: str) -> str:
    return (
        f"\\copy (SELECT {COLUMNS[table]} FROM {table} WHERE tenant_id = '{tenant}')"
        " TO STDOUT (FORMAT binary)"
    )


def copy_in(table: str) -> str:
    return f"\\copy {table} ({COLUMNS[table]}) FROM STDIN (FORMAT binary)"


def psql_argv(psql: str, url: str, command: str) -> list[str]:
    return [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", libpq_url(url), "-c", command]


def stream_bytes(psql: str, url: str, tenant: str) -> dict[str, int]:
    """The size of each table's binary COPY stream (untimed)."""
    sizes = {}
    for table in TABLES:
        with subprocess.Popen(
            psql_argv(psql, url, copy_out(table, tenant)), stdout=subprocess.PIPE
        ) as out:
            assert out.stdout is not None
            size = 0
            while chunk := out.stdout.read(1 << 20):
                size += len(chunk)
        if out.returncode != 0:
            raise SystemExit(f"psql \\copy out of {table} failed")
        sizes[table] = size
    return sizes


def psql_pipeline(psql: str, source: str, target: str, tenant: str) -> dict[str, float]:
    """``psql | psql`` per table, parents first; seconds per table."""
    seconds = {}
    for table in TABLES:
        started = time.perf_counter()
        out = subprocess.Popen(
            psql_argv(psql, source, copy_out(table, tenant)), stdout=subprocess.PIPE
        )
        into = subprocess.Popen(psql_argv(psql, target, copy_in(table)), stdin=out.stdout)
        assert out.stdout is not None
        out.stdout.close()  # the reader owns the pipe now: a dead reader stops the writer
        if into.wait() != 0 or out.wait() != 0:
            raise SystemExit(f"psql | psql of {table} failed")
        seconds[table] = time.perf_counter() - started
    return seconds


def purge(url: str, tenant: str) -> None:
    """Delete the tenant's rows without their foreign-key triggers (all of them go)."""
    db = engine(url)
    try:
        with db.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            for table in reversed(TABLES):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE tenant_id = :t"), {"t": tenant})
    finally:
        db.dispose()


def tenant_counts(url: str, tenant: str) -> dict[str, int]:
    db = engine(url)
    try:
        with db.connect() as conn:
            return {
                t: conn.execute(
                    sa.text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": tenant}
                ).scalar_one()
                for t in TABLES
            }
    finally:
        db.dispose()


# -- tenantry move ---------------------------------------------------------------------


class StepClock(NullObserver):
    """When the move entered each state; at the copy's ends, its CPU (a checkpoint
    seam of the mover, so that verification's work is not counted)."""

    def __init__(self, servers: ServerCpu) -> None:
        self.at: dict[str, float] = {}
        self.meter = CpuMeter(servers)
        self.cpu: dict[str, float | None] = {}

    def step(self, move_id: int, state: str) -> None:
        self.at[state] = time.perf_counter()

    def checkpoint(self, name: str) -> None:
        if name == "copied":  # committed, the copy about to begin
            self.meter.start()
        elif name == "verified":  # the copy committed and its connections closed
            self.cpu = self.meter.stop()


def timed_move(fleet: Fleet, tenant: str, target: str) -> dict[str, Any]:
    clock = StepClock(fleet.cpu)
    started = time.perf_counter()
    done = moves.move(fleet.catalog, tenant, target, mode="offline", observer=clock, hooks=clock)
    # The wait for the copy's backends to end, in the middle of the freeze, is ours.
    paused = clock.meter.paused
    total = time.perf_counter() - started - paused
    if not done.succeeded:
        raise SystemExit(f"move {done.id} did not finish: {done.state} {done.error}")
    order = ["frozen", "copied", "verified", "switched", "cleaned", "done"]
    steps = {"plan": clock.at["frozen"] - started}
    for state, following in itertools.pairwise(order):
        steps[state] = clock.at[following] - clock.at[state]
    steps["verified"] -= paused
    stats = done.stats
    return {
        "move_id": done.id,
        "source": done.source,
        "target": done.target,
        "rows": int(stats["rows"]),
        "bytes": int(stats["bytes"]),
        "copy_s": float(stats["copy_seconds"]),
        "freeze_s": float(stats["freeze_seconds"]) - paused,
        "move_s": total,
        # Seconds in each state: "frozen" is the freeze and the wait for older
        # transactions, "copied" the copy, "verified" the digests, "cleaned" the
        # deletion of the source's rows.
        "steps_s": steps,
        "meter_pause_s": paused,
        # CPU of the copy step: this process, and both servers.
        **clock.cpu,
    }


# -- the run ---------------------------------------------------------------------------


def other(shard: str) -> str:
    return "s2" if shard == "s1" else "s1"


def measure_psql(fleet: Fleet, psql: str, rows: int, size: int) -> dict[str, Any]:
    """psql | psql from the big tenant's home into the tables a move would fill, then
    those rows removed again (untimed), leaving the tables as a move's cleanup does."""
    source = fleet.home(BIG)
    target = other(source)
    meter = CpuMeter(fleet.cpu, children=True)  # the psql processes, not this one
    meter.start()
    per_table = psql_pipeline(psql, fleet.urls[source], fleet.urls[target], BIG)
    cpu = meter.stop()
    copied = tenant_counts(fleet.urls[target], BIG)
    if sum(copied.values()) != rows:
        raise SystemExit(f"psql copied {copied}, expected {rows} rows")
    purge(fleet.urls[target], BIG)
    seconds = sum(per_table.values())
    return {
        "source": source,
        "target": target,
        "rows": rows,
        "bytes": size,
        "copy_s": seconds,
        "tables_s": per_table,
        **cpu,
    }


def rates(entry: dict[str, Any]) -> None:
    entry["rows_per_s"] = entry["rows"] / entry["copy_s"]
    entry["mb_per_s"] = entry["bytes"] / MB / entry["copy_s"]


def big_rounds(fleet: Fleet, psql: str, rows: int, size: int, rounds: int) -> list[dict[str, Any]]:
    """Alternating tenantry and psql copies of the big tenant, each from its home."""
    results = []
    with progress() as bar:
        task = bar.add_task(f"{rounds} rounds of {rows:,} rows", total=rounds * 2)
        for r in range(rounds):
            # Every four rounds each method goes first twice and copies twice each way
            # (the tenant's home alternates with every move).
            order = ["tenantry", "psql"] if r % 4 < 2 else ["psql", "tenantry"]
            result: dict[str, Any] = {"round": r + 1, "order": order}
            for method in order:
                for url in fleet.urls.values():
                    vacuum(url)
                if method == "psql":
                    entry = measure_psql(fleet, psql, rows, size)
                else:
                    entry = timed_move(fleet, BIG, other(fleet.home(BIG)))
                    if entry["rows"] != rows:
                        raise SystemExit(f"moved {entry['rows']} rows, not {rows}")
                rates(entry)
                result[method] = entry
                bar.advance(task)
            tenantry, piped = result["tenantry"], result["psql"]
            result["ratio"] = tenantry["rows_per_s"] / piped["rows_per_s"]
            results.append(result)
            console.print(
                f"round {r + 1}: tenantry {tenantry['copy_s']:.2f} s (move "
                f"{tenantry['move_s']:.2f} s, frozen {tenantry['freeze_s']:.2f} s), "
                f"psql {piped['copy_s']:.2f} s, ratio {result['ratio']:.3f}"
            )
    return results


def small_moves(fleet: Fleet, count: int) -> list[dict[str, Any]]:
    """The 10,000-row tenant moved back and forth."""
    results = []
    with progress() as bar:
        task = bar.add_task("10,000-row tenant", total=count)
        for _ in range(count):
            entry = timed_move(fleet, SMALL, other(fleet.home(SMALL)))
            if entry["rows"] != SMALL_ROWS:
                raise SystemExit(f"moved {entry['rows']} rows, not {SMALL_ROWS}")
            rates(entry)
            results.append(entry)
            bar.advance(task)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    neighbour = max(10_000, rows // 20)
    psql = psql_binary()
    data: dict[str, Any] = {
        "config": {
            "rows": rows,
            "tables": shape(rows),
            "neighbour_rows": neighbour,
            "rounds": args.rounds or (2 if args.quick else 4),
            "small_rows": SMALL_ROWS,
            "small_moves": args.small_moves or (4 if args.quick else 10),
            "psql": psql,
            "quick": args.quick,
        }
    }
    with pg_servers(args.pg_url, count=2) as servers:
        data["machine"] = machine_info(servers)
        fleet = Fleet(servers)
        try:
            for tenant in (BIG, NEIGHBOUR, SMALL):
                fleet.catalog.add_tenant(tenant, shard="s1")
            started = time.perf_counter()
            for tenant, count in ((BIG, rows), (NEIGHBOUR, neighbour), (SMALL, SMALL_ROWS)):
                load_tenant(fleet.urls["s1"], tenant, count)
            vacuum(fleet.urls["s1"])
            data["load_s"] = time.perf_counter() - started
            data["stream_bytes"] = sizes = stream_bytes(psql, fleet.urls["s1"], BIG)
            size = sum(sizes.values())
            console.print(
                f"loaded {rows:,} rows ({size / MB:.1f} MB as binary COPY) "
                f"in {data['load_s']:.1f} s"
            )
            data["rounds"] = big_rounds(fleet, psql, rows, size, data["config"]["rounds"])
            data["small"] = small_moves(fleet, data["config"]["small_moves"])
            # The neighbour never moved and still has every row.
            if sum(tenant_counts(fleet.urls["s1"], NEIGHBOUR).values()) != neighbour:
                raise SystemExit("the neighbour's rows changed")
        finally:
            fleet.close()
    data["summary"] = summarize(data)
    data["load_average_end"] = load_average()
    return data


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) else None


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    rounds = data["rounds"]
    summary: dict[str, Any] = {}
    for method in ("tenantry", "psql"):
        entries = [r[method] for r in rounds]
        summary[method] = {
            "copy_s": median([e["copy_s"] for e in entries]),
            "rows_per_s": median([e["rows_per_s"] for e in entries]),
            "mb_per_s": median([e["mb_per_s"] for e in entries]),
            "rows_per_s_min": min(e["rows_per_s"] for e in entries),
            "rows_per_s_max": max(e["rows_per_s"] for e in entries),
            "client_cpu_s": median([e["client_cpu_s"] for e in entries]),
            "server_cpu_s": median_or_none([e["server_cpu_s"] for e in entries]),
        }
    moved = [r["tenantry"] for r in rounds]
    summary["tenantry"].update(
        {
            "move_s": median([e["move_s"] for e in moved]),
            "freeze_s": median([e["freeze_s"] for e in moved]),
            "freeze_s_max": max(e["freeze_s"] for e in moved),
            "steps_s": {
                step: median([e["steps_s"][step] for e in moved]) for step in moved[0]["steps_s"]
            },
        }
    )
    ratios = [r["ratio"] for r in rounds]
    # The ratio of the medians, and the spread of the same ratio round by round.
    ratio = summary["tenantry"]["rows_per_s"] / summary["psql"]["rows_per_s"]
    summary["ratio"] = {
        "median": ratio,
        "min": min(ratios),
        "max": max(ratios),
        "target": TARGET_RATIO,
        "aim": AIM_RATIO,
        "target_verdict": verdict(ratio, TARGET_RATIO, higher_is_better=True),
        "aim_verdict": verdict(ratio, AIM_RATIO, higher_is_better=True),
    }
    cpu = {m: summary[m]["server_cpu_s"] for m in ("tenantry", "psql")}
    if cpu["tenantry"] is not None and cpu["psql"] is not None:
        # CPU for the same rows, psql over tenantry: 1.0 means no dearer than psql.
        total = {m: cpu[m] + summary[m]["client_cpu_s"] for m in cpu}
        summary["cpu_ratio"] = total["psql"] / total["tenantry"]
    else:
        summary["cpu_ratio"] = None
    small = data["small"]
    summary["small"] = {
        "moves": len(small),
        "move_s": median([e["move_s"] for e in small]),
        "move_s_min": min(e["move_s"] for e in small),
        "move_s_max": max(e["move_s"] for e in small),
        "copy_s": median([e["copy_s"] for e in small]),
        "freeze_s": median([e["freeze_s"] for e in small]),
        "freeze_s_max": max(e["freeze_s"] for e in small),
        "steps_s": {
            step: median([e["steps_s"][step] for e in small]) for step in small[0]["steps_s"]
        },
    }
    return summary


# -- output ------------------------------------------------------------------------------


def steps_table(steps: dict[str, float], *, digits: int) -> str:
    """Seconds per step of a move, one row."""
    return markdown_table(
        ["plan", "freeze + wait", "copy", "verify", "switch", "clean source"],
        [[f"{steps[s]:.{digits}f}" for s in _STEPS]],
        align="rrrrrr",
    )


def render_markdown(data: dict[str, Any]) -> str:
    config, summary = data["config"], data["summary"]
    size = sum(data["stream_bytes"].values())
    ratio = summary["ratio"]
    tenantry, psql = summary["tenantry"], summary["psql"]
    lines = [
        "# Move throughput",
        "",
        f"A tenant of {config['rows']:,} rows (users {config['tables']['users']:,}, chargers "
        f"{config['tables']['chargers']:,}, charging sessions "
        f"{config['tables']['charging_sessions']:,}; {size / MB:.1f} MB as binary COPY) "
        "moved PostgreSQL to PostgreSQL between two servers, against `psql | psql` "
        f"binary `\\copy` of the same rows, table by table; {config['rounds']} rounds, "
        "each going first in turn. Medians; MB = 10^6 bytes.",
        "",
        f"**Copy throughput ratio tenantry / psql: {ratio['median']:.3f}** "
        f"(rounds {ratio['min']:.3f}-{ratio['max']:.3f}); target >= {TARGET_RATIO}: "
        f"{ratio['target_verdict']}, aim >= {AIM_RATIO}: {ratio['aim_verdict']}.",
        "",
        markdown_table(
            ["method", "copy s", "rows/s", "MB/s", "rows/s min-max"],
            [
                [
                    name,
                    f"{m['copy_s']:.2f}",
                    f"{m['rows_per_s']:,.0f}",
                    f"{m['mb_per_s']:.1f}",
                    f"{m['rows_per_s_min']:,.0f}-{m['rows_per_s_max']:,.0f}",
                ]
                for name, m in (
                    ("tenantry move (copy step)", tenantry),
                    ("`psql \\| psql`", psql),
                )
            ],
        ),
        "",
        *cpu_lines(summary),
        f"The whole move took {tenantry['move_s']:.2f} s; writes were frozen for "
        f"{tenantry['freeze_s']:.2f} s (at most {tenantry['freeze_s_max']:.2f} s). "
        "Seconds per step (median):",
        "",
        steps_table(tenantry["steps_s"], digits=2),
        "",
        "## Rounds",
        "",
        markdown_table(
            [
                "round",
                "first",
                "direction",
                "tenantry copy s",
                "psql s",
                "ratio",
                "move s",
                "frozen s",
                "CPU s tenantry / psql",
            ],
            [
                [
                    r["round"],
                    r["order"][0],
                    f"{r['tenantry']['source']} -> {r['tenantry']['target']}",
                    f"{r['tenantry']['copy_s']:.2f}",
                    f"{r['psql']['copy_s']:.2f}",
                    f"{r['ratio']:.3f}",
                    f"{r['tenantry']['move_s']:.2f}",
                    f"{r['tenantry']['freeze_s']:.2f}",
                    f"{_cpu(r['tenantry'])} / {_cpu(r['psql'])}",
                ]
                for r in data["rounds"]
            ],
            align="rllrrrrrr",
        ),
        "",
        "psql seconds per table (median): "
        + ", ".join(
            f"{t} {median([r['psql']['tables_s'][t] for r in data['rounds']]):.2f}" for t in TABLES
        )
        + ".",
        "",
    ]
    small = summary["small"]
    lines += [
        "## A 10,000-row tenant (the common case)",
        "",
        f"{small['moves']} offline moves back and forth between the servers, through the "
        "library (no process start-up):",
        "",
        markdown_table(
            ["whole move s", "min-max", "copy s", "frozen s", "frozen max s"],
            [
                [
                    f"{small['move_s']:.3f}",
                    f"{small['move_s_min']:.3f}-{small['move_s_max']:.3f}",
                    f"{small['copy_s']:.3f}",
                    f"{small['freeze_s']:.3f}",
                    f"{small['freeze_s_max']:.3f}",
                ]
            ],
        ),
        "",
        steps_table(small["steps_s"], digits=3),
        "",
        "## Notes",
        "",
        "- The copy step is the journal's `copy_seconds`: two connections, reflecting the "
        "tenant tables on both sides, the residency row, deleting leftovers of an "
        "interrupted copy, the three COPY streams in one target transaction, its commit. "
        "The psql time is three `psql | psql` pipelines, each starting two processes and "
        "two connections, each table committed on its own.",
        "- CPU is counted from the copy step's start to its end, after its backends have "
        "ended (the mover waits for that at its `verified` checkpoint; the wait is taken "
        "out of the move, step and freeze times). Both servers' processes are counted, "
        "so the COPY out, the COPY in and its foreign-key checks are all in.",
        "- Both write into the same tables (primary keys, foreign keys checked row by row, "
        "an index), emptied of the tenant and vacuumed before each measurement.",
        "- Writes are frozen from the freeze's commit to the switch: the wait for older "
        "transactions, the copy, verification (counts and checksums on both sides) and the "
        "switch. Reads go on throughout; cleanup of the source happens after the switch.",
        f"- Loading the data (server-side `generate_series`) took {data['load_s']:.1f} s; "
        f"the whole run {data['duration_s']} s. Load average at the start "
        f"{data['machine']['load_average']}, at the end {data['load_average_end']}.",
        "",
        "## Machine",
        "",
        machine_markdown(data["machine"]),
    ]
    return "\n".join(lines)


_STEPS = ("plan", "frozen", "copied", "verified", "switched", "cleaned")


def _cpu(entry: dict[str, Any]) -> str:
    if entry["server_cpu_s"] is None:
        return "n/a"
    return f"{entry['client_cpu_s'] + entry['server_cpu_s']:.1f}"


def cpu_lines(summary: dict[str, Any]) -> list[str]:
    """CPU seconds of the copy: steadier than wall time on a machine others share."""
    if summary["cpu_ratio"] is None:
        return ["(CPU time not measured: the servers are not local.)", ""]
    rows = []
    for name, label in (("tenantry", "tenantry move (copy step)"), ("psql", "`psql \\| psql`")):
        m = summary[name]
        rows.append(
            [
                label,
                f"{m['client_cpu_s']:.2f}",
                f"{m['server_cpu_s']:.2f}",
                f"{m['client_cpu_s'] + m['server_cpu_s']:.2f}",
            ]
        )
    return [
        f"CPU seconds of the copy (median; client: the mover's process or the psql "
        f"processes; servers: every process of both): psql / tenantry = "
        f"**{summary['cpu_ratio']:.3f}**.",
        "",
        markdown_table(["method", "client CPU s", "servers CPU s", "total CPU s"], rows),
        "",
    ]


def print_summary(data: dict[str, Any]) -> None:
    s = data["summary"]
    for name in ("tenantry", "psql"):
        m = s[name]
        console.print(
            f"{name:>9}: copy {m['copy_s']:.2f} s, {m['rows_per_s']:,.0f} rows/s, "
            f"{m['mb_per_s']:.1f} MB/s"
        )
    if s["cpu_ratio"] is not None:
        console.print(f"      CPU: psql / tenantry {s['cpu_ratio']:.3f}")
    r = s["ratio"]
    console.print(
        f"    ratio: {r['median']:.3f} (rounds {r['min']:.3f}-{r['max']:.3f}); "
        f"target {TARGET_RATIO} {r['target_verdict']}, aim {AIM_RATIO} {r['aim_verdict']}"
    )
    moved = s["tenantry"]
    console.print(f"    move: {moved['move_s']:.2f} s, writes frozen {moved['freeze_s']:.2f} s")
    console.print(
        f"10k rows: move {s['small']['move_s']:.3f} s, copy {s['small']['copy_s']:.3f} s, "
        f"frozen {s['small']['freeze_s']:.3f} s"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tenantry move against psql | psql.")
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 2 rounds")
    parser.add_argument("--rows", type=int, help="rows of the big tenant (default 1,000,000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 4; 2 with --quick)")
    parser.add_argument("--small-moves", type=int, help="moves of the 10k tenant (default 10)")
    add_server_options(parser, default="start two throwaway ones")
    args = parser.parse_args(argv)
    if args.rows is not None and args.rows < 1000:
        parser.error("--rows must be at least 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = timed(run, args)
    finish(NAME, data, render_markdown(data), args.out, print_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
