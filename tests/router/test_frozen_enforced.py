"""Frozen tenants are read-only because the shard says so, not the client.

While a move has a tenant frozen on a shard, no write to its rows may commit there,
whatever SQL the application sends through the router: a raw ``COMMIT`` ends the
fenced (read-only) transaction, and what follows must still be refused — by the
policies' ``tenantry.writable_tenant()`` (SQLSTATE 25006, raised as TenantFrozen), or
by row-level security admitting nothing (42501, or no row matched). Reads go on.
Shared and dedicated PostgreSQL shards alike, routed as ``app``, a NOSUPERUSER
NOBYPASSRLS role that owns nothing; the superuser is the operations role.

The freeze is the residency row a move writes (``frozen``), set here with the
catalog's ``set_residency`` helper. Then the real thing: a mover process paused after
its freeze, SIGKILLed there, and ``tenantry moves resume`` or ``moves abort``: writes
work again through the router, and every acknowledged row is at exactly one home.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text

from tenantry import Catalog, Router, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import User
from tenantry.errors import TenantFrozen
from tenantry.migrations import upgrade
from tenantry.shardmap.catalog import set_residency
from tenantry.shardmap.residency import Residency
from tenantry.testing import DatabaseFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moves"))
from movefleet import (
    Fleet,
    assert_one_home,
    count_rows,
    residency,
    run_cli,
    seed,
    sigkill,
    start_paused,
    tenant_rows,
    write_one,
)

APP_ROLE = "app"  # tests/router/conftest.py's app_role fixture makes it on every server
USERS, CHARGERS, SESSIONS = 5, 4, 40
TOTAL = USERS + CHARGERS + SESSIONS
#: tier -> (tenant, its shard, the move's target, a neighbor on its shard or None)
LAYOUT = {
    "shared": ("acme", "s1", "s2", "neighbor"),
    "dedicated": ("solo", "d1", "d2", None),
}

INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_TRANSACTION = "25006"
ACTIVE_SQL_TRANSACTION = "25001"
#: How a write may be refused once a raw COMMIT ended the fenced transaction: the next
#: transaction acts for no tenant (the fence's token was bound to the one that ended),
#: so the policies admit nothing, or the freeze refuses it.
REFUSED_AFTER_COMMIT = {
    "TenantFrozen",
    READ_ONLY_TRANSACTION,
    INSUFFICIENT_PRIVILEGE,
    "no row matched",
}


def routing_url(admin_url: str) -> str:
    return (
        sa.make_url(admin_url)
        .set(username=APP_ROLE, password=None)
        .render_as_string(hide_password=False)
    )


def build(dbs: DatabaseFactory, tiers: tuple[str, ...] = ("shared", "dedicated")) -> Fleet:
    """A PostgreSQL catalog and, per tier, the tenant's shard (server 0) and a move
    target (server 1), the demo schema migrated by the fleet run. ``Fleet.urls`` are
    the operations role's: movefleet's checks read every tenant's rows with them."""
    catalog_url = dbs(0)
    settings = load_settings(
        catalog_url=catalog_url,
        alembic_config=str(MIGRATIONS),
        freeze_timeout=10.0,
        connect_timeout=2,
        pool_size_shared=2,
        pool_size_dedicated=2,
        max_overflow=2,
        pool_timeout=5,
    )
    catalog = Catalog(settings=settings)
    catalog.init()
    urls = {}
    for tier in tiers:
        _tenant, home, target, _neighbor = LAYOUT[tier]
        for name, server in ((home, 0), (target, 1)):
            urls[name] = dbs(server)
            catalog.add_shard(name, routing_url(urls[name]), admin_url=urls[name], tier=tier)
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    fleet = Fleet(catalog, catalog_url, urls)
    for tier in tiers:
        tenant, home, _target, neighbor = LAYOUT[tier]
        engine = fleet.engine(home)
        for name in (tenant, neighbor):
            if name is not None:
                catalog.add_tenant(name, tier=tier, shard=home)
                seed(engine, name, users=USERS, chargers=CHARGERS, sessions=SESSIONS)
        engine.dispose()
    return fleet


def new_router(fleet: Fleet) -> Router:
    return Router(
        fleet.catalog_url, settings=fleet.catalog.settings, listen=False, background=False
    )


def rows_at(fleet: Fleet, shard: str, tenant: str) -> dict[str, list[tuple[object, ...]]]:
    engine = fleet.engine(shard)
    try:
        return tenant_rows(engine, tenant)
    finally:
        engine.dispose()


def freeze(fleet: Fleet, shard: str, tenant: str, state: Residency = Residency.FROZEN) -> None:
    """Write the tenant's residency on *shard* as a move's freeze does (and undoes)."""
    catalog = fleet.catalog
    set_residency(catalog.get_shard(shard), tenant, state, catalog.map_version(), catalog.settings)


# -- the writes ----------------------------------------------------------------------------

WRITES = {
    "insert": "INSERT INTO users (tenant_id, id, email, name)"
    " VALUES (:t, 990, 'late@example.test', 'late')",
    "update": "UPDATE chargers SET name = 'changed' WHERE tenant_id = :t",
    "delete": "DELETE FROM charging_sessions WHERE tenant_id = :t",
    "merge": "MERGE INTO chargers c USING (SELECT CAST(:t AS text) AS t, 1 AS id) AS x"
    " ON c.tenant_id = x.t AND c.id = x.id WHEN MATCHED THEN UPDATE SET name = 'merged'"
    " WHEN NOT MATCHED THEN INSERT (tenant_id, id, name, location, power_kw, status)"
    " VALUES (x.t, x.id, 'merged', 'bay', 1, 'available')",
}

#: How the application's SQL tries to get out of the fenced read-only transaction.
ESCAPES = {
    # no escape: the fenced transaction itself (read-only, and the policies refuse)
    "fenced": [],
    # a raw COMMIT: the next statement runs in a new transaction no fence began
    "raw-commit": ["COMMIT"],
    "raw-rollback": ["ROLLBACK"],
    # the signature kept session-wide first, so the new transaction still "is" the
    # tenant (a replay on the same backend for the same tenant verifies): the
    # residency check of the write policies is what must refuse
    "raw-commit-signature-kept": [
        "SELECT set_config('tenantry.signature', current_setting('tenantry.signature'),"
        " false), set_config('tenantry.tenant_id', current_setting('tenantry.tenant_id'),"
        " false)",
        "COMMIT",
    ],
    # and read-write made the default for the backend's next transactions
    "raw-commit-read-write-default": [
        "SELECT set_config('tenantry.signature', current_setting('tenantry.signature'),"
        " false), set_config('tenantry.tenant_id', current_setting('tenantry.tenant_id'),"
        " false)",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "COMMIT",
        "SET TRANSACTION READ WRITE",
    ],
}


def attempt(x: Any, sql: str, tenant: str) -> str:
    """Try one write (in a savepoint, so that the next one may follow); say how it was
    refused. A write that changed rows fails the test."""
    x.execute(text("SAVEPOINT frozen_write"))
    try:
        result = x.execute(text(sql), {"t": tenant})
    except TenantFrozen:
        outcome = "TenantFrozen"
    except sa.exc.DBAPIError as exc:
        state = getattr(exc.orig, "sqlstate", None)
        assert state in (READ_ONLY_TRANSACTION, INSUFFICIENT_PRIVILEGE), exc
        outcome = str(state)
    else:
        assert result.rowcount == 0, f"{sql!r} changed {result.rowcount} row(s) of a frozen tenant"
        outcome = "no row matched"
    x.execute(text("ROLLBACK TO SAVEPOINT frozen_write"))
    return outcome


@dataclass
class Frozen:
    fleet: Fleet
    router: Router
    tier: str
    tenant: str
    shard: str
    neighbor: str | None


@pytest.fixture(scope="module")
def _frozen_fleet(pg_servers: list[str], app_role: str) -> Iterator[Fleet]:
    with DatabaseFactory(pg_servers) as dbs:
        fleet = build(dbs)
        try:
            yield fleet
        finally:
            fleet.close()


@pytest.fixture(params=list(LAYOUT))
def frozen(request: pytest.FixtureRequest, _frozen_fleet: Fleet) -> Iterator[Frozen]:
    """The tier's tenant, frozen on its shard; unfrozen again afterwards."""
    tenant, shard, _target, neighbor = LAYOUT[request.param]
    freeze(_frozen_fleet, shard, tenant)
    router = new_router(_frozen_fleet)
    try:
        yield Frozen(_frozen_fleet, router, request.param, tenant, shard, neighbor)
    finally:
        router.close()
        freeze(_frozen_fleet, shard, tenant, Residency.ACTIVE)


# -- frozen: the shard refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    "escape",
    [name for name in ESCAPES],
)
@pytest.mark.parametrize("path", ["session", "connection"])
def test_raw_writes_of_a_frozen_tenant_are_refused(frozen: Frozen, path: str, escape: str) -> None:
    before = rows_at(frozen.fleet, frozen.shard, frozen.tenant)
    assert sum(len(v) for v in before.values()) == TOTAL
    outcomes = {}
    for name, sql in WRITES.items():
        routed = (
            frozen.router.session(frozen.tenant)
            if path == "session"
            else frozen.router.connection(frozen.tenant)
        )
        try:
            with routed as x:
                if path == "session":
                    assert x.frozen
                for statement in ESCAPES[escape]:
                    x.execute(text(statement))
                outcomes[name] = attempt(x, sql, frozen.tenant)
                if path == "session":
                    x.commit()
        except TenantFrozen:
            outcomes.setdefault(name, "TenantFrozen at commit")
        except sa.exc.DBAPIError as exc:  # the block's commit of a failed transaction
            assert name in outcomes, exc
    assert set(outcomes) == set(WRITES)
    if escape == "fenced":
        # the transaction acts for the tenant: the freeze itself must refuse, loudly
        assert set(outcomes.values()) <= {"TenantFrozen", READ_ONLY_TRANSACTION}, outcomes
    elif escape.startswith("raw-commit-"):
        # out of the fenced transaction, even with its settings kept session-wide, the
        # next transaction acts for no tenant: the token was bound to the one that ended
        assert set(outcomes.values()) <= REFUSED_AFTER_COMMIT, outcomes
    assert rows_at(frozen.fleet, frozen.shard, frozen.tenant) == before, outcomes


@pytest.mark.parametrize("tier", list(LAYOUT))
def test_a_transaction_begun_before_the_freeze_cannot_write_after_it(
    _frozen_fleet: Fleet, tier: str
) -> None:
    """The freeze commits while a routed transaction (fenced as active, so not
    read-only) is open: its next write is refused by the shard, as TenantFrozen."""
    fleet = _frozen_fleet
    tenant, shard, _target, _neighbor = LAYOUT[tier]
    router = new_router(fleet)
    try:
        before = rows_at(fleet, shard, tenant)
        with router.session(tenant) as session:
            assert not session.frozen
            assert session.execute(text("SELECT count(*) FROM users")).scalar_one() == USERS
            freeze(fleet, shard, tenant)
            outcomes = {name: attempt(session, sql, tenant) for name, sql in WRITES.items()}
            assert set(outcomes.values()) == {"TenantFrozen"}, outcomes
            session.add(User(id=993, email="late@example.test", name="late"))
            with pytest.raises(TenantFrozen):
                session.commit()
        assert rows_at(fleet, shard, tenant) == before
    finally:
        router.close()
        freeze(fleet, shard, tenant, Residency.ACTIVE)


def test_orm_writes_of_a_frozen_tenant_raise_tenant_frozen(frozen: Frozen) -> None:
    before = rows_at(frozen.fleet, frozen.shard, frozen.tenant)
    with frozen.router.session(frozen.tenant) as session:
        session.add(User(id=991, email="late@example.test", name="late"))
        with pytest.raises(TenantFrozen) as info:
            session.commit()
        assert info.value.retryable
    with frozen.router.session(frozen.tenant) as session:
        session.execute(text("COMMIT"))
        session.add(User(id=992, email="late@example.test", name="late"))
        with pytest.raises((TenantFrozen, sa.exc.DBAPIError)):
            session.commit()
    assert rows_at(frozen.fleet, frozen.shard, frozen.tenant) == before


def test_reads_keep_working_during_the_freeze(frozen: Frozen) -> None:
    expected = rows_at(frozen.fleet, frozen.shard, frozen.tenant)
    with frozen.router.session(frozen.tenant) as session:
        assert session.frozen
        users = session.scalars(select(User).order_by(User.id)).all()
        assert [u.id for u in users] == list(range(1, USERS + 1))
        counts = {
            table: session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in expected
        }
        assert counts == {table: len(found) for table, found in expected.items()}
    with frozen.router.connection(frozen.tenant) as conn:
        found = conn.execute(text("SELECT tenant_id, id FROM chargers ORDER BY id")).all()
        assert [tuple(r) for r in found] == [(frozen.tenant, i) for i in range(1, CHARGERS + 1)]


@pytest.mark.parametrize("frozen", ["shared"], indirect=True)  # dedicated: no neighbour
def test_other_tenants_of_the_shard_still_write(frozen: Frozen) -> None:
    assert frozen.neighbor is not None
    with frozen.router.session(frozen.neighbor) as session:
        assert not session.frozen
        session.execute(text("UPDATE users SET name = name || '!' WHERE id = 1"))
        session.commit()
    with frozen.router.session(frozen.neighbor) as session:
        assert session.execute(text("SELECT name FROM users WHERE id = 1")).scalar() == "User 1!"
        session.execute(text("UPDATE users SET name = 'User 1' WHERE id = 1"))
        session.commit()


def test_a_temporary_residency_table_cannot_be_made(frozen: Frozen) -> None:
    """A temporary table named like the residency, searched first, would be the
    attacker's own residency: the routing role may make no temporary object on any
    PostgreSQL shard (and the fence's functions name the real table with its schema)."""
    before = rows_at(frozen.fleet, frozen.shard, frozen.tenant)
    with frozen.router.session(frozen.tenant) as session:
        # out of the read-only fenced transaction first, the signature kept
        for statement in ESCAPES["raw-commit-read-write-default"]:
            session.execute(text(statement))
        with pytest.raises(sa.exc.DBAPIError) as refused:
            session.execute(
                text("CREATE TEMP TABLE tenantry_residency (tenant_id text, state text)")
            )
        assert refused.value.orig.sqlstate == INSUFFICIENT_PRIVILEGE  # type: ignore[union-attr]
    assert rows_at(frozen.fleet, frozen.shard, frozen.tenant) == before


def test_unfrozen_the_tenant_writes_again(frozen: Frozen) -> None:
    freeze(frozen.fleet, frozen.shard, frozen.tenant, Residency.ACTIVE)
    with frozen.router.session(frozen.tenant) as session:
        assert not session.frozen
        assert session.execute(text(WRITES["update"]), {"t": frozen.tenant}).rowcount == CHARGERS
        session.rollback()
    with frozen.router.connection(frozen.tenant) as conn:
        conn.execute(text(WRITES["insert"]), {"t": frozen.tenant})
        conn.execute(text("DELETE FROM users WHERE id = 990"))


# -- a real mover, killed during its freeze ------------------------------------------------------


def kill_mover_at(fleet: Fleet, tmp_path: Path, checkpoint: str, *args: str) -> None:
    """Start ``tenantry ARGS``, wait until it sleeps at *checkpoint*, SIGKILL it."""
    sigkill(start_paused(fleet, tmp_path, checkpoint, *args))


@pytest.fixture
def move_dbs(pg_servers: list[str], app_role: str) -> Iterator[DatabaseFactory]:
    with DatabaseFactory(pg_servers) as dbs:
        yield dbs


@pytest.mark.parametrize("then", ["resume", "abort"])
@pytest.mark.parametrize("tier", list(LAYOUT))
def test_mover_killed_in_its_freeze_then_writes_come_back(
    move_dbs: DatabaseFactory, tmp_path: Path, tier: str, then: str
) -> None:
    tenant, source, target, neighbor = LAYOUT[tier]
    fleet = build(move_dbs, (tier,))
    router = new_router(fleet)
    try:
        assert write_one(router, tenant, 800_001) == source  # acknowledged before the move
        acknowledged = rows_at(fleet, source, tenant)
        neighbor_rows = rows_at(fleet, source, neighbor) if neighbor else None

        # "copied" is committed after the freeze step (the wait-out included) and before
        # the copy: the source residency is frozen, nothing is on the target yet.
        kill_mover_at(
            fleet, tmp_path, "copied", "move", tenant, "--to", target, "--mode", "offline"
        )
        engine = fleet.engine(source)
        assert residency(engine, tenant) == "frozen"
        engine.dispose()

        # The mover is dead; the freeze holds, enforced by the shard.
        with router.session(tenant) as session:
            assert session.execute(text("SELECT count(*) FROM users")).scalar_one() == USERS
            session.execute(text(ESCAPES["raw-commit-signature-kept"][0]))
            session.execute(text("COMMIT"))
            outcomes = {name: attempt(session, sql, tenant) for name, sql in WRITES.items()}
            assert set(outcomes.values()) <= REFUSED_AFTER_COMMIT, outcomes
        with router.session(tenant) as session:
            session.execute(text("COMMIT"))
            outcomes = {name: attempt(session, sql, tenant) for name, sql in WRITES.items()}
        with pytest.raises(TenantFrozen):
            write_one(router, tenant, 800_002)
        assert rows_at(fleet, source, tenant) == acknowledged

        (record,) = json.loads(run_cli(fleet, tmp_path, "moves", "list", "--live", "--json").stdout)
        assert (record["tenant"], record["state"]) == (tenant, "copied")
        if then == "resume":
            done = run_cli(fleet, tmp_path, "moves", "resume", str(record["id"]))
            home = target
        else:
            done = run_cli(fleet, tmp_path, "moves", "abort", str(record["id"]))
            home = source
        assert done.returncode == 0, done.stdout + done.stderr

        # Writable again, at its one home, through a router that had the old map.
        assert write_one(router, tenant, 800_003) == home
        with router.connection(tenant) as conn:
            conn.execute(text(WRITES["update"]), {"t": tenant})
        now = rows_at(fleet, home, tenant)
        assert [r for r in now["charging_sessions"] if r[1] == 800_003]
        assert sum(len(v) for v in now.values()) == TOTAL + 2
        assert {r[1] for r in now["charging_sessions"]} == {
            r[1] for r in acknowledged["charging_sessions"]
        } | {800_003}
        assert now["users"] == acknowledged["users"]
        assert_one_home(fleet, tenant, now)
        if neighbor:
            assert rows_at(fleet, source, neighbor) == neighbor_rows
        other = target if home == source else source
        engine = fleet.engine(other)
        assert count_rows(engine, tenant) == 0
        engine.dispose()
    finally:
        router.close()
        fleet.close()
