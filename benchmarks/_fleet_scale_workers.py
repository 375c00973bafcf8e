"""fleet_scale.py's router processes (a module of their own: ``multiprocessing`` spawns
them and imports this, not the script): the load of question 3 and the map watchers of
question 4, and the one routed transaction every question runs.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa

from tenantry import Router, load_settings

#: The table every shard has (from the template), under row-level security.
TABLE = "fleet_items"
QUERY = sa.text(f"SELECT n FROM {TABLE} WHERE tenant_id = :t AND id = :i")


def one(router: Router, tenant: str, row: int) -> None:
    """One routed transaction: one point select, rolled back (the session closed)."""
    with router.session(tenant) as session:
        session.execute(QUERY, {"t": tenant, "i": row}).first()


def load_process(
    catalog_url: str,
    settings: dict[str, Any],
    tenants: list[str],
    threads: int,
    window_s: float,
    seed: int,
    barrier: Any,
    results: Any,
) -> None:
    """Question 3: a Router of its own (default settings unless *settings*), then
    *threads* threads routing 1-select transactions to uniformly chosen *tenants* for
    *window_s* seconds; failures are counted by their message, not raised."""
    router = Router(settings=load_settings(catalog_url=catalog_url, **settings))
    try:
        barrier.wait()
        deadline = time.monotonic() + window_s
        errors: Counter[str] = Counter()
        lock = threading.Lock()

        def worker(n: int) -> list[int]:
            rng = random.Random(seed * 100 + n)
            out = []
            while time.monotonic() < deadline:
                t0 = time.perf_counter_ns()
                try:
                    one(router, rng.choice(tenants), rng.randint(1, 10))
                except Exception as exc:  # counted: the question is how many fail
                    text = str(exc).splitlines()[0] if str(exc) else ""
                    with lock:
                        errors[f"{type(exc).__name__}: {text[:200]}"] += 1
                    continue
                out.append(time.perf_counter_ns() - t0)
            return out

        with ThreadPoolExecutor(threads) as pool:
            latencies = [x for part in pool.map(worker, range(threads)) for x in part]
        results.put(
            {
                "latencies_ns": latencies,
                "errors": dict(errors),
                "engine_stats": asdict(router.engine_stats()),
            }
        )
    except BaseException as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        router.close()


def watch_process(catalog_url: str, barrier: Any, stop: Any, results: Any) -> None:
    """Question 4: a Router with its background refresh (LISTEN) and no traffic; a thread
    notes the wall time at which each new map version arrives; the process's CPU time
    from the start of the writer to its end is reported with them."""
    router = Router(settings=load_settings(catalog_url=catalog_url))
    try:
        seen: list[tuple[int, float]] = []
        done = threading.Event()

        def watch() -> None:
            version = router.snapshot.version
            while not done.is_set():
                if router.wait_for_version(version + 1, timeout=0.2):
                    version = router.snapshot.version
                    seen.append((version, time.time()))

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        barrier.wait()
        cpu0 = time.process_time()
        stop.wait()
        cpu = time.process_time() - cpu0
        done.set()
        thread.join()
        results.put({"seen": seen, "cpu_s": cpu, "start_version": seen[0][0] if seen else None})
    except BaseException as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        router.close()
