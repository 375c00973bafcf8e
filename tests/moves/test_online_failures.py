"""Online moves that must stop, bounded and saying why.

A TRUNCATE after the cut, a column added on the source only during the initial copy,
the source server stopped during it, tables logical replication cannot carry, two
catalogs whose shards share servers, and a transaction older than the freeze. Each
ends in a correct move or a clean refusal or rollback: the moving tenant's and a
neighbour's rows are compared at both ends before and after, never a difference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import suppress

import psycopg
import pytest
import sqlalchemy as sa
from movefleet import (
    AtCheckpoint,
    Fleet,
    assert_one_home,
    build_fleet,
    count_rows,
    replication_objects,
    residency,
    seed,
)
from movefleet import tenant_rows as _tenant_rows

from tenantry import moves
from tenantry.errors import (
    FreezeBudgetExceeded,
    FreezeTimeout,
    MoveRefused,
    ReplicationFailed,
    VerificationFailed,
)
from tenantry.migrations import upgrade
from tenantry.moves import MoveState, collect_garbage
from tenantry.testing import TempPostgres, create_database

Rows = dict[str, list[tuple[object, ...]]]


def _fleet(make_pg_database, **settings: object) -> Fleet:
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
        move_stall_timeout=5.0,
        **settings,
    )
    for tenant, sessions in (("acme", 30), ("neighbor", 10)):
        built.catalog.add_tenant(tenant, shard="s1")
        engine = built.engine("s1")
        seed(engine, tenant, sessions=sessions)
        engine.dispose()
    return built


def _cleanup(fleet: Fleet) -> None:
    for live in moves.list_moves(fleet.catalog, live=True):
        with suppress(Exception):  # the test's own failure is what matters
            moves.abort(fleet.catalog, live.id)
    collect_garbage(fleet.catalog, apply=True)
    fleet.close()


@pytest.fixture
def fleet(make_pg_database) -> Iterator[Fleet]:
    """s1 (server 0) and s2 (server 1); acme and neighbor on s1, with rows."""
    built = _fleet(make_pg_database)
    try:
        yield built
    finally:
        _cleanup(built)


def rows(fleet: Fleet, shard: str, tenant: str) -> Rows:
    engine = fleet.engine(shard)
    try:
        return _tenant_rows(engine, tenant)
    finally:
        engine.dispose()


def _sql(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def assert_rolled_back(fleet: Fleet, tenant: str, expected: Rows, neighbor: Rows) -> None:
    """Nothing moved: the tenant's rows at s1 as expected and none at s2, the neighbour
    untouched, no live move, and nothing of logical replication left anywhere."""
    assert assert_one_home(fleet, tenant, expected) == "s1"
    assert rows(fleet, "s1", "neighbor") == neighbor
    assert not moves.list_moves(fleet.catalog, live=True)
    assert replication_objects(fleet) == set()


# -- item 4: TRUNCATE after the cut ------------------------------------------------------


def test_a_truncate_after_the_cut_is_seen_and_rolls_the_move_back(fleet):
    """The subscription never applies a TRUNCATE (it would empty every tenant's table at
    the target): the tail's own publication sees it, and the move stops."""
    # After the cut was verified, before the final freeze. (A TRUNCATE during the
    # cut's verification empties the snapshot's table too: the cut itself differs.)
    truncate = AtCheckpoint("frozen", lambda: _sql(fleet.urls["s1"], "TRUNCATE charging_sessions"))
    with pytest.raises(VerificationFailed) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=truncate)
    assert truncate.ran
    assert info.value.tables == ["public.charging_sessions"]
    assert "truncated on the source after the cut" in str(info.value)
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and not record.live
    assert "public.charging_sessions" in (record.error or "")
    # Journal first: the tail's publication was recorded (and is gone now).
    assert record.artifacts["tail_publication"] == record.artifacts["publication"] + "_tail"
    after = rows(fleet, "s1", "acme")
    assert after["charging_sessions"] == [] and after["users"]  # the truncate, nothing else
    assert_rolled_back(fleet, "acme", after, rows(fleet, "s1", "neighbor"))


def test_an_online_move_with_its_tail_publication_moves_the_tenant(fleet):
    """The tail's publication does not stand in the way of a correct move: it is made,
    decoded and dropped."""
    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    seen: list[set[tuple[str, str, str]]] = []
    look = AtCheckpoint("online-cut", lambda: seen.append(replication_objects(fleet)))
    done = moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=look)
    assert done.succeeded
    name = done.artifacts["publication"]
    assert name.startswith(f"tenantry_move_{fleet.catalog.fleet_id()}_")
    assert seen == [
        {
            ("s1", "publication", name),
            ("s1", "publication", f"{name}_tail"),
            ("s1", "slot", name),
            ("s1", "slot", f"{name}_tail"),
            ("s2", "subscription", name),
        }
    ]
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert rows(fleet, "s1", "neighbor") == neighbor
    assert replication_objects(fleet) == set()


# -- item 9: never a wait without a bound ------------------------------------------------


def test_a_column_added_on_the_source_during_the_initial_copy_stops_the_move(fleet):
    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    drift = AtCheckpoint(
        "online-subscribed",
        lambda: _sql(
            fleet.urls["s1"],
            "ALTER TABLE chargers ADD COLUMN extra int",
            # a change to replicate too, should the table's copy have finished already
            "UPDATE chargers SET name = name WHERE tenant_id = 'acme' AND id = 1",
        ),
    )
    began = time.monotonic()
    with pytest.raises(ReplicationFailed) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=drift)
    took = time.monotonic() - began
    assert drift.ran and took < 30, took
    message = str(info.value)
    assert "worker failed on the target shard 's2'" in message, message
    assert "'chargers'" in message and "the target lacks extra" in message, message
    assert message.endswith("the move was rolled back"), message
    assert "\n" not in message
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and not record.live
    assert record.error == message
    assert_rolled_back(fleet, "acme", before, neighbor)


class LockOnTarget:
    """At the subscription's start, hold an ACCESS EXCLUSIVE lock on the target's
    chargers, so that its table copy waits without an error; let go as soon as the
    mover starts rolling back (its deletes need the table)."""

    def __init__(self, fleet: Fleet) -> None:
        url = sa.make_url(fleet.urls["s2"]).set(drivername="postgresql")
        self.conn = psycopg.connect(url.render_as_string(hide_password=False))
        self.steps: list[str] = []

    def checkpoint(self, name: str) -> None:
        if name == "online-subscribed":
            self.conn.execute("LOCK TABLE chargers IN ACCESS EXCLUSIVE MODE")

    def step(self, move_id: int, state: str) -> None:
        self.steps.append(state)
        if state == "aborted":
            self.conn.rollback()

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def test_an_initial_copy_that_makes_no_progress_stops_within_the_stall_timeout(fleet):
    fleet.catalog.settings = fleet.catalog.settings.model_copy(update={"move_stall_timeout": 1.5})
    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    lock = LockOnTarget(fleet)
    began = time.monotonic()
    try:
        with pytest.raises(ReplicationFailed) as info:
            moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=lock, observer=lock)
    finally:
        lock.conn.close()
    took = time.monotonic() - began
    assert 1.5 < took < 20, took
    message = str(info.value)
    assert "replication made no progress for 1.5s" in message, message
    assert "from shard 's1' to shard 's2'" in message and "rolled back" in message
    assert lock.steps[-1] == "aborted"
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and record.error == message
    assert_rolled_back(fleet, "acme", before, neighbor)


@pytest.fixture
def far_server() -> Iterator[TempPostgres]:
    """A server of this test's own, which it stops."""
    server = TempPostgres.start(name="tenantry-far")
    try:
        yield server
    finally:
        server.stop()


def test_the_source_server_stopped_during_the_initial_copy_stops_the_move(fleet, far_server):
    fleet.catalog.add_shard("far", create_database(far_server.url), tier="shared")
    fleet.urls["far"] = fleet.catalog.get_shard("far").url
    run = upgrade(fleet.catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    fleet.catalog.add_tenant("remote", shard="far")
    engine = fleet.engine("far")
    seed(engine, "remote", sessions=10)
    engine.dispose()
    before = rows(fleet, "far", "remote")
    data_dir = far_server.data_dir

    def stop() -> None:
        far_server._pg_ctl("stop", "-m", "immediate", "-w")

    began = time.monotonic()
    with pytest.raises(ReplicationFailed) as info:
        moves.move(
            fleet.catalog,
            "remote",
            "s2",
            mode="online",
            hooks=AtCheckpoint("online-subscribed", stop),
        )
    took = time.monotonic() - began
    assert took < 30, took
    message = str(info.value)
    assert "cannot reach the source shard 'far'" in message, message
    assert not info.value.reachable
    (live,) = moves.list_moves(fleet.catalog, live=True)
    assert live.error == message and f"tenantry moves abort {live.id}" in message
    # Back up, the move is aborted: every row where it was, nothing at the target.
    far_server._pg_ctl("start", "-w", "-l", str(far_server.log_file))
    assert (data_dir / "postmaster.pid").exists()
    moves.abort(fleet.catalog, live.id)
    assert assert_one_home(fleet, "remote", before) == "far"
    assert count_rows(fleet.engine("s2"), "remote") == 0
    assert replication_objects(fleet) == set()


# -- item 10: tables logical replication cannot carry ------------------------------------


TABLES = {
    "partitioned": (
        "CREATE TABLE events (tenant_id text, id int, body text, PRIMARY KEY (tenant_id, id))"
        " PARTITION BY LIST (tenant_id)",
        "CREATE TABLE events_all PARTITION OF events DEFAULT",
    ),
    "unlogged": (
        "CREATE UNLOGGED TABLE events (tenant_id text, id int, body text,"
        " PRIMARY KEY (tenant_id, id))",
    ),
}


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_tables_replication_cannot_carry_make_auto_choose_offline(fleet, kind):
    for shard in ("s1", "s2"):
        _sql(fleet.urls[shard], *TABLES[kind])
    _sql(
        fleet.urls["s1"],
        "INSERT INTO events SELECT t, i, 'e' || i FROM generate_series(1, 5) AS i,"
        " (VALUES ('acme'), ('neighbor')) AS x(t)",
    )

    def events(shard: str, tenant: str) -> list[tuple[object, ...]]:
        engine = fleet.engine(shard)
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT * FROM events WHERE tenant_id = :t ORDER BY id"), {"t": tenant}
            ).all()
        engine.dispose()
        return [tuple(r) for r in found]

    why = {"partitioned": "is partitioned", "unlogged": "is UNLOGGED"}[kind]
    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    acme_events, neighbor_events = events("s1", "acme"), events("s1", "neighbor")
    with pytest.raises(MoveRefused) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online")
    assert f"cannot move online: table 'events' {why}" in str(info.value)
    assert moves.list_moves(fleet.catalog) == []  # nothing recorded
    assert replication_objects(fleet) == set()
    done = moves.move(fleet.catalog, "acme", "s2", mode="auto")
    assert done.succeeded and done.mode.value == "offline"
    assert f"table 'events' {why}" in done.options["mode_reason"]
    assert done.options["mode_reason"].startswith("offline: ")
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert events("s2", "acme") == acme_events and events("s1", "acme") == []
    assert rows(fleet, "s1", "neighbor") == neighbor
    assert events("s1", "neighbor") == neighbor_events
    assert replication_objects(fleet) == set()


# -- item 4 of the names: two catalogs on one pair of servers ----------------------------


@pytest.fixture
def other_fleet(make_pg_database) -> Iterator[Fleet]:
    """A second catalog whose shards live on the same two servers."""
    built = _fleet(make_pg_database)
    try:
        yield built
    finally:
        _cleanup(built)


def test_two_catalogs_on_one_pair_of_servers_never_touch_each_others_objects(fleet, other_fleet):
    assert fleet.catalog.fleet_id() != other_fleet.catalog.fleet_id()
    mine, theirs = rows(fleet, "s1", "acme"), rows(other_fleet, "s1", "acme")
    seen: dict[str, object] = {}

    def meanwhile() -> None:
        """Fleet A's move is live and replicating: B moves its own tenant (its first move
        too, id 1), then collects its garbage, applied. A's objects stay."""
        (live,) = moves.list_moves(fleet.catalog, live=True)
        seen["a_objects"] = replication_objects(fleet)
        seen["b_move"] = moves.move(other_fleet.catalog, "acme", "s2", mode="online")
        seen["b_gc"] = collect_garbage(other_fleet.catalog, apply=True)
        seen["a_after"] = replication_objects(fleet)
        seen["a_id"] = live.id

    done = moves.move(
        fleet.catalog, "acme", "s2", mode="online", hooks=AtCheckpoint("online-synced", meanwhile)
    )
    other = seen["b_move"]
    assert isinstance(other, moves.Move)
    assert done.id == other.id == 1  # the same move id in both catalogs
    assert done.artifacts["publication"] != other.artifacts["publication"]
    assert seen["b_gc"] == []
    a_objects = seen["a_objects"]
    assert isinstance(a_objects, set) and len(a_objects) == 3
    assert a_objects <= seen["a_after"]  # type: ignore[operator]
    assert done.succeeded and other.succeeded
    assert assert_one_home(fleet, "acme", mine) == "s2"
    assert assert_one_home(other_fleet, "acme", theirs) == "s2"
    assert replication_objects(fleet) == replication_objects(other_fleet) == set()


def test_gc_of_one_catalog_leaves_another_catalogs_live_and_old_style_objects(fleet, other_fleet):
    """A's move stopped live (its objects stay); B's gc, applied, drops nothing of A's —
    neither the fleet-id names nor an old-style name B never recorded."""

    class Stop(BaseException):  # the process dies here: no step's error handling runs
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        moves.move(
            fleet.catalog, "acme", "s2", mode="online", hooks=AtCheckpoint("online-synced", stop)
        )
    (live,) = moves.list_moves(fleet.catalog, live=True)
    _sql(
        fleet.urls["s1"],
        "SELECT pg_create_logical_replication_slot('tenantry_move_1', 'pgoutput')",
    )
    a_objects = replication_objects(fleet)
    assert ("s1", "slot", "tenantry_move_1") in a_objects and len(a_objects) == 4
    assert collect_garbage(other_fleet.catalog, apply=True) == []
    assert replication_objects(fleet) == a_objects
    # A's own gc keeps its live move's objects, and the old-style slot it never recorded.
    assert collect_garbage(fleet.catalog, apply=True) == []
    moves.abort(fleet.catalog, live.id)
    assert replication_objects(fleet) == {("s1", "slot", "tenantry_move_1")}
    _sql(fleet.urls["s1"], "SELECT pg_drop_replication_slot('tenantry_move_1')")


# -- item 5: a long transaction fails fast -----------------------------------------------


@pytest.fixture
def long_transaction(fleet) -> Iterator[psycopg.Connection]:
    """A reading transaction of the neighbour, open on s1 since before the move."""
    url = sa.make_url(fleet.urls["s1"]).set(drivername="postgresql")
    conn = psycopg.connect(
        url.render_as_string(hide_password=False), application_name="nightly-report"
    )
    conn.execute("SELECT count(*) FROM users WHERE tenant_id = 'neighbor'").fetchone()
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_transaction_older_than_the_freeze_fails_the_move_once_naming_it(
    fleet, long_transaction, mode
):
    fleet.catalog.settings = fleet.catalog.settings.model_copy(update={"freeze_timeout": 0.5})
    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    pid = long_transaction.info.backend_pid
    began = time.monotonic()
    expected = FreezeTimeout if mode == "offline" else FreezeBudgetExceeded
    with pytest.raises(expected) as info:
        moves.move(fleet.catalog, "acme", "s2", mode=mode, max_freeze=0.5)
    took = time.monotonic() - began
    message = str(info.value)
    assert f"pid {pid} (user 'postgres', application 'nightly-report', running " in message
    assert "idle in transaction" in message and "count(*)" not in message
    assert "\n" not in message
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and not record.live
    assert record.error == message
    if mode == "offline":
        assert took < 5, took  # one attempt of 0.5 s, no retries
        assert "nothing was copied" in message
    else:
        assert "the move was rolled back" in message
        assert "freeze_attempts" not in record.stats
    engine = fleet.engine("s1")
    assert residency(engine, "acme") == "active"
    engine.dispose()
    assert_rolled_back(fleet, "acme", before, neighbor)


# -- moves recorded before fleet ids -----------------------------------------------------


def test_a_move_recorded_with_the_old_names_resumes_and_its_leftovers_are_collected(fleet):
    """A move recorded before fleet ids (its artifacts name tenantry_move_<id>, and a
    tail slot without a publication of its own) resumes with the names it recorded;
    gc collects an old-style name only because a move of this catalog recorded it."""
    from tenantry.moves.mover import Mover
    from tenantry.shardmap.schema import moves as moves_table

    class Crash(BaseException):  # the process dies here: no step's error handling runs
        pass

    def crash() -> None:
        raise Crash

    before, neighbor = rows(fleet, "s1", "acme"), rows(fleet, "s1", "neighbor")
    mover = Mover(fleet.catalog, hooks=AtCheckpoint("online-frozen", crash))
    planned = mover.plan("acme", "s2", mode=moves.MoveMode.ONLINE)
    old = f"tenantry_move_{planned.id}"
    mover.journal.update(
        planned.id, artifacts={"publication": old, "slot": old, "subscription": old}
    )
    with pytest.raises(Crash):
        mover.run(planned.id)
    # What an older tenantry left: no tail publication recorded nor made.
    live = mover.journal.get(planned.id)
    assert live.state is MoveState.FROZEN and live.artifacts["tail_slot"] == f"{old}_tail"
    artifacts = {k: v for k, v in live.artifacts.items() if k != "tail_publication"}
    with fleet.catalog.engine.begin() as conn:
        conn.execute(
            moves_table.update().where(moves_table.c.id == live.id).values(artifacts=artifacts)
        )
    _sql(fleet.urls["s1"], f"DROP PUBLICATION {old}_tail")
    assert replication_objects(fleet) == {
        ("s1", "publication", old),
        ("s1", "slot", old),
        ("s1", "slot", f"{old}_tail"),
        ("s2", "subscription", old),
    }
    (done,) = moves.resume(fleet.catalog, live.id)
    assert done.succeeded and "tail_publication" not in done.artifacts
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert rows(fleet, "s1", "neighbor") == neighbor
    assert replication_objects(fleet) == set()
    # An old-style name this catalog recorded is its own to collect; one it never
    # recorded (another fleet's, say) is left alone.
    never = f"tenantry_move_{planned.id + 1}"
    for name in (f"{old}_tail", never):
        _sql(fleet.urls["s1"], f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")
    dropped = collect_garbage(fleet.catalog, apply=True)
    assert [(f.shard, f.kind, f.name, f.dropped) for f in dropped] == [
        ("s1", "slot", f"{old}_tail", True)
    ]
    assert replication_objects(fleet) == {("s1", "slot", never)}
    _sql(fleet.urls["s1"], f"SELECT pg_drop_replication_slot('{never}')")
