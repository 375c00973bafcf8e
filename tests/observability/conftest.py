"""Fixtures of the observability suite: a small PostgreSQL fleet of the demo app, a
metrics registry of each test's own, scrapes parsed back, and an in-memory span
exporter.

The fleet: a PostgreSQL catalog and two shared shards (``s1`` on server 0, ``s2`` on
server 1) migrated to the demo app's head; tenants are added empty (:meth:`ObsFleet.
add_tenant`) or seeded (:meth:`ObsFleet.seed`). Routers route as the servers'
superuser (the suite's unsafe-routing-role override): the ORM's checks refuse
cross-tenant writes before row-level security would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.observability import metrics_text
from tenantry.observability.metrics import Metrics
from tenantry.shardmap.residency import Residency, write_residency
from tenantry.testing import DatabaseFactory

#: (metric sample name, sorted label items) -> value
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Scrape:
    """A Prometheus text exposition as a dict of samples."""
    found: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter never incremented)."""
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def series(scrape: Scrape, name: str) -> list[dict[str, str]]:
    """The label sets of every sample named *name*."""
    return [dict(labels) for (sample, labels) in scrape if sample == name]


@pytest.fixture
def metrics() -> Metrics:
    """A Metrics of this test's own registry: counts start at zero."""
    return Metrics(CollectorRegistry())


@pytest.fixture
def scrape() -> Callable[[Metrics | None], Scrape]:
    """``scrape(metrics)``: its registry's exposition (None: the default), parsed."""
    return lambda metrics=None: parse(metrics_text(metrics))


@dataclass
class ObsFleet:
    catalog: Catalog
    urls: dict[str, str]
    routers: list[Any] = field(default_factory=list)

    def engine(self, shard: str) -> sa.Engine:
        return sa.create_engine(self.urls[shard], poolclass=NullPool)

    def add_tenant(self, tenant: str, shard: str = "s1") -> None:
        self.catalog.add_tenant(tenant, shard=shard)

    def seed(self, tenant: str, shard: str = "s1", users: int = 5, chargers: int = 4) -> int:
        """Add *tenant* with rows; return how many rows it has."""
        self.add_tenant(tenant, shard)
        with self.engine(shard).begin() as conn:
            conn.execute(
                sa.text("INSERT INTO users (tenant_id, id, email, name) VALUES (:t, :i, :e, :n)"),
                [{"t": tenant, "i": i, "e": f"u{i}@x", "n": f"U{i}"} for i in range(users)],
            )
            conn.execute(
                sa.text(
                    "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                    " VALUES (:t, :i, :n, 'bay', 22, 'available')"
                ),
                [{"t": tenant, "i": i, "n": f"C{i}"} for i in range(chargers)],
            )
        return users + chargers

    def residency(self, tenant: str, shard: str, state: Residency) -> None:
        with self.engine(shard).begin() as conn:
            write_residency(conn, tenant, state, self.catalog.map_version())

    def move_by_hand(self, tenant: str, source: str, target: str) -> None:
        """The switch of a move, by hand (the tenant has no rows)."""
        self.residency(tenant, target, Residency.ACTIVE)
        self.catalog.set_placement(tenant, target)
        self.residency(tenant, source, Residency.MOVED)

    def router(self, **kwargs: Any) -> Router:
        kwargs.setdefault("background", False)
        router = Router(catalog=self.catalog, **kwargs)
        self.routers.append(router)
        return router


def build_fleet(make_pg_database: DatabaseFactory, **settings: Any) -> ObsFleet:
    url = make_pg_database(0)
    values: dict[str, Any] = {
        "catalog_url": url,
        "alembic_config": str(MIGRATIONS),
        "connect_timeout": 3,
        "pool_size_shared": 2,
        "max_overflow": 2,
        "freeze_timeout": 10,
    }
    values.update(settings)
    catalog = Catalog(settings=load_settings(**values))
    catalog.init()
    urls = {}
    for name, server in (("s1", 0), ("s2", 1)):
        catalog.add_shard(name, make_pg_database(server))
        urls[name] = catalog.get_shard(name).url
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    return ObsFleet(catalog, urls)


@pytest.fixture
def fleet_of(make_pg_database: DatabaseFactory) -> Iterator[Callable[..., ObsFleet]]:
    """``fleet_of(**settings)``: a fresh fleet (closed after the test)."""
    made: list[ObsFleet] = []

    def make(**settings: Any) -> ObsFleet:
        made.append(build_fleet(make_pg_database, **settings))
        return made[-1]

    yield make
    for fleet in made:
        for router in fleet.routers:
            router.close()
        fleet.catalog.close()


@pytest.fixture
def fleet(fleet_of: Callable[..., ObsFleet]) -> ObsFleet:
    """A fresh fleet with metrics, traces and comments off in its settings."""
    return fleet_of()


@pytest.fixture(scope="session")
def _span_exporter() -> InMemorySpanExporter:
    # The global tracer provider can be set once per process.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def spans(_span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """OpenTelemetry's in-memory exporter, emptied for this test."""
    _span_exporter.clear()
    return _span_exporter
