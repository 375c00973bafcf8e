"""MapCache: a versioned snapshot, refreshed only when the map version changes.

In the background it is refreshed by ``LISTEN tenantry_map`` on PostgreSQL and by
polling everywhere; a lost catalog connection is retried with backoff while the last
snapshot keeps serving lookups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings
from tenantry.errors import CatalogUnavailable
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.schema import map_table
from tenantry.testing import DatabaseFactory

ShardUrl = Callable[[], str]
LISTENER = "tenantry-map-listener"


def wait_for(condition: Callable[[], object], timeout: float) -> float:
    """Seconds until *condition* held; fail after *timeout*."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def caches() -> Iterator[Callable[..., MapCache]]:
    """``make(catalog, **options) -> MapCache``, closed after the test."""
    made: list[MapCache] = []

    def make(catalog: Catalog, **options: Any) -> MapCache:
        cache = MapCache(catalog, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


# -- refresh --------------------------------------------------------------------------------


def test_refresh_reads_only_when_the_version_changes(
    catalog: Catalog,
    new_shard_url: ShardUrl,
    caches: Callable[..., MapCache],
    count_loads: Callable[[Catalog], list[int]],
) -> None:
    changes: list[int] = []
    cache = caches(catalog, background=False, on_change=lambda s: changes.append(s.version))
    first = cache.snapshot
    loads = count_loads(catalog)
    for _ in range(5):
        assert cache.refresh() is first  # one version query each, no reload
    assert loads == [] and changes == []

    catalog.add_shard("s1", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    fresh = cache.refresh()
    assert fresh is not first
    assert fresh.version == first.version + 2 == cache.version
    assert fresh.shard_of("acme").name == "s1"
    # Built from the changes since (see test_delta.py), not a whole reload.
    assert loads == [] and changes == [fresh.version]
    assert cache.refresh() is fresh
    assert loads == []
    # snapshots are immutable: the old one still says what it said
    assert "acme" not in first.tenants


def test_refresh_with_a_minimum_version_never_goes_backwards(
    catalog: Catalog, caches: Callable[..., MapCache]
) -> None:
    cache = caches(catalog, background=False)
    current = cache.snapshot
    assert cache.refresh(min_version=current.version + 1) is current
    assert cache.version == current.version


@pytest.mark.parametrize("interval", [0, -1.0])
def test_poll_interval_must_be_positive(catalog: Catalog, interval: float) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        MapCache(catalog, poll_interval=interval, background=False)


def test_polling_refreshes_in_the_background(
    catalog: Catalog, new_shard_url: ShardUrl, caches: Callable[..., MapCache]
) -> None:
    cache = caches(catalog, poll_interval=0.05, listen=False)
    catalog.add_shard("s1", new_shard_url())
    catalog.add_tenant("acme", shard="s1")
    assert wait_for(lambda: "acme" in cache.snapshot.tenants, 2.0) < 1.0
    assert not cache.listening


def test_sqlite_never_listens(
    sqlite_url: str, tmp_path: Path, caches: Callable[..., MapCache]
) -> None:
    with Catalog(sqlite_url, settings=load_settings(catalog_url=sqlite_url)) as catalog:
        catalog.init()
        cache = caches(catalog, poll_interval=0.05, listen=True)
        catalog.add_shard("s1", f"sqlite:///{tmp_path / 'shard.db'}")
        assert wait_for(lambda: "s1" in cache.snapshot.shards, 2.0) < 1.0
        assert not cache.listening
        cache.close()


def test_close_stops_the_background_thread(
    catalog: Catalog, caches: Callable[..., MapCache]
) -> None:
    cache = caches(catalog, poll_interval=30)
    thread = cache._thread
    assert thread is not None and thread.is_alive()
    if catalog.dialect == "postgresql":
        wait_for(lambda: cache.listening, 5.0)
    started = time.monotonic()
    cache.close()
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    assert not cache.listening
    if catalog.dialect == "postgresql":  # its backend goes too (a moment after the hang-up)
        wait_for(lambda: listener_pids(catalog) == [], 2.0)


# -- PostgreSQL: LISTEN/NOTIFY, lost connections ----------------------------------------------


@pytest.fixture
def pg_catalog(make_pg_database: DatabaseFactory) -> Iterator[Catalog]:
    """An initialised PostgreSQL catalog; its URL carries a password (trust auth ignores it)."""
    url = sa.make_url(make_pg_database(0)).set(password="s3cret-pw")
    text = url.render_as_string(hide_password=False)
    with Catalog(text, settings=load_settings(catalog_url=text, connect_timeout=2)) as catalog:
        catalog.init()
        yield catalog


@contextmanager
def server(catalog: Catalog) -> Iterator[sa.Connection]:
    """An autocommit superuser connection to the catalog's server."""
    url = sa.make_url(catalog.url).set(database="postgres")
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def listener_pids(catalog: Catalog) -> list[int]:
    with server(catalog) as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :app "
                    "AND datname = :db AND state IS NOT NULL"
                ),
                {"app": LISTENER, "db": sa.make_url(catalog.url).database},
            ).scalars()
        )


def test_notify_refreshes_within_a_second(
    pg_catalog: Catalog, make_pg_database: DatabaseFactory, caches: Callable[..., MapCache]
) -> None:
    # polling every 30 s: only the notification can bring the change this soon
    cache = caches(pg_catalog, poll_interval=30)
    wait_for(lambda: cache.listening, 5.0)
    assert len(listener_pids(pg_catalog)) == 1
    pg_catalog.add_shard("s1", make_pg_database(1))
    assert wait_for(lambda: "s1" in cache.snapshot.shards, 2.0) < 1.0
    pg_catalog.add_tenant("acme", shard="s1")
    assert wait_for(lambda: "acme" in cache.snapshot.tenants, 2.0) < 1.0


def test_polling_catches_a_change_that_sent_no_notification(
    pg_catalog: Catalog, caches: Callable[..., MapCache]
) -> None:
    cache = caches(pg_catalog, poll_interval=0.3)
    wait_for(lambda: cache.listening, 5.0)
    before = cache.version
    with pg_catalog.engine.begin() as conn:  # a version bump without NOTIFY
        conn.execute(map_table.update().values(version=map_table.c.version + 1))
    assert wait_for(lambda: cache.version == before + 1, 3.0) < 1.5
    assert cache.listening


def test_listener_reconnects_after_its_connection_is_killed(
    pg_catalog: Catalog,
    make_pg_database: DatabaseFactory,
    caches: Callable[..., MapCache],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tenantry.cache")
    pg_catalog.add_shard("s1", make_pg_database(1))
    cache = caches(pg_catalog, poll_interval=30)
    wait_for(lambda: cache.listening, 5.0)
    (old_pid,) = listener_pids(pg_catalog)
    snapshot = cache.snapshot
    with server(pg_catalog) as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": old_pid}).scalar()

    def new_listener() -> bool:
        pids = listener_pids(pg_catalog)
        return cache.listening and len(pids) == 1 and pids[0] != old_pid

    wait_for(new_listener, 5.0)
    assert cache.snapshot is snapshot  # nothing changed meanwhile: no reload
    assert "map refresh failed" in caplog.text
    # and it hears notifications again
    pg_catalog.add_tenant("acme", shard="s1")
    assert wait_for(lambda: "acme" in cache.snapshot.tenants, 2.0) < 1.0


def test_last_snapshot_serves_while_the_catalog_is_unreachable(
    pg_catalog: Catalog,
    make_pg_database: DatabaseFactory,
    caches: Callable[..., MapCache],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tenantry.cache")
    pg_catalog.add_shard("s1", make_pg_database(1))
    pg_catalog.add_tenant("acme", shard="s1")
    cache = caches(pg_catalog, poll_interval=30)
    wait_for(lambda: cache.listening, 5.0)
    snapshot = cache.snapshot
    database = sa.make_url(pg_catalog.url).database
    with server(pg_catalog) as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": database},
        )
        try:
            wait_for(lambda: not cache.listening, 5.0)
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:  # lookups go on from the last snapshot
                assert cache.snapshot is snapshot
                assert cache.snapshot.shard_of("acme").name == "s1"
                time.sleep(0.05)
            with pytest.raises(CatalogUnavailable):
                cache.refresh()
            assert not cache.listening
        finally:
            conn.exec_driver_sql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    failures = [r for r in caplog.records if "map refresh failed" in r.getMessage()]
    assert len(failures) >= 2  # retried, with backoff
    assert "s3cret-pw" not in caplog.text
    # back: it reconnects and catches up with a change made after the outage
    pg_catalog.add_tenant("globex", shard="s1")
    wait_for(lambda: "globex" in cache.snapshot.tenants, 6.0)
    wait_for(lambda: cache.listening, 2.0)
