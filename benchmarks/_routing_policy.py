"""routing_overhead.py's policy costs: what each row-level-security policy costs per
statement, timed from the client and inside the server.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    percentile,
    progress,
    summarize,
)
from _routing_fleet import (
    BIG_TENANT,
    LEGACY_FENCE,
    SHARD_NAME,
    STATEMENTS,
    Config,
    Fleet,
)
from _routing_measure import (
    DRIVER_SELECT,
    Samples,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry.shardmap.drivers import make_engine

# -- what a policy costs per statement ------------------------------------------------

POLICY_SQL = {
    "point": DRIVER_SELECT,
    "scan": "SELECT tenant_id, id, charger, kwh FROM {table} WHERE tenant_id = %(t)s",
}
#: variant -> (connection, table); "routed" is one routed transaction of the big tenant
#: (after its signed fence), "operations" the operations role (a superuser: no policy).
POLICY_VARIANTS = {
    "signed": ("routed", "bench_readings"),
    "classic": ("routed", "bench_readings_classic"),
    "none": ("routed", "bench_readings_open"),
    "none, operations role": ("operations", "bench_readings"),
}
POLICY_LABELS = {
    "signed": "signed policy, (SELECT tenantry.tenant())",
    "classic": "classic policy, current_setting(...)",
    "none": "no policy (RLS off), routing role",
    "none, operations role": "signed table as the operations role (bypasses RLS)",
}
#: (a, b): what a costs more than b
POLICY_COMPARISONS = (
    ("signed", "none"),
    ("classic", "none"),
    ("signed", "classic"),
    ("none, operations role", "none"),
)


#: The same statements run *n* times in a loop inside the server (a DO block as the
#: connection's role): the per-statement cost without the client, the wire and the
#: scheduler's wake-ups, which dominate on a loaded machine. Timed twice: the server's
#: wall clock (clock_timestamp()) and, when the server runs on this machine, the
#: backend process's CPU time (/proc/<pid>/schedstat), which other work on the machine
#: does not stretch (or much less: caches and hyperthreads are shared).
SERVER_LOOP = """DO $bench$
DECLARE
  t0 timestamptz := clock_timestamp();
  x text;
BEGIN
  FOR i IN 1..{n} LOOP
    {body};
  END LOOP;
  PERFORM set_config('bench.elapsed_us',
    (extract(epoch FROM clock_timestamp() - t0) * 1000000)::text, true);
END
$bench$"""
SERVER_LOOP_N = {"point": 500, "scan": 20, "function": 500}
LEGACY_TENANT = "l00000"
#: The policies' functions alone (and the classic policy's setting), and the two
#: fences, n calls: name -> (connection, loop body). The signed fence is given a valid
#: signature for the connection's backend ({sig}); the old fence runs on the legacy
#: shard (whose routing role may read the residency), for one of its tenants.
POLICY_FUNCTIONS = {
    "tenantry.tenant()": ("routed", "x := tenantry.tenant()"),
    "tenantry.writable_tenant()": ("routed", "x := tenantry.writable_tenant()"),
    "current_setting(...)": ("routed", "x := current_setting('tenantry.tenant_id', true)"),
    "signed fence": ("routed", f"x := tenantry.fence('{BIG_TENANT}', '{{sig}}')"),
    "old fence": (
        "legacy",
        "PERFORM " + LEGACY_FENCE.removeprefix("SELECT ").replace("%(t)s", f"'{LEGACY_TENANT}'"),
    ),
    # the loop and the DO block's own start: the net figures are above it
    "(empty loop)": ("routed", "x := 'x'"),
}


def server_loop_sql(kind: str, target: str, rows: int) -> str:
    """The loop of *kind* (point, scan: *target* is a table; function: the body)."""
    if kind == "function":
        body = target
    else:
        body = f"PERFORM tenant_id, id, charger, kwh FROM {target} WHERE tenant_id = '{BIG_TENANT}'"
        if kind == "point":
            body += f" AND id = 1 + i % {rows}"
    return SERVER_LOOP.format(n=SERVER_LOOP_N[kind], body=body)


def backend_cpu(conn: Any, local: bool) -> Callable[[], int] | None:
    """A function reading the CPU time (ns) of *conn*'s server process, if the server
    runs on this machine (else None)."""
    if not local:
        return None
    path = Path(f"/proc/{conn.info.backend_pid}/schedstat")
    try:
        cmdline = Path(f"/proc/{conn.info.backend_pid}/cmdline").read_bytes()
        int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if b"postgres" not in cmdline:
        return None

    def read() -> int:
        return int(path.read_text().split()[0])

    return read


def is_local(url: str) -> bool:
    host = make_url(url).host
    return host in (None, "", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def measure_policy(fleet: Fleet, cfg: Config, seed: int) -> dict[str, Any]:
    """The policies' cost per statement: a point select by (tenant_id, id) and a scan of
    the big tenant's rows, on each table, all in one routed transaction of the big
    tenant (its fence ran first), and as the operations role. From the client: every
    statement of every variant in a fresh random order, ``policy_iterations`` times per
    transaction; in the server: each in a loop (:data:`SERVER_LOOP`), and the policies'
    functions alone, 2 passes per transaction, in a fresh random order."""
    rng = random.Random(seed)
    ops_engine = make_engine(fleet.shard.operations_url, poolclass=NullPool)
    local = is_local(fleet.shard.url)
    samples: dict[tuple[str, str], Samples] = defaultdict(Samples)
    # µs per statement: {"wall": ..., "cpu": ... or None}
    server: dict[tuple[str, str], list[dict[str, float | None]]] = defaultdict(list)
    expected = {"point": 1, "scan": cfg.big_rows}
    clock = time.perf_counter_ns
    legacy_engine = make_engine(fleet.legacy_shard.url, poolclass=NullPool)
    key = fleet.catalog.fence_key(SHARD_NAME)
    ops_record = ops_engine.raw_connection()
    legacy_record = legacy_engine.raw_connection()
    try:
        ops: Any = ops_record.driver_connection
        legacy: Any = legacy_record.driver_connection
        with progress() as bar:
            task = bar.add_task("policy statements", total=cfg.policy_rounds)
            for _round in range(cfg.policy_rounds):
                gc.collect()
                with fleet.router.session(BIG_TENANT) as session:
                    routed: Any = session.connection().connection.driver_connection
                    conns = {"routed": routed, "operations": ops, "legacy": legacy}
                    signature = key.sign(BIG_TENANT, routed.info.backend_pid)
                    cpus = {name: backend_cpu(c, local) for name, c in conns.items()}
                    cases = [
                        (kind, name, conns[where], sql.format(table=table))
                        for kind, sql in POLICY_SQL.items()
                        for name, (where, table) in POLICY_VARIANTS.items()
                    ]
                    taken: dict[tuple[str, str], list[int]] = defaultdict(list)
                    for iteration in range(cfg.policy_warmup + cfg.policy_iterations):
                        rng.shuffle(cases)
                        for kind, name, conn, sql in cases:
                            params: dict[str, Any] = {"t": BIG_TENANT}
                            if kind == "point":
                                params["i"] = rng.randint(1, cfg.big_rows)
                            start = clock()
                            rows = conn.execute(sql, params).fetchall()
                            elapsed = clock() - start
                            if len(rows) != expected[kind]:
                                raise RuntimeError(
                                    f"policy cost, {kind} on {name}: {len(rows)} rows, "
                                    f"expected {expected[kind]}"
                                )
                            if iteration >= cfg.policy_warmup:
                                taken[kind, name].append(elapsed)
                    loops = [
                        (kind, name, where, server_loop_sql(kind, table, cfg.big_rows))
                        for kind in POLICY_SQL
                        for name, (where, table) in POLICY_VARIANTS.items()
                    ] + [
                        (
                            "function",
                            name,
                            where,
                            server_loop_sql("function", body.replace("{sig}", signature), 0),
                        )
                        for name, (where, body) in POLICY_FUNCTIONS.items()
                    ]
                    for _pass in range(2):
                        rng.shuffle(loops)
                        for kind, name, where, sql in loops:
                            conn, cpu = conns[where], cpus[where]
                            before = cpu() if cpu else 0
                            conn.execute(sql)
                            after = cpu() if cpu else 0
                            row = conn.execute("SELECT current_setting('bench.elapsed_us')")
                            n = SERVER_LOOP_N[kind]
                            server[kind, name].append(
                                {
                                    "wall": float(row.fetchone()[0]) / n,
                                    "cpu": (after - before) / n / 1_000 if cpu else None,
                                }
                            )
                ops.rollback()
                legacy.rollback()
                for k, values in taken.items():
                    samples[k].rounds.append(values)
                bar.advance(task)
    finally:
        ops_record.close()
        legacy_record.close()
        ops_engine.dispose()
        legacy_engine.dispose()
    return policy_summary(samples, server, cfg)


def _median_spread(values: Sequence[float]) -> dict[str, float]:
    return summarize(values, stats=("median", "p25", "p75", "min", "max"))


def policy_summary(
    samples: dict[tuple[str, str], Samples],
    server: dict[tuple[str, str], list[dict[str, float | None]]],
    cfg: Config,
) -> dict[str, Any]:
    basis = "cpu" if all(x["cpu"] is not None for v in server.values() for x in v) else "wall"

    def timed(key: tuple[str, str], what: str = basis) -> list[float]:
        return [float(x[what] or 0.0) for x in server[key]]

    out: dict[str, Any] = {
        "tenant_rows": cfg.big_rows,
        "server_loop_n": SERVER_LOOP_N,
        "server_basis": basis,
        "functions": {
            name: {
                "wall_us": _median_spread(timed(("function", name), "wall")),
                **({"cpu_us": _median_spread(timed(("function", name)))} if basis == "cpu" else {}),
            }
            for name in POLICY_FUNCTIONS
        },
        "statements": [],
    }
    for kind in POLICY_SQL:
        entry: dict[str, Any] = {
            "statement": kind,
            "us": {
                name: summarize(samples[kind, name].latencies, scale=1_000)
                for name in POLICY_VARIANTS
            },
            "server_wall_us": {
                name: _median_spread(timed((kind, name), "wall")) for name in POLICY_VARIANTS
            },
            "compare": [],
        }
        if basis == "cpu":
            entry["server_cpu_us"] = {
                name: _median_spread(timed((kind, name))) for name in POLICY_VARIANTS
            }
        for a, b in POLICY_COMPARISONS:
            first, second = samples[kind, a], samples[kind, b]
            pa, pb = percentile(first.latencies, 50), percentile(second.latencies, 50)
            diffs, ratios = [], []
            blocks = zip(first.blocks(cfg.blocks), second.blocks(cfg.blocks), strict=True)
            for xa, xb in blocks:
                qa, qb = percentile(xa, 50), percentile(xb, 50)
                diffs.append((qa - qb) / 1_000)
                ratios.append(qa / qb)
            # The same iteration of the same transaction: a pair close in time.
            paired = [
                (x - y) / 1_000
                for ra, rb in zip(first.rounds, second.rounds, strict=True)
                for x, y in zip(ra, rb, strict=True)
            ]
            # In the server: the loops of the same pass.
            server_a, server_b = timed((kind, a)), timed((kind, b))
            server_paired = [x - y for x, y in zip(server_a, server_b, strict=True)]
            entry["compare"].append(
                {
                    "a": a,
                    "b": b,
                    "diff_p50_us": (pa - pb) / 1_000,
                    "ratio_p50": pa / pb,
                    "blocks_diff_us": {
                        "median": statistics.median(diffs),
                        "min": min(diffs),
                        "max": max(diffs),
                    },
                    "blocks_ratio": {
                        "median": statistics.median(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                    },
                    "paired_diff_us": _median_spread(paired),
                    "server_diff_us": _median_spread(server_paired),
                    "server_ratio": percentile(server_a, 50) / percentile(server_b, 50),
                }
            )
        out["statements"].append(entry)
    # What the signed fence adds to a routed transaction's server time, from the loops:
    # its fence over the old one, and each point select's signed policy over the classic.
    fence = [
        x - y
        for x, y in zip(
            timed(("function", "signed fence")), timed(("function", "old fence")), strict=True
        )
    ]
    per_select = next(
        c["server_diff_us"]["median"]
        for c in out["statements"][0]["compare"]
        if (c["a"], c["b"]) == ("signed", "classic")
    )
    out["server_model"] = {
        "fence_extra_us": percentile(fence, 50),
        "per_select_extra_us": per_select,
        "transaction_extra_us": {
            str(n): percentile(fence, 50) + n * per_select for n in STATEMENTS
        },
    }
    return out
