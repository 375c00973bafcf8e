"""Unknown tenant ids cannot hammer the catalog; a tenant just added is still found.

While change notifications arrive (``LISTEN tenantry_map``), a lookup that misses reads
the catalog at most once per ``MISS_INTERVAL`` for all misses together: a tenant added
a moment ago reaches the router with its notification. Catalog queries are counted on
the catalog's engine, from every thread but the map cache's own (it polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tenantry import AsyncRouter
from tenantry.shardmap.cache import MISS_INTERVAL


@contextlib.contextmanager
def catalog_queries(catalog: Any) -> Iterator[list[str]]:
    """The statements sent to the catalog inside the block, but the map cache thread's
    (on any engine of the catalog's URL: map reads have a connection of their own)."""
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if (
            conn.engine.url == catalog.engine.url
            and threading.current_thread().name != "tenantry-map-cache"
        ):
            seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", count)


def is_map_read(statement: str) -> bool:
    """Whether *statement* is a refresh's one read (the map row and the changes since)."""
    return (
        statement.startswith("SELECT tenantry_map.version") and "tenantry_map_changes" in statement
    )


@pytest.fixture
def fleet(pg_fleet_builder: Any) -> Any:
    # A long poll interval: what reaches the router comes by notification.
    fleet = pg_fleet_builder(poll_interval=60)
    fleet.add_shard("shared-a")
    fleet.add_tenant("acme", "shared-a")
    return fleet


def test_ten_thousand_unknown_ids_make_a_few_catalog_queries(fleet: Any) -> None:
    router = fleet.new_router(background=True)
    assert router._cache.wait_listening(timeout=10)
    with catalog_queries(fleet.catalog) as queries:
        start = time.monotonic()
        lookups = 0
        # At least 10,000 of them, and for three intervals at least (a busy loop).
        while lookups < 10_000 or time.monotonic() - start < 3 * MISS_INTERVAL:
            assert not router.has_tenant(f"made-up-{lookups}")
            lookups += 1
        elapsed = time.monotonic() - start
    assert router.has_tenant("acme")
    # One read of the map per interval at most, whatever the number of misses; and
    # misses do read it, once an interval has passed.
    assert 2 <= len(queries) <= 1 + elapsed / MISS_INTERVAL, (len(queries), lookups, elapsed)
    assert all(is_map_read(q) for q in queries), set(queries)


def test_without_notifications_every_miss_reads_the_catalog(fleet: Any) -> None:
    """No listener (polling only): a miss is the only way to see a new tenant at once."""
    router = fleet.new_router(background=False)
    with catalog_queries(fleet.catalog) as queries:
        for i in range(100):
            assert not router.has_tenant(f"made-up-{i}")
    assert len(queries) >= 100


def test_a_tenant_added_a_moment_ago_routes_once_its_notification_arrived(fleet: Any) -> None:
    router = fleet.new_router(background=True)
    assert router._cache.wait_listening(timeout=10)
    with router.session("acme") as session:
        session.connection()  # the shard's fence key is read now, not below
    # Misses have just read the catalog: the next miss will not, for an interval.
    for i in range(1000):
        assert not router.has_tenant(f"made-up-{i}")
    assert not router.has_tenant("newcomer")
    fleet.add_tenant("newcomer", "shared-a")
    version = fleet.catalog.map_version()
    assert router.wait_for_version(version, timeout=10)  # the notification arrived
    with catalog_queries(fleet.catalog) as queries:
        with router.session("newcomer") as session:
            names = session.execute(sa.text("SELECT name FROM projects ORDER BY id")).scalars()
            assert list(names) == ["newcomer-p1", "newcomer-p2"]
    assert queries == []  # from the map the notification brought, not a miss's refresh


def test_async_router_misses_are_bounded_too(fleet: Any) -> None:
    async def main() -> tuple[int, float]:
        router = AsyncRouter(catalog=fleet.catalog, background=True)
        try:
            await asyncio.to_thread(router._cache.wait_listening, 10)
            with catalog_queries(fleet.catalog) as queries:
                start = time.monotonic()
                for i in range(2000):
                    assert not await router.has_tenant_async(f"made-up-{i}")
                elapsed = time.monotonic() - start
            return len(queries), elapsed
        finally:
            await router.close()

    queries, elapsed = asyncio.run(main())
    assert queries <= 1 + elapsed / MISS_INTERVAL, (queries, elapsed)
