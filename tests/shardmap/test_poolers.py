"""PgBouncer in transaction mode in front of the catalog and the shards: the catalog
prepares nothing and gets map changes by polling, or by LISTEN on the server's own URL;
a pooled routing URL is detected; operations refuse a pooler."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenantry import Catalog, load_settings
from tenantry.errors import PoolerInTheWay
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.model import Shard
from tenantry.shardmap.operations import operator_engine
from tenantry.shardmap.poolers import url_through_pooler
from tenantry.testing import DatabaseFactory
from tenantry.testing.pgbouncer import TempPgBouncer

PASSWORD = "s3cret-pw"


def _catalog(url: str, **settings: object) -> Catalog:
    text = sa.make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    return Catalog(text, settings=load_settings(catalog_url=text, connect_timeout=2, **settings))


@pytest.fixture
def catalog_db(make_pg_database: DatabaseFactory) -> str:
    url = make_pg_database(0)
    with _catalog(url) as catalog:
        catalog.init()
    return url


@pytest.fixture
def cache_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="tenantry.cache")
    yield caplog


def _mode_line(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if "map changes:" in r.getMessage()]
    assert len(lines) == 1, lines  # said once, in one line
    return lines[0]


def test_through_a_pooler_the_cache_polls_and_says_so(
    catalog_db: str, pgbouncer: TempPgBouncer, cache_log: pytest.LogCaptureFixture
) -> None:
    with _catalog(pgbouncer.url(catalog_db)) as catalog:
        cache = MapCache(catalog, poll_interval=0.2)
        try:
            # the pooled listener was closed for good: polling, said in one line
            assert cache.wait_mode(5.0) == "poll" and not cache.listening
            line = _mode_line(cache_log)
            assert "polled every 0.2s" in line and "TENANTRY_CATALOG_LISTEN_URL" in line
            assert PASSWORD not in cache_log.text
            version = catalog.map_version()
            catalog.add_shard("s1", catalog_db, prepare=False)
            assert cache.wait_for_version(version + 1, timeout=5.0)
            assert "s1" in cache.snapshot.shards
        finally:
            cache.close()


def test_a_direct_listen_url_brings_notifications(
    catalog_db: str, pgbouncer: TempPgBouncer, cache_log: pytest.LogCaptureFixture
) -> None:
    with _catalog(pgbouncer.url(catalog_db), catalog_listen_url=catalog_db) as catalog:
        # polling only every 30 s: the change below can arrive this soon by LISTEN only
        cache = MapCache(catalog, poll_interval=30)
        try:
            assert cache.wait_mode(5.0) == "notify"
            assert cache.wait_listening(5.0)
            assert "notified (LISTEN on" in _mode_line(cache_log)
            version = catalog.map_version()
            catalog.add_shard("s1", catalog_db, prepare=False)
            assert cache.wait_for_version(version + 1, timeout=5.0)
        finally:
            cache.close()


def test_catalog_connections_through_a_pooler_prepare_nothing(
    catalog_db: str, pgbouncer: TempPgBouncer
) -> None:
    with _catalog(pgbouncer.url(catalog_db)) as pooled, _catalog(catalog_db) as direct:
        for catalog, threshold in ((pooled, None), (direct, 5)):
            raw = catalog.engine.raw_connection()
            try:
                assert raw.driver_connection.prepare_threshold == threshold  # type: ignore[union-attr]
            finally:
                raw.close()
        # Many times the same catalog reads (psycopg would prepare them after five):
        # through two shared server connections, none fails.
        pooled.add_shard("s1", catalog_db, prepare=False)
        for _ in range(30):
            assert "s1" in pooled.snapshot().shards
            assert pooled.map_version() >= 1


def test_a_pooler_is_told_from_the_server(
    catalog_db: str, pgbouncer: TempPgBouncer, tmp_path: Path
) -> None:
    assert url_through_pooler(pgbouncer.url(catalog_db))
    assert not url_through_pooler(catalog_db)
    assert not url_through_pooler(f"sqlite:///{tmp_path / 'x.db'}")


def test_operations_refuse_a_pooler(
    catalog_db: str, make_pg_database: DatabaseFactory, pgbouncer: TempPgBouncer
) -> None:
    shard_db = make_pg_database(0)
    pooled_url = sa.make_url(pgbouncer.url(shard_db)).set(password=PASSWORD)
    pooled = pooled_url.render_as_string(hide_password=False)
    with _catalog(catalog_db) as catalog:
        # the routing URL alone, through the pooler: no URL reaches the server
        with pytest.raises(PoolerInTheWay) as refused:
            catalog.add_shard("s1", pooled)
        assert "--admin-url" in str(refused.value) and PASSWORD not in str(refused.value)
        assert catalog.list_shards() == []
        # the pooler as the operations URL: refused on its first connection
        with pytest.raises(PoolerInTheWay):
            catalog.add_shard("s1", shard_db, admin_url=pooled)
        assert catalog.list_shards() == []
        shard = catalog.add_shard("s1", pooled, admin_url=shard_db)
        assert shard.pooled and catalog.get_shard("s1").pooled
        assert catalog.add_shard("s2", make_pg_database(0)).pooled is False
        with pytest.raises(PoolerInTheWay), operator_engine(Shard("x", pooled)) as engine:
            engine.connect().close()
