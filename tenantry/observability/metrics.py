"""tenantry's Prometheus metrics (``prometheus_client``; the ``observability`` extra).

One :class:`Metrics` holds every metric of a process in one registry: the routers'
transactions and map, their engines and connections (read when scraped, from every
router attached), the busiest tenants (:class:`~tenantry.observability.topn.TopTenants`,
only the top N exposed), moves and fleet migrations. :func:`default_metrics` is the one
on ``prometheus_client``'s default registry, which routers, movers and migrations use
when the ``metrics`` setting is on. This module is imported only when metrics are.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tenantry.observability.topn import TopTenants
from tenantry.settings import TenantrySettings

__all__ = ["OUTCOMES", "Metrics", "RouterGauges", "default_metrics"]

#: The outcomes of ``tenantry_routed_transactions_total``.
OUTCOMES = (
    "ok",
    "stale_route_retry",
    "frozen",
    "shard_unavailable",
    "cross_tenant_refused",
    "error",
)

#: Routed transactions: from half a millisecond to ten seconds.
TRANSACTION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Map refreshes: one catalog statement, or a whole map of 100,000 tenants.
REFRESH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Freezes and migrations: tens of milliseconds to minutes.
LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


@dataclass(frozen=True, slots=True)
class RouterGauges:
    """What one router reports when scraped: its map version and how changes reach
    it, its engines, and per server its open connections, its share of the server
    (the budget) and how many connections waited for room."""

    map_version: int
    map_mode: str
    engines_open: int
    engines_evicted: int
    connections: dict[str, int]
    budgets: dict[str, int]
    waits: dict[str, int]


class Metrics:
    """Every tenantry metric of a process, in *registry* (``prometheus_client``'s
    default one when not given). Make one per registry: the names are fixed.

    *top_tenants* bounds the per-tenant series (0: none); the tenants' scores halve
    every *tenant_half_life* seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        top_tenants: int = 100,
        tenant_half_life: float = 60.0,
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        r = self.registry
        self.transactions = Counter(
            "tenantry_routed_transactions",
            "Routed transactions by shard and outcome (each attempt: a stale route's "
            "refused attempt counts apart from its retry)",
            ["shard", "outcome"],
            registry=r,
        )
        self.transaction_seconds = Histogram(
            "tenantry_routed_transaction_seconds",
            "Routed transactions that began, from the router's call to the end of the block",
            ["shard"],
            buckets=TRANSACTION_BUCKETS,
            registry=r,
        )
        self.map_refresh_seconds = Histogram(
            "tenantry_map_refresh_seconds",
            "Map refreshes: reading the catalog's changes and applying them",
            buckets=REFRESH_BUCKETS,
            registry=r,
        )
        self.move_steps = Counter(
            "tenantry_move_steps",
            "Move states entered by movers of this process, by kind (move, promote, "
            "demote) and state (done: finished; aborted: rolled back)",
            ["kind", "state"],
            registry=r,
        )
        self.moves_in_flight = Gauge(
            "tenantry_moves_in_flight", "Moves being run by this process now", registry=r
        )
        self.move_rows = Counter(
            "tenantry_move_rows_copied", "Rows copied to a move's target", registry=r
        )
        self.move_bytes = Counter(
            "tenantry_move_bytes_copied",
            "Bytes copied by COPY to a move's target (offline copies)",
            registry=r,
        )
        self.move_rate = Gauge(
            "tenantry_move_copy_rows_per_second",
            "Rows per second of the latest move copy of this process",
            registry=r,
        )
        self.move_lag = Gauge(
            "tenantry_move_replication_lag_bytes",
            "How far an online move's subscription trails its source (bytes of WAL)",
            ["move"],
            registry=r,
        )
        self.freeze_seconds = Histogram(
            "tenantry_move_freeze_seconds",
            "How long moves kept a tenant frozen (an online move's cut and final freeze "
            "each; an offline move's whole freeze)",
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.migrations = Counter(
            "tenantry_migrations",
            "Databases a fleet migration ran on, by result",
            ["result"],
            registry=r,
        )
        self.migration_seconds = Histogram(
            "tenantry_migration_seconds",
            "Seconds one database's fleet migration took",
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.tenants = TopTenants(top_tenants, half_life=tenant_half_life)
        self._lock = threading.Lock()
        self._routers: weakref.WeakKeyDictionary[object, Callable[[], RouterGauges]] = (
            weakref.WeakKeyDictionary()
        )
        # Counts of routers detached, so the counters never go back.
        self._evicted_before = 0
        self._waits_before: defaultdict[str, int] = defaultdict(int)
        # Children per label values, made once (``labels()`` costs a lookup under a lock).
        self._outcome_children: dict[tuple[str, str], Any] = {}
        self._seconds_children: dict[str, Any] = {}
        r.register(_RouterCollector(self))
        r.register(_TenantCollector(self))

    # -- routers --------------------------------------------------------------------------

    def attach(self, owner: object, gauges: Callable[[], RouterGauges]) -> None:
        """Report *owner*'s gauges (read by *gauges* when scraped) until it is
        detached or collected."""
        with self._lock:
            self._routers[owner] = gauges

    def detach(self, owner: object) -> None:
        """Stop reporting *owner*; its counters' last values stay in the totals."""
        with self._lock:
            gauges = self._routers.pop(owner, None)
            if gauges is None:
                return
            last = gauges()
            self._evicted_before += last.engines_evicted
            for server, waits in last.waits.items():
                self._waits_before[server] += waits

    def router_gauges(self) -> list[RouterGauges]:
        """The gauges of every router attached, read now."""
        with self._lock:
            sources = list(self._routers.values())
        return [gauges() for gauges in sources]

    def counted(self, shard: str, outcome: str) -> None:
        """One routed transaction (or attempt) on *shard* ended with *outcome*."""
        child = self._outcome_children.get((shard, outcome))
        if child is None:
            child = self._outcome_children.setdefault(
                (shard, outcome), self.transactions.labels(shard, outcome)
            )
        child.inc()

    def finished(self, tenant: str, shard: str, outcome: str, seconds: float) -> None:
        """A routed transaction that began on *shard* for *tenant* ended."""
        self.counted(shard, outcome)
        child = self._seconds_children.get(shard)
        if child is None:
            child = self._seconds_children.setdefault(shard, self.transaction_seconds.labels(shard))
        child.observe(seconds)
        self.tenants.record(tenant, shard, seconds)

    def base_counts(self) -> tuple[int, dict[str, int]]:
        """Evictions and waits per server of the routers detached."""
        with self._lock:
            return self._evicted_before, dict(self._waits_before)


class _RouterCollector(Collector):
    """The routers' gauges, and their engine and connection counters, read when scraped.

    With several routers in a process: the lowest map version (the stalest map), the
    number of routers in each map mode, and sums of the rest.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._metrics.router_gauges()))

    def _families(self, routers: list[RouterGauges] | None) -> Iterator[Metric]:
        version = GaugeMetricFamily(
            "tenantry_map_version", "Map version a router routes by (lowest of the process)"
        )
        mode = GaugeMetricFamily(
            "tenantry_map_mode",
            "How map changes reach the routers: 1 (one per router) for the current mode",
            labels=["mode"],
        )
        engines = GaugeMetricFamily("tenantry_engines_open", "Engines open (one per database)")
        evicted = CounterMetricFamily(
            "tenantry_engines_evicted",
            "Engines disposed to make room (TENANTRY_MAX_ENGINES, or idle connections "
            "closed for the connection budget)",
        )
        in_use = GaugeMetricFamily(
            "tenantry_connections_in_use",
            "Connections open to a server (in use or idle in a pool), counted against the budget",
            labels=["server"],
        )
        budget = GaugeMetricFamily(
            "tenantry_connections_budget",
            "Connections the routers may open to a server (their share of "
            "max_connections; TENANTRY_CONNECTION_BUDGET where no share applies)",
            labels=["server"],
        )
        waits = CounterMetricFamily(
            "tenantry_connection_waits",
            "Connections that waited for room under the budget",
            labels=["server"],
        )
        if routers is not None:
            evicted_before, waits_before = self._metrics.base_counts()
            if routers:
                version.add_metric([], min(g.map_version for g in routers))
            modes = {"notify": 0, "poll": 0}
            open_by: defaultdict[str, int] = defaultdict(int)
            budget_by: defaultdict[str, int] = defaultdict(int)
            waits_by: defaultdict[str, int] = defaultdict(int, waits_before)
            for g in routers:
                modes[g.map_mode] = modes.get(g.map_mode, 0) + 1
                for server, count in g.connections.items():
                    open_by[server] += count
                for server, share in g.budgets.items():
                    budget_by[server] += share
                for server, count in g.waits.items():
                    waits_by[server] += count
            for name, count in sorted(modes.items()):
                mode.add_metric([name], count)
            engines.add_metric([], sum(g.engines_open for g in routers))
            evicted.add_metric([], evicted_before + sum(g.engines_evicted for g in routers))
            for server in sorted(open_by.keys() | budget_by.keys()):
                in_use.add_metric([server], open_by.get(server, 0))
                budget.add_metric([server], budget_by.get(server, 0))
            for server, count in sorted(waits_by.items()):
                waits.add_metric([server], count)
        yield from (version, mode, engines, evicted, in_use, budget, waits)


class _TenantCollector(Collector):
    """The busiest tenants only: at most ``top_tenants`` series per metric."""

    def __init__(self, metrics: Metrics) -> None:
        self._tenants = metrics.tenants

    def describe(self) -> Iterable[Metric]:
        return list(self._families(False))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(True))

    def _families(self, read: bool) -> Iterator[Metric]:
        labels = ["tenant", "shard"]
        count = CounterMetricFamily(
            "tenantry_tenant_transactions",
            "Routed transactions of a busiest tenant, since it joined the top",
            labels=labels,
        )
        seconds = CounterMetricFamily(
            "tenantry_tenant_transaction_seconds",
            "Seconds in routed transactions of a busiest tenant, since it joined the top",
            labels=labels,
        )
        score = GaugeMetricFamily(
            "tenantry_tenant_score",
            "A busiest tenant's transactions, decayed (halved every half-life)",
            labels=labels,
        )
        if read:
            for load in self._tenants.busiest():
                values = [load.tenant, load.shard]
                count.add_metric(values, load.transactions)
                seconds.add_metric(values, load.seconds)
                score.add_metric(values, load.score)
        yield from (count, seconds, score)


_DEFAULT: list[Metrics] = []  # the process's one Metrics on the default registry
_DEFAULT_LOCK = threading.Lock()


def default_metrics(settings: TenantrySettings | None = None) -> Metrics:
    """The process's :class:`Metrics` on ``prometheus_client``'s default registry, made
    the first time with *settings*' ``metrics_top_tenants`` and
    ``metrics_tenant_half_life``. (A Prometheus registry is process-wide: so is this.)
    """
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            top, half_life = 100, 60.0
            if settings is not None:
                top, half_life = settings.metrics_top_tenants, settings.metrics_tenant_half_life
            _DEFAULT.append(Metrics(top_tenants=top, tenant_half_life=half_life))
        return _DEFAULT[0]
