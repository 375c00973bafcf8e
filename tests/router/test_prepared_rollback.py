"""A routed transaction's ROLLBACK keeps psycopg's prepared statements (issue 17).

psycopg forgets the statements it prepared at every ``rollback()`` (``DEALLOCATE
ALL``) and counts executions towards ``prepare_threshold`` from zero again, so on a
connection whose transactions end in a rollback nothing is ever prepared. A router's
engines send the ROLLBACK themselves (``fence.rollback_keeping_prepared``): the
statements stay prepared, as after a COMMIT. What must hold: each tenant still sees
its own rows only through a prepared statement (its plan, custom or generic, holds no
tenant), and a connection lost before the ROLLBACK is ``ShardUnavailable`` with the
router going on, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tenantry import AsyncRouter
from tenantry.errors import ShardUnavailable
from tenantry.router.fence import _unusual
from tenantry.shardmap.drivers import make_engine

SHARD = "own"
TENANTS = ("acme", "globex")
#: More than psycopg's prepare_threshold (5) and the server's five custom plans, so the
#: last executions run a prepared statement's generic plan.
ROUNDS = 16
PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
PROJECTS = sa.table("projects", sa.column("tenant_id"), sa.column("id"))


@pytest.fixture
def own_fleet(pg_fleet_builder: Any, own_pg_server: Any) -> Any:
    fleet = pg_fleet_builder(pool_size_shared=2, max_overflow=0)
    fleet.add_shard(SHARD, admin_url=own_pg_server.new_database())
    for tenant in TENANTS:
        fleet.add_tenant(tenant, SHARD)
    fleet.server = own_pg_server
    fleet.database = fleet.location(SHARD)
    return fleet


def _seen(rows: list[Any]) -> set[str]:
    return {row.tenant_id for row in rows}


def test_a_rollback_keeps_prepared_statements_and_each_tenant_its_rows(
    own_fleet: Any, app: Any
) -> None:
    router = own_fleet.new_router()
    for n in range(ROUNDS):
        tenant = TENANTS[n % 2]
        with router.session(tenant) as session:  # leaving the block rolls back
            orm = session.scalars(select(app.Project).order_by(app.Project.id)).all()
            core = session.execute(select(PROJECTS.c.tenant_id, PROJECTS.c.id)).all()
            raw = session.execute(text("SELECT tenant_id FROM tasks")).all()
            assert [p.id for p in orm] == [1, 2], n
            assert (_seen(orm), _seen(core), _seen(raw)) == ({tenant}, {tenant}, {tenant}), n
    with router.session(TENANTS[0]) as session:
        kept = session.scalar(text(PREPARED))
    # One connection served every session (one thread), and its statements stayed
    # prepared across the rollbacks: the ORM's, Core's and the raw one.
    assert kept is not None and kept >= 3

    # psycopg's own rollback, for contrast: a plain engine (no fence, so no rows).
    plain = make_engine(own_fleet.shard(SHARD).url, pool_size=1)
    try:
        for _ in range(ROUNDS):
            with Session(plain) as session:
                session.execute(select(PROJECTS.c.id)).all()
        with Session(plain) as session:
            assert session.scalar(text(PREPARED)) == 0
    finally:
        plain.dispose()


def test_the_async_router_keeps_them_too(own_fleet: Any, app: Any) -> None:
    async def run() -> int | None:
        router = AsyncRouter(catalog=own_fleet.catalog, background=False)
        try:
            for n in range(ROUNDS):
                tenant = TENANTS[n % 2]
                async with router.session(tenant) as session:
                    result = await session.scalars(select(app.Project).order_by(app.Project.id))
                    orm = result.all()
                    raw = (await session.execute(text("SELECT tenant_id FROM tasks"))).all()
                    assert [p.id for p in orm] == [1, 2], n
                    assert (_seen(orm), _seen(raw)) == ({tenant}, {tenant}), n
            async with router.session(TENANTS[0]) as session:
                kept: int | None = await session.scalar(text(PREPARED))
                return kept
        finally:
            await router.close()

    kept = asyncio.run(run())
    assert kept is not None and kept >= 2


def test_a_connection_lost_before_the_rollback_is_shard_unavailable(own_fleet: Any) -> None:
    """The backend is terminated after the block's last statement: the ROLLBACK on
    leaving meets the dead connection. ShardUnavailable naming the shard, the
    connection invalidated, and the next transaction works (sync and asyncio)."""
    server, database = own_fleet.server, own_fleet.database
    router = own_fleet.new_router()

    with pytest.raises(ShardUnavailable) as info:
        with router.session("acme") as session:
            assert session.execute(select(PROJECTS.c.id)).all()
            server.terminate(database)
    assert info.value.shard == SHARD  # type: ignore[attr-defined]
    assert "lost during the transaction" in str(info.value)
    with router.session("globex") as session:
        assert _seen(session.execute(select(PROJECTS.c.tenant_id)).all()) == {"globex"}

    async def run() -> None:
        router = AsyncRouter(catalog=own_fleet.catalog, background=False)
        try:
            with pytest.raises(ShardUnavailable) as info:
                async with router.session("acme") as session:
                    assert (await session.execute(select(PROJECTS.c.id))).all()
                    await asyncio.to_thread(server.terminate, database)
            assert info.value.shard == SHARD  # type: ignore[attr-defined]
            async with router.session("globex") as session:
                rows = (await session.execute(select(PROJECTS.c.tenant_id))).all()
                assert _seen(rows) == {"globex"}
        finally:
            await router.close()

    asyncio.run(run())


def test_a_plan_gone_stale_fails_once_not_for_ever(own_fleet: Any) -> None:
    """A migration changes a column's type under a prepared statement: its next run on
    that connection fails ("cached plan must not change result type"). The failed
    transaction's rollback is psycopg's own, which forgets the prepared statements, so
    the next transaction on the same connection plans afresh and works, rather than
    failing the same way for as long as the connection lives."""
    from tenantry.shardmap.operations import operator_transaction

    projects = sa.table("projects", sa.column("tenant_id"), sa.column("id"), sa.column("name"))
    names = select(projects.c.tenant_id, projects.c.name)
    router = own_fleet.new_router()
    for n in range(ROUNDS):
        with router.session(TENANTS[n % 2]) as session:
            assert _seen(session.execute(names).all()) == {TENANTS[n % 2]}
    with router.session("acme") as session:
        assert (session.scalar(text(PREPARED)) or 0) >= 1
    with operator_transaction(own_fleet.shard(SHARD)) as conn:
        conn.exec_driver_sql("ALTER TABLE projects ALTER COLUMN name TYPE text")
    with pytest.raises(sa.exc.DBAPIError) as info:
        with router.session("acme") as session:
            session.execute(names).all()
    assert "cached plan must not change result type" in str(info.value)
    for n in range(ROUNDS):  # the same connection (one thread), prepared again on the way
        tenant = TENANTS[n % 2]
        with router.session(tenant) as session:
            assert _seen(session.execute(names).all()) == {tenant}, n


def test_the_states_left_to_psycopgs_rollback_are_seen_on_the_installed_psycopg(
    pg_url: str,
) -> None:
    """``rollback_keeping_prepared`` leaves a transaction to psycopg's own rollback in
    states only psycopg's private attributes show (``_num_transactions``,
    ``_pipeline``, ``_tpc``, read with defaults): were one renamed, the check would stop
    seeing its state without any error. So each state is made here on a real
    connection and must be seen, and an ordinary transaction must not."""
    url = sa.make_url(pg_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        assert _unusual(conn), "an idle connection has no transaction of ours to end"
        conn.execute("SELECT 1")
        assert not _unusual(conn), "an ordinary transaction is ours to roll back"
        with conn.transaction():
            assert _unusual(conn), "inside psycopg's transaction() block"
        assert not _unusual(conn)
        with conn.pipeline():
            assert _unusual(conn), "in pipeline mode"
        conn.rollback()
        conn.tpc_begin(conn.xid(1, "tenantry", "check"))
        conn.execute("SELECT 1")
        assert _unusual(conn), "in a two-phase transaction"
        conn.tpc_rollback()
        conn.close()
        assert _unusual(conn), "a closed connection"
