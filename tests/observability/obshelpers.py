"""Helpers of the observability suite (conftest.py's fixtures use them): a small
PostgreSQL fleet of the demo app, and Prometheus scrapes parsed back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
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
