"""The busiest tenants per shard (``tenantry top``), from what the servers report and,
optionally, what the routers count.

**From the servers.** Every PostgreSQL server of the fleet is read on one connection
of its operations role (shards grouped by server, so 1,000 databases on four servers
cost four connections), several times per window: the active statements of the
fleet's databases in ``pg_stat_activity`` and, at the window's ends, each database's
``xact_commit + xact_rollback`` in ``pg_stat_database``.

- On a **dedicated** shard the database is the tenant: its active statements and its
  transactions per second are the tenant's.
- On a **shared** shard an active statement is the tenant's that its trailing
  sqlcommenter comment names (``/*tenant='acme'*/``, which routers add with statement
  comments on); the rest count as unattributed. The statement's text is read for the
  comment only and never kept or shown.

A tenant's ``active`` is its average number of active statements over the samples
(average active sessions: database time per second of wall time). Sampling sees a
statement only if it is running at a sample, so statements much shorter than the
sampling step are under-counted; transactions per second of a shared tenant come only
from the routers.

**From the routers** (``metrics``): the endpoints' per-tenant counters
(:mod:`tenantry.survey.scrape`) read at the window's ends give each tenant's
transactions per second, the seconds its transactions took per second (``busy``), and
their mean latency, for the tenants the routers keep series of (their busiest).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from tenantry.errors import TenantryError
from tenantry.observability.comments import tenant_of
from tenantry.shardmap.catalog import Catalog, catalog_of
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.operations import operations_engine
from tenantry.survey.scrape import RouterCounters, scrape_routers
from tenantry.survey.status import server_of

__all__ = ["ShardLoad", "TenantLoad", "Top", "TopReport"]

#: What an active statement without a tenant comment on a shared shard counts as.
UNATTRIBUTED = "(unattributed)"

_ACTIVE = sa.text(
    """
    SELECT datname, query FROM pg_stat_activity
     WHERE state = 'active' AND backend_type = 'client backend'
       AND pid <> pg_backend_pid() AND datname = ANY(:names)
    """
)
_XACTS = sa.text(
    """
    SELECT datname, xact_commit + xact_rollback AS xacts FROM pg_stat_database
     WHERE datname = ANY(:names)
    """
)


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant's load on one shard over a window."""

    tenant: str
    #: Average active statements over the samples (database time per second).
    active: float
    #: Transactions per second: the database's (dedicated) or the routers' count.
    transactions_per_second: float | None = None
    #: Seconds of routed transactions per second, from the routers.
    busy: float | None = None
    #: Mean routed transaction time in milliseconds, from the routers.
    latency_ms: float | None = None
    #: Where the figures came from: ``activity``, ``pg_stat_database``, ``routers``.
    sources: tuple[str, ...] = ()

    @property
    def score(self) -> float:
        """What "busiest" sorts by: database time per second, as sampled or counted."""
        return max(self.active, self.busy or 0.0)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "tenant": self.tenant,
            "active": round(self.active, 3),
            "transactions_per_second": _rounded(self.transactions_per_second),
            "busy": _rounded(self.busy),
            "latency_ms": _rounded(self.latency_ms),
            "sources": list(self.sources),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """One shard's load over a window, its busiest tenants first."""

    shard: str
    tier: str
    server: str | None
    reachable: bool
    error: str | None = None
    #: Average active statements on its database.
    active: float = 0.0
    #: Of them, those no tenant could be named for (shared shards).
    unattributed: float = 0.0
    #: The database's transactions per second.
    transactions_per_second: float | None = None
    tenants: tuple[TenantLoad, ...] = ()

    @property
    def score(self) -> float:
        """The shard's load: its active statements, or its tenants' routed time."""
        return max(self.active, sum(t.busy or 0.0 for t in self.tenants))

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "shard": self.shard,
            "tier": self.tier,
            "server": self.server,
            "reachable": self.reachable,
            "error": self.error,
            "active": round(self.active, 3),
            "unattributed": round(self.unattributed, 3),
            "transactions_per_second": _rounded(self.transactions_per_second),
            "tenants": [t.to_record() for t in self.tenants],
        }


@dataclass(frozen=True, slots=True)
class TopReport:
    """One window of ``tenantry top``."""

    seconds: float
    samples: int
    shards: list[ShardLoad]
    #: Endpoints or servers that could not be read, one line each.
    errors: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """``tenantry top --json``."""
        return {
            "seconds": round(self.seconds, 3),
            "samples": self.samples,
            "shards": [s.to_record() for s in self.shards],
            "errors": list(self.errors),
        }


@dataclass
class _Server:
    """One server's connection and the fleet's databases on it."""

    key: str
    shard: Shard  # the shard whose operations URL it connects with
    databases: dict[str, Shard]  # database name -> shard
    conn: Connection | None = None
    error: str | None = None


def _database(shard: Shard) -> str:
    return make_url(shard.operations_url).database or ""


class Top:
    """Samples the fleet's load; :meth:`window` returns one :class:`TopReport`.

    Holds one connection per PostgreSQL server while open (``with Top(...)``, or
    :meth:`close`); a server that cannot be reached is reported in each window and
    tried again in the next."""

    def __init__(
        self,
        target: object,
        *,
        metrics: Sequence[str] = (),
        limit: int = 5,
        timeout: float = 3.0,
        step: float = 0.1,
    ) -> None:
        self.catalog: Catalog = catalog_of(target)
        self.metrics = list(metrics)
        self.limit = limit
        self.timeout = timeout
        self.step = step
        self._stack = ExitStack()
        shards = [s for s, _n in self.catalog.shard_listing().shards]
        self.shards = {s.name: s for s in shards}
        self.dedicated = {
            t.shard: t.id for t in self.catalog.iter_tenants(tier=Tier.DEDICATED) if t.shard
        }
        servers: dict[str, _Server] = {}
        for shard in shards:
            if shard.backend != "postgresql":
                continue
            # One connection per server and operations role: its URL without the database.
            key = make_url(shard.operations_url).set(database="").render_as_string(False)
            server = servers.setdefault(key, _Server(server_of(shard.operations_url), shard, {}))
            server.databases[_database(shard)] = shard
            if shard.tier is Tier.SHARED and server.shard.tier is not Tier.SHARED:
                server.shard = shard  # the fallback connection's database: a shared one
        self._servers = list(servers.values())
        self._xacts: dict[str, float] | None = None
        self._counters: RouterCounters | None = None
        self._since = time.monotonic()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(32, len(self._servers))), thread_name_prefix="tenantry-top"
        )
        self._stack.callback(self._pool.shutdown)

    def __enter__(self) -> Top:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every server connection."""
        self._stack.close()

    # -- reading the servers ------------------------------------------------------------

    def _open(self, shard: Shard) -> Connection:
        engine = self._stack.enter_context(
            operations_engine(
                shard,
                connect_timeout=self.timeout,
                isolation_level="AUTOCOMMIT",
                connect_args={"application_name": "tenantry-top"},
            )
        )
        return self._stack.enter_context(engine.connect())

    def _connect(self, server: _Server) -> Connection | None:
        """The server's connection: to its ``postgres`` database, so that top's own
        queries count in no shard's ``pg_stat_database``; where that is refused, to one
        of its shared shards' databases (whose rate is then a little high)."""
        if server.conn is not None and not server.conn.closed:
            return server.conn
        maintenance = make_url(server.shard.operations_url).set(database="postgres")
        candidates = [
            replace(server.shard, admin_url=maintenance.render_as_string(False)),
            server.shard,
        ]
        for shard in candidates:
            try:
                server.conn = self._open(shard)
                server.error = None
                break
            except (sa.exc.SQLAlchemyError, TenantryError, OSError) as exc:
                server.conn, server.error = None, describe_error(exc)
        return server.conn

    def _read(self, server: _Server, query: sa.TextClause) -> list[Any]:
        conn = self._connect(server)
        if conn is None:
            return []
        try:
            return list(conn.execute(query, {"names": list(server.databases)}))
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            server.error = describe_error(exc)
            conn.invalidate()
            server.conn = None
            return []

    def _each(self, query: sa.TextClause) -> list[tuple[_Server, list[Any]]]:
        return list(
            zip(
                self._servers,
                self._pool.map(lambda s: self._read(s, query), self._servers),
                strict=True,
            )
        )

    def _xact_counts(self) -> dict[str, float]:
        return {
            server.databases[row.datname].name: float(row.xacts)
            for server, rows in self._each(_XACTS)
            for row in rows
            if row.datname in server.databases
        }

    def _sample(self, active: Counter[tuple[str, str]]) -> None:
        """Count each shard's active statements by tenant."""
        for server, rows in self._each(_ACTIVE):
            for row in rows:
                shard = server.databases.get(row.datname)
                if shard is None:
                    continue
                if shard.tier is Tier.DEDICATED:
                    tenant = self.dedicated.get(shard.name, UNATTRIBUTED)
                else:
                    tenant = tenant_of(row.query or "") or UNATTRIBUTED
                active[(shard.name, tenant)] += 1

    # -- a window -----------------------------------------------------------------------

    def start(self) -> None:
        """Read the counters a first window's rates start from."""
        self._xacts = self._xact_counts()
        self._counters = scrape_routers(self.metrics, timeout=self.timeout)
        self._since = time.monotonic()

    def window(self, seconds: float, stop: threading.Event | None = None) -> TopReport:
        """Sample for *seconds* (every ``step`` seconds), then report the window since
        the previous one ended (or since :meth:`start`). *stop* ends it early."""
        if self._xacts is None:
            self.start()
        stop = stop or threading.Event()
        active: Counter[tuple[str, str]] = Counter()
        samples = 0
        deadline = time.monotonic() + seconds
        while True:
            self._sample(active)
            samples += 1
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(self.step, left)):
                break
        xacts = self._xact_counts()
        counters = scrape_routers(self.metrics, timeout=self.timeout)
        now = time.monotonic()
        elapsed = max(now - self._since, 1e-6)
        report = self._report(active, samples, xacts, counters, elapsed)
        self._xacts, self._counters, self._since = xacts, counters, now
        return report

    def _report(
        self,
        active: Counter[tuple[str, str]],
        samples: int,
        xacts: dict[str, float],
        counters: RouterCounters,
        elapsed: float,
    ) -> TopReport:
        before = self._xacts or {}
        rates = {
            name: max(0.0, n - before[name]) / elapsed
            for name, n in xacts.items()
            if name in before
        }
        routed = _router_rates(self._counters or RouterCounters(), counters, elapsed)
        unreachable = {
            shard.name: server.error
            for server in self._servers
            if server.error
            for shard in server.databases.values()
        }
        loads: dict[str, dict[str, TenantLoad]] = {}
        for (shard, tenant), n in active.items():
            sources: tuple[str, ...] = ("activity",)
            tps = None
            if tenant != UNATTRIBUTED and self.dedicated.get(shard) == tenant:
                tps = rates.get(shard)
                sources += ("pg_stat_database",)
            loads.setdefault(shard, {})[tenant] = TenantLoad(
                tenant, n / samples, tps, None, None, sources
            )
        for shard, tenant in self.dedicated.items():
            # A dedicated tenant with transactions but nothing running at a sample.
            if tenant not in loads.get(shard, {}) and rates.get(shard):
                loads.setdefault(shard, {})[tenant] = TenantLoad(
                    tenant, 0.0, rates[shard], None, None, ("pg_stat_database",)
                )
        for (shard, tenant), (tps, busy, latency) in routed.items():
            seen = loads.setdefault(shard, {}).get(tenant)
            loads[shard][tenant] = TenantLoad(
                tenant,
                seen.active if seen else 0.0,
                tps,
                busy,
                latency,
                (seen.sources if seen else ()) + ("routers",),
            )
        shard_loads = []
        for name, where in sorted(self.shards.items()):
            if where.backend != "postgresql" and name not in loads:
                continue
            tenants = sorted(
                loads.get(name, {}).values(),
                key=lambda t: (-t.score, -(t.transactions_per_second or 0.0), t.tenant),
            )
            total = sum(n for (s, _t), n in active.items() if s == name) / samples
            unattributed = active.get((name, UNATTRIBUTED), 0) / samples
            shard_loads.append(
                ShardLoad(
                    shard=name,
                    tier=where.tier.value,
                    server=(
                        server_of(where.operations_url) if where.backend == "postgresql" else None
                    ),
                    reachable=name not in unreachable,
                    error=unreachable.get(name),
                    active=total,
                    unattributed=unattributed,
                    transactions_per_second=rates.get(name),
                    tenants=tuple(t for t in tenants if t.tenant != UNATTRIBUTED)[: self.limit],
                )
            )
        shard_loads.sort(key=lambda s: (-s.score, s.shard))
        errors = [f"server {s.key}: {s.error}" for s in self._servers if s.error]
        return TopReport(elapsed, samples, shard_loads, errors + list(counters.errors))


def _router_rates(
    before: RouterCounters, after: RouterCounters, elapsed: float
) -> dict[tuple[str, str], tuple[float, float, float | None]]:
    """(shard, tenant) -> (transactions/s, busy seconds/s, mean latency in ms) between
    two scrapes; a counter that went down (a router restarted) counts from zero."""
    rates: dict[tuple[str, str], tuple[float, float, float | None]] = {}
    for key, (count, seconds) in after.counters.items():
        if key not in before.counters:
            continue  # new this window: no start to count from
        count0, seconds0 = before.counters[key]
        if count < count0 or seconds < seconds0:
            count0, seconds0 = 0.0, 0.0
        done, took = count - count0, seconds - seconds0
        if done <= 0:
            continue
        rates[key] = (done / elapsed, took / elapsed, 1000.0 * took / done)
    return rates


def busiest(report: TopReport) -> Iterable[tuple[ShardLoad, TenantLoad]]:
    """Every (shard, tenant) of *report* with load, busiest shards first."""
    for shard in report.shards:
        for tenant in shard.tenants:
            yield shard, tenant
