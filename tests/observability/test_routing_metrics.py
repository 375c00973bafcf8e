"""Routers' metrics, scraped after known work: exact counts per shard and outcome."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import sqlalchemy as sa
from obshelpers import ObsFleet, Scrape, series, value
from sqlalchemy.ext.asyncio import AsyncSession

from tenantry import AsyncRouter
from tenantry.demo.models import User
from tenantry.errors import ConfigurationError, CrossTenantWrite, ShardUnavailable, TenantFrozen
from tenantry.observability import metrics_app
from tenantry.observability.metrics import Metrics
from tenantry.shardmap.residency import Residency

TX = "tenantry_routed_transactions_total"


def test_transactions_counted_by_shard_and_outcome(
    fleet: ObsFleet, metrics: Metrics, scrape: Any
) -> None:
    fleet.seed("acme", "s1")
    fleet.seed("globex", "s2")
    router = fleet.router(metrics=metrics)
    for _ in range(7):
        with router.session("acme") as session:
            assert len(session.scalars(sa.select(User)).all()) == 5
    for _ in range(3):
        with router.connection("globex") as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(User)).scalar() == 5
    got: Scrape = scrape(metrics)
    assert value(got, TX, shard="s1", outcome="ok") == 7
    assert value(got, TX, shard="s2", outcome="ok") == 3
    assert {tuple(sorted(s.items())) for s in series(got, TX)} == {
        (("outcome", "ok"), ("shard", "s1")),
        (("outcome", "ok"), ("shard", "s2")),
    }
    assert value(got, "tenantry_routed_transaction_seconds_count", shard="s1") == 7
    assert value(got, "tenantry_routed_transaction_seconds_count", shard="s2") == 3
    assert value(got, "tenantry_routed_transaction_seconds_sum", shard="s1") > 0
    # the busiest tenants, with their shard
    assert value(got, "tenantry_tenant_transactions_total", tenant="acme", shard="s1") == 7
    assert value(got, "tenantry_tenant_transactions_total", tenant="globex", shard="s2") == 3
    assert value(got, "tenantry_tenant_transaction_seconds_total", tenant="acme", shard="s1") > 0
    acme = value(got, "tenantry_tenant_score", tenant="acme", shard="s1")
    assert 6.9 < acme <= 7.0  # decayed by the few seconds since (half-life: 60 s)
    # the router's gauges
    assert value(got, "tenantry_map_version") == fleet.catalog.map_version()
    assert value(got, "tenantry_map_mode", mode="notify") == 1
    assert value(got, "tenantry_map_mode", mode="poll") == 0
    assert value(got, "tenantry_engines_open") == 2
    assert value(got, "tenantry_engines_evicted_total") == 0
    servers = {s["server"] for s in series(got, "tenantry_connections_in_use")}
    assert len(servers) == len({sa.make_url(u).port for u in fleet.urls.values()})
    for server in servers:
        assert value(got, "tenantry_connections_in_use", server=server) >= 1
        budget = value(got, "tenantry_connections_budget", server=server)
        assert budget >= value(got, "tenantry_connections_in_use", server=server)


def test_stale_route_retry_counted_on_the_old_shard(
    fleet: ObsFleet, metrics: Metrics, scrape: Any
) -> None:
    fleet.add_tenant("acme", "s1")
    router = fleet.router(metrics=metrics)  # no background refresh: its map goes stale
    with router.session("acme"):
        pass
    fleet.move_by_hand("acme", "s1", "s2")
    with router.session("acme") as session:
        assert session.info["tenantry.shard"] == "s2"
    got = scrape(metrics)
    assert value(got, TX, shard="s1", outcome="stale_route_retry") == 1
    assert value(got, TX, shard="s1", outcome="ok") == 1
    assert value(got, TX, shard="s2", outcome="ok") == 1
    # the histogram times transactions that began: two
    assert value(got, "tenantry_routed_transaction_seconds_count", shard="s1") == 1
    assert value(got, "tenantry_routed_transaction_seconds_count", shard="s2") == 1
    assert value(got, "tenantry_map_version") == fleet.catalog.map_version()
    assert value(got, "tenantry_map_refresh_seconds_count") == 1  # the reroute's refresh


def test_frozen_write_and_cross_tenant_refusal(
    fleet: ObsFleet, metrics: Metrics, scrape: Any
) -> None:
    fleet.seed("acme", "s1")
    router = fleet.router(metrics=metrics)
    with pytest.raises(CrossTenantWrite), router.session("acme") as session:
        session.add(User(tenant_id="globex", id=99, email="x", name="x"))
        session.commit()
    fleet.residency("acme", "s1", Residency.FROZEN)
    with router.session("acme") as session:  # reads go on
        assert len(session.scalars(sa.select(User)).all()) == 5
    with pytest.raises(TenantFrozen), router.session("acme") as session:
        session.add(User(id=100, email="y", name="y"))
        session.commit()
    with pytest.raises(TenantFrozen), router.connection("acme") as conn:
        conn.execute(sa.insert(User).values(tenant_id="acme", id=101, email="z", name="z"))
    got = scrape(metrics)
    assert value(got, TX, shard="s1", outcome="cross_tenant_refused") == 1
    assert value(got, TX, shard="s1", outcome="frozen") == 2
    assert value(got, TX, shard="s1", outcome="ok") == 1
    assert value(got, TX, shard="s1", outcome="error") == 0


def test_application_errors_and_unreachable_shards(
    fleet: ObsFleet, metrics: Metrics, scrape: Any
) -> None:
    fleet.add_tenant("acme", "s1")
    router = fleet.router(metrics=metrics)
    with pytest.raises(ZeroDivisionError), router.session("acme"):
        _ = 1 / 0
    # the connection lost midway: its backend terminated by an operator
    with pytest.raises(ShardUnavailable), router.session("acme") as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        with fleet.engine("s1").connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p, 10000)"), {"p": pid})
        session.execute(sa.text("SELECT 1"))
    got = scrape(metrics)
    assert value(got, TX, shard="s1", outcome="error") == 1
    assert value(got, TX, shard="s1", outcome="shard_unavailable") == 1


def test_async_router(fleet: ObsFleet, metrics: Metrics, scrape: Any) -> None:
    fleet.seed("acme", "s1")

    async def work() -> None:
        async with AsyncRouter(catalog=fleet.catalog, background=False, metrics=metrics) as r:
            for _ in range(3):
                async with r.session("acme") as session:
                    assert isinstance(session, AsyncSession)
                    assert len((await session.scalars(sa.select(User))).all()) == 5
            async with r.connection("acme") as conn:
                await conn.execute(sa.select(User.id))
            with pytest.raises(CrossTenantWrite):
                async with r.session("acme") as session:
                    session.add(User(tenant_id="globex", id=9, email="x", name="x"))
                    await session.commit()

    asyncio.run(work())
    got = scrape(metrics)
    assert value(got, TX, shard="s1", outcome="ok") == 4
    assert value(got, TX, shard="s1", outcome="cross_tenant_refused") == 1
    assert value(got, "tenantry_tenant_transactions_total", tenant="acme", shard="s1") == 5
    # closed: its gauges are gone, the totals stay
    assert series(got, "tenantry_engines_open") == [{}]
    assert value(got, "tenantry_engines_open") == 0


def test_metrics_app_serves_the_registry(fleet: ObsFleet, metrics: Metrics) -> None:
    from starlette.testclient import TestClient

    fleet.add_tenant("acme", "s1")
    router = fleet.router(metrics=metrics)
    with router.session("acme"):
        pass
    response = TestClient(metrics_app(metrics)).get("/")
    assert response.status_code == 200
    assert 'tenantry_routed_transactions_total{outcome="ok",shard="s1"} 1.0' in response.text


def test_the_setting_uses_the_default_registry(fleet_of: Any, scrape: Any) -> None:
    fleet = fleet_of(metrics=True)
    fleet.add_tenant("acme", "s1")
    before = value(scrape(None), TX, shard="s1", outcome="ok")
    router = fleet.router()
    for _ in range(4):
        with router.session("acme"):
            pass
    assert value(scrape(None), TX, shard="s1", outcome="ok") == before + 4


def test_off_by_default_nothing_imported_nothing_wrapped(fleet: ObsFleet, tmp_path: Any) -> None:
    router = fleet.router()
    assert router._observer is None
    assert "session" not in vars(router) and "connection" not in vars(router)
    # A fresh process: routing never imports prometheus_client or OpenTelemetry.
    script = textwrap.dedent(
        f"""
        import sys
        from tenantry import Catalog, Router, load_settings
        url = "sqlite:///{tmp_path}/c.db"
        c = Catalog(url, settings=load_settings(catalog_url=url)); c.init()
        c.add_shard("a", "sqlite:///{tmp_path}/a.db")
        import tenantry.migrations, tenantry.moves
        with Router(catalog=c, background=False) as r:
            r.catalog.add_tenant("t")
        print(sorted(m for m in sys.modules if m.startswith(("prometheus", "opentelemetry"))))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"


def test_metrics_on_without_the_package_is_one_clear_error(fleet: ObsFleet) -> None:
    import threading

    from tenantry import Router

    saved = sys.modules.get("prometheus_client")
    saved_metrics = sys.modules.pop("tenantry.observability.metrics", None)
    sys.modules["prometheus_client"] = None  # type: ignore[assignment]
    try:
        threads = threading.active_count()
        with pytest.raises(ConfigurationError, match=r"pip install 'tenantry\[observability\]'"):
            Router(catalog=fleet.catalog, metrics=True)  # its map thread is stopped again
        assert threading.active_count() == threads
    finally:
        if saved is not None:
            sys.modules["prometheus_client"] = saved
        if saved_metrics is not None:
            sys.modules["tenantry.observability.metrics"] = saved_metrics
