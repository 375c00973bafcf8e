"""Moves while writers route through PgBouncer in transaction mode.

Both shards are pooled: their routing URLs are PgBouncers (one in front of each server,
two server connections each), their operations URLs the servers themselves, which the
mover uses. The writers of tests/moves/test_online.py write the moving tenant and its
neighbours through routers at a steady rate for the whole move (retrying only what the
router says is retryable: TenantFrozen while the tenant is frozen, StaleRoute once it
has moved); afterwards every acknowledged write is at the tenant's new home exactly
once, and nothing of it is left at the source.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantry import Catalog, load_settings, moves
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.testing import DatabaseFactory
from tenantry.testing.pgbouncer import TempPgBouncer
from tests.pooler.conftest import pgbouncer_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moves"))
from movefleet import (
    Fleet,
    assert_one_home,
    count_rows,
    drop_replication,
    replication_objects,
    seed,
)
from test_online import Notes, start_writers

RETRYABLE = {"TenantFrozen", "StaleRoute"}


@pytest.fixture
def fleet(
    make_pg_database: DatabaseFactory,
    pgbouncer: TempPgBouncer,
    pgbouncer_1: TempPgBouncer,
) -> Iterator[Fleet]:
    """s1 (server 0) and s2 (server 1), both routed through their server's PgBouncer;
    acme and neighbor on s1, other on s2, each with rows."""
    catalog_url = make_pg_database(0)
    settings = load_settings(
        catalog_url=catalog_url, alembic_config=str(MIGRATIONS), freeze_timeout=10.0
    )
    catalog = Catalog(settings=settings)
    catalog.init()
    urls = {}
    for name, server, bouncer in (("s1", 0, pgbouncer), ("s2", 1, pgbouncer_1)):
        direct = make_pg_database(server)
        shard = catalog.add_shard(name, bouncer.url(direct), admin_url=direct, tier="shared")
        assert shard.pooled, name
        urls[name] = direct
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    built = Fleet(catalog, catalog_url, urls)
    for tenant, shard, sessions in (
        ("acme", "s1", 400),
        ("neighbor", "s1", 20),
        ("other", "s2", 20),
    ):
        catalog.add_tenant(tenant, shard=shard)
        engine = built.engine(shard)
        seed(engine, tenant, sessions=sessions)
        engine.dispose()
    try:
        yield built
    finally:
        drop_replication(built)
        built.close()


def database(url: str) -> str:
    name = sa.make_url(url).database
    assert name
    return name


def test_offline_then_online_move_with_writers_through_pgbouncer(
    fleet: Fleet, pgbouncer: TempPgBouncer, pgbouncer_1: TempPgBouncer
) -> None:
    s1, s2 = database(fleet.urls["s1"]), database(fleet.urls["s2"])
    before = (pgbouncer_stats(pgbouncer).get(s1, 0), pgbouncer_stats(pgbouncer_1).get(s2, 0))
    writers = start_writers(fleet, ["acme", "neighbor", "other"])
    acme = writers[0]
    observer = Notes()
    done = []
    try:
        time.sleep(0.3)
        # Offline to s2, then online back to s1: both directions through both poolers.
        done.append(moves.move(fleet.catalog, "acme", "s2", mode="offline", observer=observer))
        at_s2 = len(acme.acks)
        frozen_offline = acme.retried.count("TenantFrozen")
        time.sleep(0.3)
        assert len(acme.acks) > at_s2, "no write of acme at s2"
        done.append(
            moves.move(
                fleet.catalog, "acme", "s1", mode="online", max_freeze=1.0, observer=observer
            )
        )
        back_at_s1 = len(acme.acks)
        time.sleep(0.3)  # writes at the old home again
    finally:
        for writer in writers:
            writer.stop()
    assert [(d.succeeded, d.mode.value) for d in done] == [(True, "offline"), (True, "online")]
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    assert len(acme.acks) > back_at_s1, "no write of acme after the online move"
    for writer in writers:
        assert writer.failed == [], (writer.tenant, writer.failed)
        assert len(writer.acks) > 20, writer.tenant
    # Only the retries the router documents, and only for the moving tenant: frozen
    # during each move (the online one freezes for its cut only).
    assert set(acme.retried) <= RETRYABLE, acme.retried
    assert frozen_offline >= 1, acme.retried
    assert acme.retried.count("TenantFrozen") > frozen_offline, acme.retried
    for neighbour in writers[1:]:
        assert neighbour.retried == [], (neighbour.tenant, neighbour.retried)
    # Every acknowledged write exactly once at its home, nothing elsewhere.
    assert assert_one_home(fleet, "acme", acme.expected()) == "s1"
    assert assert_one_home(fleet, "neighbor", writers[1].expected()) == "s1"
    assert assert_one_home(fleet, "other", writers[2].expected()) == "s2"
    target = fleet.engine("s2")
    try:
        assert count_rows(target, "acme") == 0
    finally:
        target.dispose()
    assert replication_objects(fleet) == set()
    # The writers' transactions went through the two PgBouncers, each carrying acme's
    # writes for a while.
    after = (pgbouncer_stats(pgbouncer).get(s1, 0), pgbouncer_stats(pgbouncer_1).get(s2, 0))
    routed = sum(len(w.acks) for w in writers)
    assert after[0] - before[0] + after[1] - before[1] >= routed, (before, after, routed)
    assert after[1] - before[1] > len(writers[2].acks), (before, after)
