"""Fixtures of the observability suite (helpers in obshelpers.py): a PostgreSQL fleet, a
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
from typing import Any

import pytest
from obshelpers import ObsFleet, Scrape, build_fleet, parse
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from tenantry.observability import metrics_text
from tenantry.observability.metrics import Metrics
from tenantry.testing import DatabaseFactory


@pytest.fixture
def metrics() -> Metrics:
    """A Metrics of this test's own registry: counts start at zero."""
    return Metrics(CollectorRegistry())


@pytest.fixture
def scrape() -> Callable[[Metrics | None], Scrape]:
    """``scrape(metrics)``: its registry's exposition (None: the default), parsed."""
    return lambda metrics=None: parse(metrics_text(metrics))


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
