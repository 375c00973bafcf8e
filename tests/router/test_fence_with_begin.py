"""BEGIN and the fence in one message (``fence_with_begin``), and the fence without it.

Each test runs with the setting on and off: the fence's guarantees (row-level security
admits only the signed tenant, a frozen tenant is read-only, a rotated key is learned,
a dead pooled connection is begun again) must not depend on how its BEGIN travels; and
with it on, the BEGIN carries the engine's isolation level and read-only flag as
psycopg would send them, and a tenant id cannot inject SQL into the message.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import select, text

from tenantry import AsyncRouter, Router
from tenantry.errors import InvalidName, StaleRoute, TenantFrozen
from tenantry.router import fence
from tenantry.shardmap.drivers import make_async_engine, make_engine
from tenantry.shardmap.residency import Residency
from tenantry.urls import libpq_conninfo

ME, OTHERS = "acme", {"globex", "initech"}


@pytest.fixture(params=[True, False], ids=["with-begin", "apart"])
def with_begin(request: pytest.FixtureRequest) -> bool:
    on: bool = request.param
    return on


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tenants whose fence went in one message with BEGIN."""
    seen: list[str] = []
    original = fence._fence_with_begin

    def spy(driver: Any, info: dict[str, Any], cached: tuple[Any, ...]) -> str | None:
        seen.append(cached[0])
        return original(driver, info, cached)

    monkeypatch.setattr(fence, "_fence_with_begin", spy)
    return seen


def new_router(fleet: Any, with_begin: bool, router_class: type[Router] = Router) -> Router:
    settings = fleet.settings.model_copy(update={"fence_with_begin": with_begin})
    router = router_class(catalog=fleet.catalog, settings=settings, background=False)
    fleet._routers.append(router)
    return router


def test_the_setting_picks_the_path_and_rls_holds(
    pg_fleet: Any, app: Any, with_begin: bool, calls: list[str]
) -> None:
    router = new_router(pg_fleet, with_begin)
    for _ in range(2):  # a fresh connection, then a pooled one
        with router.session(ME) as session:
            raw = set(session.scalars(text("SELECT tenant_id FROM projects")))
            orm = {p.tenant_id for p in session.scalars(select(app.Project))}
            foreign = session.scalars(
                text("SELECT title FROM tasks WHERE tenant_id <> :me"), {"me": ME}
            )
            assert (raw, orm, foreign.all()) == ({ME}, {ME}, [])
            assert session.scalar(text("SELECT tenantry.tenant()")) == ME
            session.commit()  # the next transaction of the session is fenced again
            assert session.scalar(text("SELECT tenantry.tenant()")) == ME
        with router.connection("globex") as conn:
            assert set(conn.scalars(text("SELECT tenant_id FROM tasks"))) == {"globex"}
    assert calls == ([ME, ME, "globex"] * 2 if with_begin else [])


class _Serializable(Router):
    engine_factory = staticmethod(partial(make_engine, isolation_level="SERIALIZABLE"))


class _ReadOnly(Router):
    engine_factory = staticmethod(
        partial(make_engine, execution_options={"postgresql_readonly": True})
    )


@pytest.mark.parametrize(
    ("router_class", "isolation", "read_only"),
    [(_Serializable, "serializable", "off"), (_ReadOnly, "read committed", "on")],
    ids=["serializable", "read-only"],
)
def test_the_begin_carries_the_engines_characteristics(
    pg_fleet: Any, with_begin: bool, router_class: type[Router], isolation: str, read_only: str
) -> None:
    router = new_router(pg_fleet, with_begin, router_class)
    for _ in range(2):
        with router.session(ME) as session:
            found = session.execute(
                text(
                    "SELECT current_setting('transaction_isolation'), "
                    "current_setting('transaction_read_only'), tenantry.tenant()"
                )
            ).one()
            assert tuple(found) == (isolation, read_only, ME)


QUOTED = [
    "a'b",
    "a''; SELECT 1; --",
    "x\\'; DROP TABLE projects; --",
    "acme'); SELECT tenantry.fence('globex",
    "e\\\\n;\\",
]


@pytest.mark.parametrize("tenant", QUOTED)
def test_a_tenant_id_full_of_quotes_cannot_inject(
    pg_fleet: Any, with_begin: bool, tenant: str
) -> None:
    """Such ids break the naming rule: the router refuses them before any SQL. Past
    that check, the fence itself, given one, routes exactly that tenant: none."""
    router = new_router(pg_fleet, with_begin)
    with pytest.raises(InvalidName):
        with router.session(tenant):
            pass
    # Straight to the fence, on a routed connection: the id is one literal.
    engine = router.engine_for(ME)
    with engine.connect() as conn:
        conn.begin()
        try:
            fence.run_fence(conn, tenant, "shared-a")
        except Exception as exc:  # StaleRoute: no residency row for that id
            assert type(exc).__name__ == "StaleRoute", exc
        assert conn.scalar(text("SELECT tenantry.tenant()")) in (tenant, None)
        assert conn.scalar(text("SELECT count(*) FROM projects")) == 0
        conn.rollback()
    assert {row[0] for row in pg_fleet.rows("shared-a")} == {ME, *OTHERS}


def test_a_frozen_tenant_is_read_only(pg_fleet: Any, app: Any, with_begin: bool) -> None:
    router = new_router(pg_fleet, with_begin)
    pg_fleet.set_residency(ME, "shared-a", Residency.FROZEN)
    with router.session(ME) as session:
        assert session.frozen
        assert session.scalar(text("SELECT current_setting('transaction_read_only')")) == "on"
        assert len(session.scalars(select(app.Project)).all()) == 2
        with pytest.raises(TenantFrozen):
            session.execute(text("UPDATE projects SET name = 'x'"))
    pg_fleet.set_residency(ME, "shared-a", Residency.ACTIVE)
    with router.session(ME) as session:
        assert not session.frozen
        assert session.execute(text("UPDATE projects SET name = name")).rowcount == 2


def test_a_rotated_key_is_learned(pg_fleet: Any, with_begin: bool) -> None:
    router = new_router(pg_fleet, with_begin)
    with router.connection(ME) as conn:
        assert conn.scalar(text("SELECT tenantry.tenant()")) == ME
    first = router._fence_keys["shared-a"]
    pg_fleet.catalog.rotate_fence_key("shared-a", retire_previous=True)
    # the pooled connection's cached signature is refused (FenceRejected inside the
    # router), the key read again, the transaction begun again: no error shows
    with router.session(ME) as session:
        assert set(session.scalars(text("SELECT tenant_id FROM projects"))) == {ME}
    assert router._fence_keys["shared-a"].key_id > first.key_id


def test_a_terminated_backend_is_begun_again(pg_fleet: Any, with_begin: bool) -> None:
    router = new_router(pg_fleet, with_begin)
    with router.connection(ME) as conn:
        pid = conn.scalar(text("SELECT pg_backend_pid()"))
    admin = sa.create_engine(pg_fleet.shard("shared-a").admin_url, poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            assert conn.scalar(text("SELECT pg_terminate_backend(:p, 10000)"), {"p": pid})
    finally:
        admin.dispose()
    with router.session(ME) as session:  # the dead pooled connection, then a new one
        assert session.scalar(text("SELECT tenantry.tenant()")) == ME
        assert session.scalar(text("SELECT pg_backend_pid()")) != pid


def test_an_error_in_the_fence_is_psycopgs_and_leaves_a_usable_connection(
    pg_fleet: Any, with_begin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other error of the fence is raised as psycopg would (here: the function
    missing), and the rollback leaves the pooled connection fine for the next one."""
    router = new_router(pg_fleet, with_begin)  # its own engine: no fence cached yet
    monkeypatch.setattr(fence, "PG_FENCE", "SELECT tenantry.no_such(%(t)s, %(s)s)")
    monkeypatch.setattr(fence, "_FENCE_SQL", b"SELECT tenantry.no_such($1, $2)")
    with pytest.raises(Exception) as info:
        with router.session(ME):
            pass
    assert "tenantry.no_such(unknown, unknown) does not exist" in str(info.value)
    causes, error = [], info.value
    while error is not None:
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(type(e).__name__ == "UndefinedFunction" for e in causes), causes
    monkeypatch.undo()
    with router.session("globex") as session:  # the same pooled connection
        assert session.scalar(text("SELECT tenantry.tenant()")) == "globex"


# -- the asyncio router: the same one message, awaited through psycopg's own wait -------


@pytest.fixture
def async_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tenants whose fence went in one message with BEGIN on an asyncio router."""
    seen: list[str] = []
    original = fence._fence_with_begin_async

    def spy(driver: Any, info: dict[str, Any], cached: tuple[Any, ...]) -> str | None:
        seen.append(cached[0])
        return original(driver, info, cached)

    monkeypatch.setattr(fence, "_fence_with_begin_async", spy)
    return seen


def new_async_router(
    fleet: Any, with_begin: bool, router_class: type[AsyncRouter] = AsyncRouter
) -> AsyncRouter:
    settings = fleet.settings.model_copy(update={"fence_with_begin": with_begin})
    return router_class(catalog=fleet.catalog, settings=settings, background=False)


def test_async_the_setting_picks_the_path_and_rls_holds(
    pg_fleet: Any, app: Any, with_begin: bool, async_calls: list[str]
) -> None:
    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            for _ in range(2):  # a fresh connection, then a pooled one
                async with router.session(ME) as session:
                    raw = set(await session.scalars(text("SELECT tenant_id FROM projects")))
                    orm = {p.tenant_id for p in await session.scalars(select(app.Project))}
                    foreign = await session.scalars(
                        text("SELECT title FROM tasks WHERE tenant_id <> :me"), {"me": ME}
                    )
                    assert (raw, orm, foreign.all()) == ({ME}, {ME}, [])
                    assert await session.scalar(text("SELECT tenantry.tenant()")) == ME
                    await session.commit()  # the next transaction is fenced again
                    assert await session.scalar(text("SELECT tenantry.tenant()")) == ME
                async with router.connection("globex") as conn:
                    found = await conn.scalars(text("SELECT tenant_id FROM tasks"))
                    assert set(found) == {"globex"}

    asyncio.run(main())
    assert async_calls == ([ME, ME, "globex"] * 2 if with_begin else [])


class _AsyncSerializable(AsyncRouter):
    engine_factory = staticmethod(partial(make_async_engine, isolation_level="SERIALIZABLE"))


class _AsyncReadOnly(AsyncRouter):
    engine_factory = staticmethod(
        partial(make_async_engine, execution_options={"postgresql_readonly": True})
    )


@pytest.mark.parametrize(
    ("router_class", "isolation", "read_only"),
    [(_AsyncSerializable, "serializable", "off"), (_AsyncReadOnly, "read committed", "on")],
    ids=["serializable", "read-only"],
)
def test_async_the_begin_carries_the_engines_characteristics(
    pg_fleet: Any,
    with_begin: bool,
    router_class: type[AsyncRouter],
    isolation: str,
    read_only: str,
) -> None:
    async def main() -> list[tuple[Any, ...]]:
        seen = []
        async with new_async_router(pg_fleet, with_begin, router_class) as router:
            for _ in range(2):
                async with router.session(ME) as session:
                    found = await session.execute(
                        text(
                            "SELECT current_setting('transaction_isolation'), "
                            "current_setting('transaction_read_only'), tenantry.tenant()"
                        )
                    )
                    seen.append(tuple(found.one()))
        return seen

    assert asyncio.run(main()) == [(isolation, read_only, ME)] * 2


def test_async_a_frozen_tenant_is_read_only(pg_fleet: Any, app: Any, with_begin: bool) -> None:
    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            pg_fleet.set_residency(ME, "shared-a", Residency.FROZEN)
            async with router.session(ME) as session:
                assert session.sync_session.frozen
                setting = text("SELECT current_setting('transaction_read_only')")
                assert await session.scalar(setting) == "on"
                assert len((await session.scalars(select(app.Project))).all()) == 2
                with pytest.raises(TenantFrozen):
                    await session.execute(text("UPDATE projects SET name = 'x'"))
            pg_fleet.set_residency(ME, "shared-a", Residency.ACTIVE)
            async with router.session(ME) as session:
                assert not session.sync_session.frozen
                updated = await session.execute(text("UPDATE projects SET name = name"))
                assert updated.rowcount == 2  # type: ignore[attr-defined]

    asyncio.run(main())


def test_async_a_stale_route_is_refused_and_rerouted(pg_fleet: Any, with_begin: bool) -> None:
    """A residency row that says the tenant left: StaleRoute from the one-message
    fence, and a router with nowhere else to go raises it."""

    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            async with router.session(ME) as session:  # a pooled connection, fenced
                assert await session.scalar(text("SELECT tenantry.tenant()")) == ME
            pg_fleet.set_residency(ME, "shared-a", Residency.MOVED)
            try:
                with pytest.raises(StaleRoute):
                    async with router.session(ME):
                        pass
            finally:
                pg_fleet.set_residency(ME, "shared-a", Residency.ACTIVE)
            async with router.session("globex") as session:  # the same pool, fine
                assert await session.scalar(text("SELECT tenantry.tenant()")) == "globex"

    asyncio.run(main())


def test_async_a_rotated_key_is_learned(pg_fleet: Any, with_begin: bool) -> None:
    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            async with router.connection(ME) as conn:
                assert await conn.scalar(text("SELECT tenantry.tenant()")) == ME
            first = router._fence_keys["shared-a"]
            await asyncio.to_thread(
                pg_fleet.catalog.rotate_fence_key, "shared-a", retire_previous=True
            )
            # the cached signature is refused, the key read again, the transaction
            # begun again: no error shows
            async with router.session(ME) as session:
                found = await session.scalars(text("SELECT tenant_id FROM projects"))
                assert set(found) == {ME}
            assert router._fence_keys["shared-a"].key_id > first.key_id

    asyncio.run(main())


def test_async_a_terminated_backend_is_begun_again(pg_fleet: Any, with_begin: bool) -> None:
    def terminate(pid: int) -> None:
        admin = sa.create_engine(pg_fleet.shard("shared-a").admin_url, poolclass=sa.NullPool)
        try:
            with admin.connect() as conn:
                assert conn.scalar(text("SELECT pg_terminate_backend(:p, 10000)"), {"p": pid})
        finally:
            admin.dispose()

    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            async with router.connection(ME) as conn:
                pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            await asyncio.to_thread(terminate, pid)
            async with router.session(ME) as session:  # the dead pooled one, then a new one
                assert await session.scalar(text("SELECT tenantry.tenant()")) == ME
                assert await session.scalar(text("SELECT pg_backend_pid()")) != pid

    asyncio.run(main())


def test_async_an_error_in_the_fence_is_psycopgs_and_leaves_a_usable_connection(
    pg_fleet: Any, with_begin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            monkeypatch.setattr(fence, "PG_FENCE", "SELECT tenantry.no_such(%(t)s, %(s)s)")
            monkeypatch.setattr(fence, "_FENCE_SQL", b"SELECT tenantry.no_such($1, $2)")
            with pytest.raises(Exception) as info:
                async with router.session(ME):
                    pass
            assert "tenantry.no_such(unknown, unknown) does not exist" in str(info.value)
            causes, error = [], info.value
            while error is not None:
                causes.append(error)
                error = error.__cause__ or error.__context__
            assert any(type(e).__name__ == "UndefinedFunction" for e in causes), causes
            monkeypatch.undo()
            async with router.session("globex") as session:  # the same pooled connection
                assert await session.scalar(text("SELECT tenantry.tenant()")) == "globex"

    asyncio.run(main())


@pytest.mark.parametrize(
    "value",
    ["nobody-here", "t-1_x", "", "a'b", "x\\'y", "é", "a b", "a;b", "\u0661", "a'); SELECT ('"],
)
def test_the_fence_hands_the_server_the_very_tenant(pg_fleet: Any, value: str) -> None:
    """The tenant travels as a bound parameter, so the server's fence gets exactly the
    string the router signed, whatever its characters (a valid signature: the fence
    sets it, and no residency row here makes it a stale route)."""
    router = new_router(pg_fleet, True)
    with router.engine_for(ME).connect() as conn:
        conn.begin()
        with pytest.raises(StaleRoute):
            fence.run_fence(conn, value, "shared-a")
        assert conn.scalar(text("SELECT current_setting('tenantry.tenant_id')")) == value
        assert conn.scalar(text("SELECT count(*) FROM projects")) == 0
        conn.rollback()


def test_no_signature_shows_in_pg_stat_activity(pg_fleet: Any, with_begin: bool) -> None:
    """The routing role sees the query text of its other sessions in
    ``pg_stat_activity``: a signature there (tenant, this backend) could be replayed
    by whatever SQL later runs on that pooled connection. A routed transaction idle
    after its fence shows no signature and no tenant id."""
    router = new_router(pg_fleet, with_begin)
    url = libpq_conninfo(pg_fleet.shard("shared-a").url)
    with router.session("globex") as theirs, psycopg.connect(url) as watcher:
        pid = theirs.connection().connection.driver_connection.info.backend_pid
        key = pg_fleet.catalog.fence_key("shared-a")
        secret = key.sign("globex", pid).split(":")[1]
        (query,) = watcher.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        assert "tenantry.fence" in query  # the fence was its last statement
        assert secret not in query and "globex" not in query, query


def test_a_signature_seen_in_pg_stat_activity_cannot_be_replayed(
    pg_fleet: Any, with_begin: bool
) -> None:
    """The attack the test above guards against, end to end: SQL running as the routing
    role (an injection in acme's request) watches ``pg_stat_activity`` while globex's
    transaction is idle after its fence, and later, on the same pooled connection,
    calls the fence with whatever it saw there. It must still see none of globex."""
    router = new_router(pg_fleet, with_begin)
    url = libpq_conninfo(pg_fleet.shard("shared-a").url)
    with router.session("globex") as theirs, psycopg.connect(url) as watcher:
        pid = theirs.connection().connection.driver_connection.info.backend_pid
        (seen,) = watcher.execute(
            "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    with router.session(ME) as session:
        conn = session.connection()
        assert conn.connection.driver_connection.info.backend_pid == pid  # the same one
        for candidate in re.findall(r"'([0-9]+:[0-9a-f]{64})'", seen):
            with pytest.raises(sa.exc.DBAPIError), conn.begin_nested():
                conn.execute(text("SELECT tenantry.fence('globex', :s)"), {"s": candidate})
        assert set(session.scalars(text("SELECT tenant_id FROM projects"))) == {ME}


def test_async_no_signature_shows_in_pg_stat_activity(pg_fleet: Any, with_begin: bool) -> None:
    """The same on an asyncio router."""
    url = libpq_conninfo(pg_fleet.shard("shared-a").url)
    key = pg_fleet.catalog.fence_key("shared-a")

    async def main() -> None:
        async with new_async_router(pg_fleet, with_begin) as router:
            async with router.session("globex") as theirs:
                conn = await theirs.connection()
                raw = await conn.get_raw_connection()
                pid = raw.driver_connection.info.backend_pid
                with psycopg.connect(url) as watcher:
                    (query,) = watcher.execute(
                        "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                assert "tenantry.fence" in query
                secret = key.sign("globex", pid).split(":")[1]
                assert secret not in query and "globex" not in query, query

    asyncio.run(main())
