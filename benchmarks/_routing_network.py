"""The routing benchmark's network part: round trips counted on the wire, and what a
real network's round-trip time does to routed, hand-written and bare transactions.

A second fleet is built like the main one, but its shard server is reached through
:class:`_netproxy.Proxy`, which counts the round trips each transaction makes and can
delay every packet. Round trips are counted per route, statement count and ending.
Then the same single-threaded transactions run in interleaved rounds with no added
delay and with each delay asked for (``--rtt``); the round-trip time the proxy
really added is measured with ``SELECT 1`` in autocommit and reported beside the
figures. The *modelled* p50 at a round-trip time is the direct run's p50 plus round
trips x that time: what a transaction costs on a network if nothing else changes.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import psycopg
from _common import percentile, progress
from _netproxy import Proxy, count_round_trips, measured_rtt_ms
from _routing_async import async_transactions
from _routing_fleet import ENDINGS, STATEMENTS, Config, Variant, build_fleet
from _routing_measure import make_work, run_batch, transactions
from sqlalchemy.engine import make_url

from tenantry import AsyncRouter

#: The routes measured through the proxy: tenantry's, the hand-written pattern, none.
NETWORK_ROUTES = ("routed", "setting", "bare")
#: Transactions per variant for counting round trips (after as many to warm up).
COUNT_REPEAT = 40


def _proxied(url: str, port: int) -> str:
    return make_url(url).set(port=port).render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    """A psycopg conninfo for a SQLAlchemy URL (the raw ping connection)."""
    u = make_url(url)
    parts = {"host": u.host, "port": u.port, "user": u.username, "dbname": u.database}
    if u.password:
        parts["password"] = u.password
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None)


def measure_network(
    catalog_server: str,
    shard_server: str,
    cfg: Config,
    seed: int,
    rtts_ms: Sequence[float],
) -> dict[str, Any]:
    """Round trips per transaction and p50 at each added round-trip time."""
    target = make_url(shard_server)
    with ExitStack() as stack:
        proxy = stack.enter_context(Proxy(target.host or "127.0.0.1", target.port or 5432))
        small = replace(cfg, tenants=min(cfg.tenants, 200))
        fleet = build_fleet(catalog_server, _proxied(shard_server, proxy.port), small, stack)
        fns = transactions(fleet)
        rng = random.Random(seed)
        variants = [Variant(r, s, e) for s in STATEMENTS for e in ENDINGS for r in NETWORK_ROUTES]

        def once(variant: Variant, count: int) -> list[int]:
            work = make_work(rng, fleet.tenants, small, count, variant.statements)
            return run_batch(fns[variant.route], work, variant.ending == "commit")[0]

        trips = []
        for v in variants:
            once(v, COUNT_REPEAT)
            per_tx = count_round_trips(proxy, lambda v=v: once(v, 1), COUNT_REPEAT)
            trips.append({**_cell(v), "round_trips": per_tx})

        async_trips = _count_async(fleet, proxy, rng, small)

        ping = psycopg.connect(_libpq(fleet.shard.admin_url), autocommit=True)
        stack.callback(ping.close)
        rounds = max(6, cfg.rounds // 4)
        latency = []
        with progress() as bar:
            task = bar.add_task("network", total=len(rtts_ms) * rounds)
            for rtt in (0.0, *rtts_ms):
                proxy.delay_ms = rtt
                measured = measured_rtt_ms(lambda: ping.execute("SELECT 1"))
                samples: dict[Variant, list[int]] = defaultdict(list)
                plan = list(variants)
                for _round in range(rounds):
                    rng.shuffle(plan)
                    gc.collect()
                    for v in plan:
                        samples[v] += once(v, 10)
                    if rtt:
                        bar.advance(task)
                for v in variants:
                    latency.append(
                        {
                            **_cell(v),
                            "rtt_ms": rtt,
                            "measured_rtt_ms": measured,
                            "p50_us": percentile(samples[v], 50) / 1000,
                            "p99_us": percentile(samples[v], 99) / 1000,
                        }
                    )
            proxy.delay_ms = 0
    return {
        "round_trips": trips,
        "async_round_trips": async_trips,
        "latency": latency,
        "rounds": rounds,
    }


def _count_async(fleet: Any, proxy: Proxy, rng: random.Random, cfg: Config) -> list[dict[str, Any]]:
    """Round trips per transaction of the asyncio routes through *proxy*; ``routed
    (apart)`` is an AsyncRouter with ``fence_with_begin`` off (BEGIN on its own)."""

    async def count() -> list[dict[str, Any]]:
        apart = fleet.settings.model_copy(update={"fence_with_begin": False})
        routers = [
            AsyncRouter(catalog=fleet.catalog, settings=fleet.settings, background=False),
            AsyncRouter(catalog=fleet.catalog, settings=apart, background=False),
        ]
        out = []
        try:
            engine = await routers[0].engine_for(fleet.tenants[0])
            fns = dict(async_transactions(routers[0], engine))
            fns["routed (apart)"] = async_transactions(routers[1], engine)["routed"]
            rows = range(1, cfg.rows_per_tenant + 1)
            for statements in STATEMENTS:
                for ending in ENDINGS:
                    for route, fn in fns.items():

                        async def once(
                            fn: Any = fn, statements: int = statements, ending: str = ending
                        ) -> None:
                            tenant = rng.choice(fleet.tenants)
                            await fn(tenant, rng.sample(rows, statements), ending == "commit")

                        for _ in range(COUNT_REPEAT):
                            await once()
                        before = proxy.round_trips
                        for _ in range(COUNT_REPEAT):
                            await once()
                        per_tx = (proxy.round_trips - before) / COUNT_REPEAT
                        out.append(
                            {
                                "route": route,
                                "statements": statements,
                                "ending": ending,
                                "round_trips": per_tx,
                            }
                        )
        finally:
            for router in routers:
                await router.close()
        return out

    return asyncio.run(count())


def _cell(v: Variant) -> dict[str, Any]:
    return {"route": v.route, "statements": v.statements, "ending": v.ending}
