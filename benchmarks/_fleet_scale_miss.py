"""fleet_scale.py's part 0: what a *miss* costs — a routed transaction to a database that
has no open connection in the router — broken down, on the fleet the script built.

Measured one connection at a time (nothing else running on the fleet), so the wall
times are latencies without queueing; CPU is measured where it is spent:

- the client: this thread's CPU (``time.thread_time``) around each step;
- the server backend: ``/proc/<backend pid>/schedstat`` (its CPU since the fork) read
  before and after each step — the PostgreSQL server runs on this machine;
- the postmaster (its fork per connection): its own ``schedstat``;
- the backend's exit (it runs after the client has gone): the postmaster's reaped
  children's CPU (``cutime + cstime`` of ``/proc/<postmaster>/stat``, clock ticks)
  over a batch, less the backends' CPU read just before they were closed.

Steps, with psycopg directly (as the routing role, over TCP like the router):

1. ``connect``: TCP connect, fork, authentication, backend start;
2. ``stamp``: the router's connect event's statement (``OPEN_SESSION``) committed by
   itself (autocommit: one round trip): ``tenantry.open_session(false)`` makes the
   stamp, unless ``tenantry.tenant()`` is a constant (a database tenantry marked
   dedicated, shard revision s0007), where nothing else runs;
3. ``first tx`` on the fresh backend: BEGIN and the signed fence in one message, the
   point select, ROLLBACK (as the router sends them); then ``warm tx``: the same again;
4. ``close``; the backend's exit after these steps (with a stamp, its temporary
   namespace dropped) and that of a connection only opened and closed (a batch of plain
   connect/close).

Steps 1-4 run over databases no router has used, then again over the same ones: the
first stamp in a database for a backend slot (``pg_temp_<slot>``) creates that
temporary namespace, a later one reuses it. The same steps measure either design:
which one runs is the database's (``fleet_scale.py --compare-stamp`` runs both).

Then the router: a miss through ``router.session`` (engine kept, its connections
closed: the lone router's case), a hit, and a new engine's first transaction; client
CPU and wall; a profile of the misses by function.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from _procfs import schedstat_ns

from tenantry import Router, load_settings
from tenantry.router.router import OPEN_SESSION
from tenantry.shardmap.catalog import Catalog

TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")
QUERY = "SELECT n FROM fleet_items WHERE tenant_id = %s AND id = 1"


def _reaped_ns(pid: int) -> float:
    """CPU of *pid*'s children that it has waited for (cutime + cstime), in ns."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) * TICK_NS  # fields 16, 17 of stat(5)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class _Step:
    """Wall, client CPU and server CPU of one step, accumulated over connections."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.client: list[float] = []
        self.server: list[float] = []

    def add(self, wall: float, client: float, server: float) -> None:
        self.wall.append(wall)
        self.client.append(client)
        self.server.append(server)

    def record(self) -> dict[str, float]:
        def med(xs: list[float]) -> float:
            ys = sorted(xs)
            return ys[len(ys) // 2] / 1e6 if ys else float("nan")

        return {"wall_ms": med(self.wall), "client_ms": med(self.client),
                "server_ms": med(self.server), "n": len(self.wall)}  # fmt: skip


def _timed(step: _Step, backend: int | None, fn: Callable[[], Any]) -> Any:
    s0 = schedstat_ns(backend) if backend else 0
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    out = fn()
    w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
    s1 = schedstat_ns(backend) if backend else 0
    step.add(w1 - w0, c1 - c0, s1 - s0)
    return out


def raw_steps(
    catalog_url: str,
    shards: Sequence[tuple[str, str, str]],
    *,
    stamp: bool = True,
) -> dict[str, Any]:
    """Steps 1-4 over *shards* ((tenant, shard name, routing conninfo)), one at a time.
    Without *stamp* only connect and close run."""
    catalog = Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url))
    try:
        keys = catalog.fence_keys()
    finally:
        catalog.close()
    steps = {name: _Step() for name in ("connect", "stamp", "first tx", "warm tx", "close")}
    postmaster = None
    fork_ns = reaped = before_close = 0.0
    for tenant, shard, url in shards:
        conn = _timed(steps["connect"], None, lambda url=url: psycopg.connect(url))
        pid = conn.info.backend_pid
        if postmaster is None:
            postmaster = _ppid(pid)
            fork0, reaped0 = schedstat_ns(postmaster), _reaped_ns(postmaster)
        # the backend's CPU from its fork to now: start-up and authentication
        steps["connect"].server[-1] = schedstat_ns(pid)

        def open_session(conn: psycopg.Connection[Any] = conn) -> None:
            conn.autocommit = True  # one statement, committed by itself, as the router
            conn.execute(OPEN_SESSION[False])
            conn.autocommit = False

        if stamp:
            _timed(steps["stamp"], pid, open_session)
        signature = keys[shard].sign(tenant, pid)
        fence = (
            "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT tenantry.fence("
            f"'{tenant}', '{signature}')"
        )

        def tx(conn: psycopg.Connection[Any] = conn, fence: str = fence, t: str = tenant) -> None:
            conn.pgconn.exec_(fence.encode())
            conn.execute(QUERY, (t,)).fetchone()  # psycopg: in the transaction BEGIN opened
            conn.rollback()

        conn.autocommit = True  # the fence's BEGIN opens the transaction, as the router's
        if stamp:
            _timed(steps["first tx"], pid, tx)
            _timed(steps["warm tx"], pid, tx)
        before_close += schedstat_ns(pid)
        _timed(steps["close"], None, conn.close)
    assert postmaster is not None
    time.sleep(0.5)  # the last backends exit and are reaped
    fork_ns = schedstat_ns(postmaster) - fork0
    reaped = _reaped_ns(postmaster) - reaped0
    n = len(shards)
    out = {name: step.record() for name, step in steps.items() if step.wall}
    out["postmaster_fork_ms"] = fork_ns / n / 1e6
    # what the backends cost after the client closed them: their exit (the first
    # backend's CPU before it was counted in reaped0 is in neither)
    out["backend_exit_ms"] = max(0.0, (reaped - before_close) / n / 1e6)
    out["backend_total_ms"] = reaped / n / 1e6
    return out


def router_misses(
    catalog_url: str,
    tenants: Sequence[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """A router's transactions to *tenants*, one at a time: a new engine's first
    (``new engine``), a hit (``hit``), and a miss whose engine is kept but has no
    connection (``miss``, after the engine's pool was emptied: the lone router's case);
    the misses profiled."""
    from _fleet_scale_workers import one

    router = Router(settings=load_settings(catalog_url=catalog_url, **settings))
    steps = {name: _Step() for name in ("new engine", "hit", "miss", "dispose")}
    profile = cProfile.Profile(time.thread_time)  # CPU, not wall: waits are not in it
    try:
        one(router, tenants[0], 1)  # the catalog's keys, the dialect of the server
        for t in tenants[1:]:
            _timed(steps["new engine"], None, lambda t=t: one(router, t, 1))
        for t in tenants[1:]:
            _timed(steps["hit"], None, lambda t=t: one(router, t, 1))
        for t in tenants[1:]:
            engine = router.engine_for(t)
            _timed(steps["dispose"], None, engine.pool.dispose)  # closes its idle connection
        for t in tenants[1:]:
            _timed(steps["miss"], None, lambda t=t: one(router, t, 1))
        for t in tenants[1:]:  # the profile, apart: it costs CPU of its own
            router.engine_for(t).pool.dispose()
        for t in tenants[1:]:
            profile.enable()
            one(router, t, 1)
            profile.disable()
        stats = router.engine_stats()
    finally:
        router.close()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    out: dict[str, Any] = {name: step.record() for name, step in steps.items()}
    out["dialects_initialized"] = stats.dialects_initialized
    out["profile"] = _trim(text.getvalue())
    return out


def _trim(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:60])


def miss_cost(
    catalog_url: str,
    shards: Sequence[tuple[str, str, str]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Part 0 of fleet_scale.py (see the module's doc): the first half of *shards* raw,
    with and without ``open_session`` and the transactions (the same databases, in
    turn), the second half through a router with *settings*."""
    half = len(shards) // 2
    return {
        "connections": half,
        "raw": raw_steps(catalog_url, shards[:half]),
        "raw_no_stamp": raw_steps(catalog_url, shards[:half], stamp=False),
        # the same databases again: each has a temporary namespace for this backend
        # slot now (made by the first pass), which the stamp then reuses
        "raw_again": raw_steps(catalog_url, shards[:half]),
        "router": router_misses(catalog_url, [t for t, _s, _u in shards[half:]], settings),
    }
