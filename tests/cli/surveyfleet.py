"""A small PostgreSQL fleet for ``tenantry status`` and ``tenantry top``: shared shards
s1 (server 0) and s2 (server 1), dedicated d1 (server 1) holding ``regulated``, the
demo schema migrated on each; tenants acme and neighbor on s1, other on s2, with a few
rows each; the catalog on server 0."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Tier, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.testing import DatabaseFactory


@dataclass
class SurveyFleet:
    catalog: Catalog
    catalog_url: str
    urls: dict[str, str]  # shard -> URL as the catalog stores it

    def engine(self, shard: str, **kwargs: object) -> sa.Engine:
        return sa.create_engine(self.urls[shard], poolclass=NullPool, **kwargs)


def closed_port() -> int:
    """A local TCP port nothing listens on (connecting is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_survey_fleet(make_pg_database: DatabaseFactory) -> SurveyFleet:
    catalog_url = make_pg_database(0)
    settings = load_settings(catalog_url=catalog_url, alembic_config=str(MIGRATIONS))
    catalog = Catalog(settings=settings)
    catalog.init()
    urls = {}
    for name, server, tier in (("s1", 0, "shared"), ("s2", 1, "shared"), ("d1", 1, "dedicated")):
        catalog.add_shard(name, make_pg_database(server), tier=tier)
        urls[name] = catalog.get_shard(name).url
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    for tenant, shard in (("acme", "s1"), ("neighbor", "s1"), ("other", "s2")):
        catalog.add_tenant(tenant, shard=shard)
    catalog.add_tenant("regulated", tier=Tier.DEDICATED, shard="d1")
    for tenant, shard in (("acme", "s1"), ("neighbor", "s1"), ("other", "s2"), ("regulated", "d1")):
        with sa.create_engine(urls[shard], poolclass=NullPool).begin() as conn:
            conn.execute(
                sa.text("INSERT INTO users (tenant_id, id, email, name) VALUES (:t, :i, :e, :n)"),
                [{"t": tenant, "i": i, "e": f"u{i}@{tenant}", "n": f"U{i}"} for i in range(1, 6)],
            )
    return SurveyFleet(catalog, catalog_url, urls)
