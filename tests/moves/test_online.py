"""Online moves: logical replication, a budgeted freeze, crashes, refusals, exclusion.

Two real PostgreSQL servers with ``wal_level=logical``. Writers go through
:class:`tenantry.Router` sessions at a steady rate on the moving tenant and its
neighbours while the tenant moves; every acknowledged write must be at the new home
exactly once, and nothing of logical replication may be left on either server.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from movefleet import (
    AtCheckpoint,
    Fleet,
    _plain,
    analyzed_tables,
    assert_one_home,
    build_fleet,
    count_rows,
    drop_replication,
    pg_shards,
    replication_objects,
    residency,
    seed,
)
from movefleet import tenant_rows as _tenant_rows

from tenantry import Router, load_settings, moves
from tenantry.cli import cli
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import Charger, ChargingSession
from tenantry.errors import (
    FreezeBudgetExceeded,
    MoveError,
    MoveRefused,
    TenantryError,
    VerificationFailed,
)
from tenantry.migrations import upgrade
from tenantry.migrations.fleet import MIGRATION_LOCK
from tenantry.moves import MoveState, online
from tenantry.moves.replication import artifact_name
from tenantry.testing import TempPostgres, create_database

Rows = dict[str, list[tuple[object, ...]]]

# -- the fleet ----------------------------------------------------------------------------


@pytest.fixture
def fleet(make_pg_database, tmp_path) -> Iterator[Fleet]:
    """s1 (server 0) and s2, d1 (server 1) on PostgreSQL, q1 on SQLite; the catalog on
    server 0. Tenants acme and neighbor on s1, other on s2, each with rows."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("d1", make_pg_database(1), "dedicated"),
            ("q1", f"sqlite:///{tmp_path / 'q1.db'}", "shared"),
        ],
    )
    for tenant, shard in (("acme", "s1"), ("neighbor", "s1"), ("other", "s2")):
        built.catalog.add_tenant(tenant, shard=shard)
        engine = built.engine(shard)
        seed(engine, tenant, sessions=60 if tenant == "acme" else 20)
        engine.dispose()
    try:
        yield built
    finally:
        # A failed test may leave a subscription or slot, which would stop its database
        # from being dropped.
        drop_replication(built)
        built.close()


def rows(fleet: Fleet, shard: str, tenant: str) -> Rows:
    engine = fleet.engine(shard)
    try:
        return _tenant_rows(engine, tenant)
    finally:
        engine.dispose()


def assert_clean(fleet: Fleet) -> None:
    """No replication object left, no tenant frozen or moving, no live move."""
    assert replication_objects(fleet) == set()
    for name in pg_shards(fleet):
        engine = fleet.engine(name)
        with engine.connect() as conn:
            frozen = conn.execute(
                sa.text("SELECT tenant_id FROM tenantry_residency WHERE state = 'frozen'")
            ).all()
        engine.dispose()
        assert frozen == [], f"frozen on {name}: {frozen}"
    assert {t.state.value for t in fleet.catalog.list_tenants()} == {"active"}
    assert moves.list_moves(fleet.catalog, live=True) == []


class Notes(moves.NullObserver):
    """Keeps what the mover tells the operator."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


# -- writers ------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes one tenant's rows through a Router at a steady rate until stopped.

    Inserts, updates and deletes charging sessions and updates chargers, each in its
    own transaction; a retryable error (TenantFrozen, StaleRoute) is retried until it
    succeeds. ``model`` is the tenant's rows as every acknowledged write left them.
    """

    START = datetime(2027, 1, 1, tzinfo=UTC)

    def __init__(self, catalog_url: str, tenant: str, initial: Rows, *, period: float) -> None:
        super().__init__(name=f"writer-{tenant}", daemon=True)
        self.router = Router(catalog_url, settings=load_settings(catalog_url=catalog_url))
        self.tenant = tenant
        self.period = period
        self.model: dict[str, dict[int, list[object]]] = {
            table: {int(str(row[1])): list(row) for row in found}
            for table, found in initial.items()
        }
        self.acks: list[float] = []
        self.retried: list[str] = []
        self.failed: list[str] = []
        self.next_id = 100_000
        self.mine: list[int] = []  # inserted session ids still present
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), f"{self.name} hung"
        self.router.close()

    def expected(self) -> Rows:
        return {
            table: [tuple(found[key]) for key in sorted(found)]
            for table, found in self.model.items()
        }

    def max_gap(self, since: float, until: float) -> float:
        """Longest time between two acknowledged writes in [since, until]."""
        times = [since, *(t for t in self.acks if since <= t <= until), until]
        return max(b - a for a, b in itertools.pairwise(times))

    def run(self) -> None:
        step = 0
        while not self._stop_event.is_set():
            started = time.monotonic()
            op = ("insert", "update", "charger", "insert", "delete")[step % 5]
            if op == "delete" and not self.mine:
                op = "insert"
            try:
                self._write(op, step)
            except Exception as exc:
                self.failed.append(f"{op}: {type(exc).__name__}: {exc}")
            step += 1
            time.sleep(max(0.0, self.period - (time.monotonic() - started)))

    def _write(self, op: str, step: int, *, retry: bool = True) -> None:
        while True:
            try:
                with self.router.session(self.tenant) as session:
                    change = self._apply(session, op, step)
                    session.commit()
                break
            except TenantryError as exc:
                if not (retry and getattr(exc, "retryable", False)) or self._stop_event.is_set():
                    raise
                self.retried.append(type(exc).__name__)
                time.sleep(0.002)
        self.acks.append(time.monotonic())
        change()

    def _apply(self, session: Any, op: str, step: int) -> Any:
        sessions = self.model["charging_sessions"]
        if op == "insert":
            new_id = self.next_id
            values = {
                "id": new_id,
                "charger_id": 1 + step % 4,
                "user_id": 1 + step % 5,
                "started_at": self.START + timedelta(seconds=step),
                "ended_at": None,
                "energy_kwh": Decimal(step) / 8,
            }
            session.add(ChargingSession(**values))

            def change() -> None:
                self.next_id += 1
                self.mine.append(new_id)
                sessions[new_id] = [self.tenant, *(_plain(v) for v in values.values())]

            return change
        if op == "update":
            target = self.mine[-1] if self.mine else 1
            energy = Decimal(step) / 4
            result = session.execute(
                sa.update(ChargingSession)
                .where(ChargingSession.id == target)
                .values(energy_kwh=energy, ended_at=self.START)
            )
            assert result.rowcount == 1, f"update of session {target} found no row"

            def change() -> None:
                sessions[target][5] = _plain(self.START)
                sessions[target][6] = _plain(energy)

            return change
        if op == "charger":
            charger = 1 + step % 4
            power = Decimal(step % 1000) + Decimal("0.25")
            result = session.execute(
                sa.update(Charger).where(Charger.id == charger).values(power_kw=power)
            )
            assert result.rowcount == 1, f"update of charger {charger} found no row"

            def change() -> None:
                self.model["chargers"][charger][4] = _plain(power)

            return change
        victim = self.mine[0]
        result = session.execute(sa.delete(ChargingSession).where(ChargingSession.id == victim))
        assert result.rowcount == 1, f"delete of session {victim} found no row"

        def change() -> None:
            self.mine.remove(victim)
            del sessions[victim]

        return change


def start_writers(fleet: Fleet, tenants: list[str], period: float = 0.01) -> list[Writer]:
    writers = []
    for tenant in tenants:
        home = fleet.catalog.get_tenant(tenant).shard
        writers.append(Writer(fleet.catalog_url, tenant, rows(fleet, home, tenant), period=period))
    for writer in writers:
        writer.start()
    return writers


# -- online moves with writers ------------------------------------------------------------

MAX_FREEZE = 0.5
# The budget bounds the wait for the sentinel; verification and the switch come on top
# (a few connections and statements: ~0.1-0.5 s on a busy two-core machine).
MARGIN = 1.0


@pytest.mark.parametrize("kind", ["move", "promote", "demote"])
def test_online_move_with_writers(fleet, kind):
    if kind == "demote":
        moves.promote(fleet.catalog, "acme", to="d1", mode="offline")
    writers = start_writers(fleet, ["acme", "neighbor", "other"])
    acme = writers[0]
    observer = Notes()
    try:
        time.sleep(0.3)
        began = time.monotonic()
        options = {"mode": "online", "max_freeze": MAX_FREEZE, "observer": observer}
        if kind == "move":
            done = moves.move(fleet.catalog, "acme", "s2", **options)
        elif kind == "promote":
            done = moves.promote(fleet.catalog, "acme", to="d1", **options)
        else:
            done = moves.demote(fleet.catalog, "acme", to="s2", **options)
        ended = time.monotonic()
        time.sleep(0.3)  # writes at the new home
    finally:
        for writer in writers:
            writer.stop()
    assert done.succeeded and done.mode.value == "online"
    assert observer.notes[0] == "mode: online, as asked"
    target = {"move": "s2", "promote": "d1", "demote": "s2"}[kind]
    for writer in writers:
        assert writer.failed == [], (writer.tenant, writer.failed)
        assert len(writer.acks) > 50, writer.tenant
    for neighbour in writers[1:]:
        assert neighbour.retried == [], (neighbour.tenant, neighbour.retried)
    assert "TenantFrozen" in acme.retried
    # Every acknowledged write exactly once at the new home, nothing elsewhere.
    assert assert_one_home(fleet, "acme", acme.expected()) == target
    for neighbour in writers[1:]:
        assert assert_one_home(fleet, neighbour.tenant, neighbour.expected())
    gap = acme.max_gap(began, ended + 0.3)
    print(f"{kind}: writes of acme held {gap:.3f}s at most; stats {dict(done.stats)}")
    assert gap < MAX_FREEZE + MARGIN, observer.notes
    assert done.stats["freeze_attempts"] == 1, observer.notes
    # Verified in full at the cut, outside the freeze; the freeze compared only the rows
    # changed since (the writers changed some).
    assert set(done.stats["cut"]) == {"lsn", "verify_seconds"}
    assert done.stats["verified"]["charging_sessions"]["rows"] > 0
    assert done.stats["tail_rows"] > 0
    assert done.stats["cut_freeze_seconds"] < MAX_FREEZE + MARGIN
    # The target's statistics were refreshed after the initial copy, before the cut.
    analyzed = analyzed_tables(fleet.engine(target))
    assert analyzed >= {"users", "chargers", "charging_sessions"}, analyzed
    assert replication_objects(fleet) == set()


# -- SIGKILL of the mover in each online state ----------------------------------------------

CRASH_POINTS = [
    "online-subscribed",
    "online-synced",
    "online-cut",  # the cut taken, its full verification running
    "online-frozen",
    "switched-committed",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    return {**env, "TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS), **extra}


TENANTRY = [sys.executable, "-m", "tenantry"]


class Paused:
    """``tenantry move TENANT --to s2 --mode online`` in a process of its own, which
    pauses at checkpoint *pause* (see tenantry.moves.observers) until killed."""

    def __init__(self, fleet: Fleet, tmp_path: Path, tenant: str, pause: str) -> None:
        self.tenant, self.pause = tenant, pause
        self.marker = tmp_path / f"{tenant}-paused-at-{pause}"
        command = ["move", tenant, "--to", "s2", "--mode", "online", "--json"]
        self.proc = subprocess.Popen(
            [*TENANTRY, "--catalog", fleet.catalog_url, *command],
            env=_env(TENANTRY_MOVE_PAUSE=pause, TENANTRY_MOVE_PAUSE_FILE=str(self.marker)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"the mover ended before {self.pause}: {out.decode()} {err.decode()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the mover never reached {self.pause}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no finally block, no rollback, connections cut."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)


def start_movers(fleet: Fleet, tmp_path: Path, points: dict[str, str]) -> list[Paused]:
    """One paused mover per tenant -> checkpoint, all started at once (each process
    takes a second or more just to import)."""
    movers = [Paused(fleet, tmp_path, tenant, point) for tenant, point in points.items()]
    try:
        for mover in movers:
            mover.wait()
    except BaseException:
        for mover in movers:
            mover.kill()
        raise
    return movers


def run_cli(fleet: Fleet, *args: str) -> dict[str, Any] | list[Any]:
    result = CliRunner().invoke(cli, ["--catalog", fleet.catalog_url, *args, "--json"], env=_env())
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def add_tenant(fleet: Fleet, tenant: str, shard: str = "s1") -> None:
    fleet.catalog.add_tenant(tenant, shard=shard)
    engine = fleet.engine(shard)
    seed(engine, tenant, sessions=30)
    engine.dispose()


def _crash(fleet: Fleet, tmp_path: Path, points: list[str]) -> dict[str, tuple[Writer, int]]:
    """Start a mover per checkpoint (tenant ``at-<checkpoint>``), write while each is
    paused, then SIGKILL them all. Return each tenant's writer and move id."""
    for point in points:
        add_tenant(fleet, f"at-{point}")
    writers = {
        f"at-{p}": Writer(fleet.catalog_url, f"at-{p}", rows(fleet, "s1", f"at-{p}"), period=0)
        for p in points
    }
    movers = start_movers(fleet, tmp_path, {f"at-{p}": p for p in points})
    try:
        for mover in movers:
            writer = writers[mover.tenant]
            if mover.pause == "online-frozen":
                assert residency(fleet.engine("s1"), mover.tenant) == "frozen"
                with pytest.raises(TenantryError) as info:
                    writer._write("insert", 0, retry=False)
                assert type(info.value).__name__ == "TenantFrozen"
                continue
            # At the source while it replicates; at the target once switched.
            for step in range(6):
                writer._write(("insert", "update", "charger", "insert", "delete")[step % 5], step)
    finally:
        for mover in movers:
            mover.kill()
    ids = {m.tenant_id: m.id for m in moves.list_moves(fleet.catalog, live=True)}
    assert sorted(ids) == sorted(writers)
    return {tenant: (writers[tenant], ids[tenant]) for tenant in writers}


def _after(fleet: Fleet, writer: Writer, home: str) -> None:
    # Not frozen: the tenant writes again, at its one home, which holds every write.
    writer._write("insert", 99, retry=False)
    writer.router.close()
    assert assert_one_home(fleet, writer.tenant, writer.expected()) == home


def test_sigkill_in_each_online_state_then_resume(fleet, tmp_path):
    crashed = _crash(fleet, tmp_path, CRASH_POINTS)
    # After the switch the move can only be completed.
    _, switched = crashed["at-switched-committed"]
    result = CliRunner().invoke(
        cli, ["--catalog", fleet.catalog_url, "moves", "abort", str(switched)], env=_env()
    )
    assert result.exit_code == 1 and "can only be completed" in result.output
    for writer, move_id in crashed.values():
        (record,) = run_cli(fleet, "moves", "resume", str(move_id))
        assert record["state"] == "cleaned" and not record["live"], record
        _after(fleet, writer, "s2")
    assert_clean(fleet)


def test_sigkill_before_the_switch_then_abort(fleet, tmp_path):
    crashed = _crash(fleet, tmp_path, CRASH_POINTS[:4])
    for writer, move_id in crashed.values():
        record = run_cli(fleet, "moves", "abort", str(move_id))
        assert record["state"] == "aborted" and not record["live"], record
        _after(fleet, writer, "s1")
    assert_clean(fleet)


def test_resume_when_the_subscription_was_recorded_but_never_created(fleet):
    """Journal first: a crash between recording the subscription and creating it leaves
    the journal naming one the target lacks; resume creates it."""

    class Crash(BaseException):  # the process dies here: no step's error handling runs
        pass

    class CrashWhenSubscribed:
        def checkpoint(self, name: str) -> None:
            if name == "online-subscribed":
                raise Crash

    before = rows(fleet, "s1", "acme")
    with pytest.raises(Crash):
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=CrashWhenSubscribed())
    (live,) = moves.list_moves(fleet.catalog, live=True)
    assert "subscription" in live.artifacts
    engine = sa.create_engine(fleet.urls["s2"], isolation_level="AUTOCOMMIT")
    name = artifact_name(live.id, fleet.catalog.fleet_id())
    with engine.connect() as conn:
        for step in ("DISABLE", "SET (slot_name = NONE)"):
            conn.exec_driver_sql(f"ALTER SUBSCRIPTION {name} {step}")
        conn.exec_driver_sql(f"DROP SUBSCRIPTION {name}")
    engine.dispose()
    (done,) = moves.resume(fleet.catalog, live.id)
    assert done.succeeded
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert_clean(fleet)


# -- verification: at the cut, then the rows changed since ---------------------------------


def _sql(fleet: Fleet, shard: str, statement: str) -> None:
    engine = fleet.engine(shard)
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)
    engine.dispose()


def test_a_difference_before_the_cut_fails_verification_and_rolls_back(fleet):
    before = rows(fleet, "s1", "acme")
    # The target loses a row behind replication's back before the cut.
    lose = AtCheckpoint(
        "online-synced",
        lambda: _sql(
            fleet, "s2", "DELETE FROM charging_sessions WHERE tenant_id = 'acme' AND id = 5"
        ),
    )
    with pytest.raises(VerificationFailed) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=lose)
    assert lose.ran and info.value.tables == ["charging_sessions"]
    assert "at the cut" in str(info.value)
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and "charging_sessions" in (record.error or "")
    assert assert_one_home(fleet, "acme", before) == "s1"
    assert_clean(fleet)


def test_a_change_lost_after_the_cut_is_caught_inside_the_freeze(fleet):
    """After the cut the target loses a row, then the source updates it: logical
    replication skips an update whose row is missing without an error, so only the
    comparison of the rows changed since the cut can see it."""

    def diverge() -> None:
        _sql(fleet, "s2", "DELETE FROM charging_sessions WHERE tenant_id = 'acme' AND id = 7")
        _sql(
            fleet,
            "s1",
            "UPDATE charging_sessions SET energy_kwh = 1 WHERE tenant_id = 'acme' AND id = 7",
        )

    lose = AtCheckpoint("online-cut", diverge)
    with pytest.raises(VerificationFailed) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online", hooks=lose)
    assert lose.ran and info.value.tables == ["charging_sessions"]
    assert "changed since the cut" in str(info.value)
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED
    # Rolled back: the source keeps every row (with the update), the target none.
    after = rows(fleet, "s1", "acme")
    assert assert_one_home(fleet, "acme", after) == "s1"
    assert count_rows(fleet.engine("s2"), "acme") == 0
    assert_clean(fleet)


def test_many_changes_since_the_cut_are_checked_at_a_new_cut(fleet, monkeypatch):
    monkeypatch.setattr(online, "TAIL_ROWS_PER_FREEZE", 3)
    writers = start_writers(fleet, ["acme"])
    observer = Notes()
    # Writes pile up after the cut while its verification runs.
    pause = AtCheckpoint("online-cut", lambda: time.sleep(1.0))
    try:
        time.sleep(0.3)
        done = moves.move(
            fleet.catalog, "acme", "s2", mode="online", observer=observer, hooks=pause
        )
        time.sleep(0.2)
    finally:
        for writer in writers:
            writer.stop()
    assert done.succeeded
    rechecked = [n for n in observer.notes if n.endswith("changed rows at a new cut")]
    assert rechecked, observer.notes
    assert writers[0].failed == []
    assert assert_one_home(fleet, "acme", writers[0].expected()) == "s2"
    assert_clean(fleet)


class Copying(moves.NullObserver):
    """Keeps what the mover says of each table's copy: (table, rows, bytes)."""

    def __init__(self) -> None:
        self.tables: list[tuple[str, int, int]] = []

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        self.tables.append((table, rows, size))


def test_the_initial_copy_says_each_tables_rows_and_bytes_as_it_goes(fleet):
    """A large tenant's initial copy takes a while: the observer (the CLI's progress)
    hears each table's rows and bytes as its table-sync worker copies them, and the
    journal keeps the totals seen for `tenantry status`."""
    big = 100_000  # copied in about a second here: several reports
    with fleet.engine("s1").begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id, started_at,"
                " energy_kwh) SELECT 'acme', i, 1 + i % 4, 1 + i % 5, now(), 1.5"
                " FROM generate_series(1000, 999 + :n) i"
            ),
            {"n": big},
        )
    observer = Copying()
    done = moves.move(fleet.catalog, "acme", "s2", mode="online", observer=observer)
    assert done.succeeded
    sessions = [
        (rows, size)
        for table, rows, size in observer.tables
        if table.endswith(".charging_sessions")
    ]
    assert sessions, observer.tables
    assert sessions == sorted(sessions), "rows and bytes only grow"
    rows, size = sessions[-1]
    assert 0 < rows <= big + 60 and size > rows  # more than a byte a row
    assert done.stats["copied_rows"] >= rows and done.stats["copied_bytes"] >= size
    assert count_rows(fleet.engine("s2"), "acme") >= big + 60
    assert_clean(fleet)


# -- the freeze budget --------------------------------------------------------------------


class StallApply:
    """Inside every freeze, stop the subscription's apply worker on the target (and keep
    it stopped), so that the sentinel never arrives within the budget."""

    def __init__(self, fleet: Fleet, target: str) -> None:
        self.fleet, self.target = fleet, target
        self.attempts = 0

    def checkpoint(self, name: str) -> None:
        if name != "online-frozen":
            return
        self.attempts += 1
        (live,) = moves.list_moves(self.fleet.catalog, live=True)
        sub = artifact_name(live.id, self.fleet.catalog.fleet_id())
        engine = sa.create_engine(self.fleet.urls[self.target], isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER SUBSCRIPTION {sub} DISABLE")
            for _ in range(500):  # the apply worker exits soon after
                pid = conn.execute(
                    sa.text("SELECT pid FROM pg_stat_subscription WHERE subname = :s"), {"s": sub}
                ).scalar()
                if pid is None:
                    break
                time.sleep(0.01)
        engine.dispose()


class FrozenSpans(threading.Thread):
    """Polls a tenant's residency on one shard and records how long each freeze lasted."""

    def __init__(self, url: str, tenant: str) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.tenant = tenant
        self.spans: list[float] = []
        self.thaws: list[float] = []  # how long it was not frozen between two spans
        self.done = threading.Event()

    def run(self) -> None:
        since = None
        last_end: float | None = None
        with self.engine.connect() as conn:
            while not self.done.is_set():
                state = conn.execute(
                    sa.text("SELECT state FROM tenantry_residency WHERE tenant_id = :t"),
                    {"t": self.tenant},
                ).scalar()
                now = time.monotonic()
                if state == "frozen" and since is None:
                    since = now
                    if last_end is not None:
                        self.thaws.append(now - last_end)
                elif state != "frozen" and since is not None:
                    self.spans.append(now - since)
                    since, last_end = None, now
                time.sleep(0.003)
        self.engine.dispose()


def test_freeze_budget_too_small_unfreezes_each_time_then_aborts(fleet):
    budget = 0.4
    hooks = StallApply(fleet, "s2")
    spans = FrozenSpans(fleet.urls["s1"], "acme")
    spans.start()
    (acme,) = start_writers(fleet, ["acme"])
    observer = Notes()
    try:
        began = time.monotonic()
        with pytest.raises(FreezeBudgetExceeded) as info:
            options = {"max_freeze": budget, "hooks": hooks, "observer": observer}
            moves.move(fleet.catalog, "acme", "s2", mode="online", **options)
        ended = time.monotonic()
        time.sleep(0.2)
    finally:
        acme.stop()
        spans.done.set()
        spans.join(10)
    reason = f"the sentinel did not reach the target within {budget:g}s"
    assert f"gave up after {hooks.attempts} freeze attempts: {reason}" in str(info.value)
    assert hooks.attempts == 5
    # The cut's freeze first (the apply worker was not stalled yet), then each attempt
    # held the tenant's writes for the budget (and a statement or two) only.
    assert len(spans.spans) == 1 + hooks.attempts, spans.spans
    assert max(spans.spans) < budget + 0.3, spans.spans
    # Between two attempts the tenant stayed writable at least about as long as the
    # attempt before held it (the mover's pause), so its writes came back each time.
    attempts_spans, thaws = spans.spans[1:], spans.thaws[1:]
    assert len(thaws) == hooks.attempts - 1, spans.thaws
    assert all(t >= 0.8 * s for s, t in zip(attempts_spans, thaws, strict=False)), (
        attempts_spans,
        thaws,
    )
    assert acme.max_gap(began, ended) < budget + 0.5
    held = [n for n in observer.notes if n.startswith("freeze attempt")]
    assert len(held) == hooks.attempts and all(reason in n for n in held), held
    record = moves.list_moves(fleet.catalog)[0]
    assert record.state is MoveState.ABORTED and not record.live
    assert reason in (record.error or "")
    # Rolled back: every acknowledged write at the source, nothing at the target.
    assert acme.failed == []
    assert assert_one_home(fleet, "acme", acme.expected()) == "s1"
    assert_clean(fleet)


# -- choosing the mode ---------------------------------------------------------------------


def test_auto_chooses_offline_for_sqlite_and_online_is_refused(fleet):
    observer = Notes()
    before = rows(fleet, "s1", "acme")
    done = moves.move(fleet.catalog, "acme", "q1", mode="auto", observer=observer)
    assert done.mode.value == "offline" and done.succeeded
    why = "online moves need PostgreSQL on both ends (SQLite has no logical replication)"
    assert observer.notes[0] == f"mode: offline: {why}"
    assert done.options["mode_reason"] == f"offline: {why}"
    assert assert_one_home(fleet, "acme", before) == "q1"
    result = CliRunner().invoke(
        cli,
        ["--catalog", fleet.catalog_url, "move", "acme", "--to", "s2", "--mode", "online"],
        env=_env(),
    )
    assert result.exit_code == 1 and why in result.output, result.output
    assert len(moves.list_moves(fleet.catalog)) == 1  # nothing planned
    assert assert_one_home(fleet, "acme", before) == "q1"


@pytest.fixture
def replica_server() -> Iterator[str]:
    """A throwaway server with wal_level=replica: no logical decoding."""
    server = TempPostgres.start(name="tenantry-replica", settings={"wal_level": "replica"})
    try:
        yield server.url
    finally:
        server.stop()


def test_auto_chooses_offline_without_wal_level_logical(fleet, replica_server):
    fleet.catalog.add_shard("r1", create_database(replica_server), tier="shared")
    fleet.urls["r1"] = fleet.catalog.get_shard("r1").url
    try:
        assert upgrade(fleet.catalog, shards=["r1"], jobs=1).ok
        add_tenant(fleet, "legacy", "r1")
        before = rows(fleet, "r1", "legacy")
        why = "the source has wal_level=replica; set wal_level=logical and restart"
        result = CliRunner().invoke(
            cli,
            ["--catalog", fleet.catalog_url, "move", "legacy", "--to", "s2", "--mode", "online"],
            env=_env(),
        )
        assert result.exit_code == 1 and why in result.output, result.output
        assert moves.list_moves(fleet.catalog) == []
        assert assert_one_home(fleet, "legacy", before) == "r1"
        observer = Notes()
        done = moves.move(fleet.catalog, "legacy", "s2", mode="auto", observer=observer)
        assert done.mode.value == "offline" and done.succeeded
        assert observer.notes[0] == f"mode: offline: {why}"
        assert assert_one_home(fleet, "legacy", before) == "s2"
    finally:
        del fleet.urls["r1"]


@pytest.mark.parametrize(
    ("table", "ddl"),
    [
        ("chargers", ["ALTER TABLE chargers REPLICA IDENTITY NOTHING"]),
        (
            "users",
            [
                "CREATE UNIQUE INDEX users_by_email ON users (email)",
                "ALTER TABLE users REPLICA IDENTITY USING INDEX users_by_email",
            ],
        ),
    ],
    ids=["nothing", "index-without-tenant"],
)
def test_replica_identity_without_tenant_column_is_refused(fleet, table, ddl):
    for shard in ("s1", "s2"):
        engine = fleet.engine(shard)
        with engine.begin() as conn:
            for statement in ddl:
                conn.exec_driver_sql(statement)
        engine.dispose()
    before = rows(fleet, "s1", "acme")
    with pytest.raises(MoveRefused) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="online")
    message = str(info.value)
    assert f"table {table!r}: its replica identity does not include 'tenant_id'" in message
    assert f"ALTER TABLE {table} REPLICA IDENTITY FULL" in message
    # Nothing changed: no move recorded, nothing frozen, copied or published.
    assert moves.list_moves(fleet.catalog) == []
    assert residency(fleet.engine("s1"), "acme") == "active"
    assert count_rows(fleet.engine("s2"), "acme") == 0
    assert replication_objects(fleet) == set()
    assert assert_one_home(fleet, "acme", before) == "s1"


# -- moves and fleet migrations exclude each other -------------------------------------------


def test_live_online_move_locks_its_shards_against_migrations(fleet, tmp_path):
    (paused,) = start_movers(fleet, tmp_path, {"acme": "online-synced"})
    try:
        (live,) = moves.list_moves(fleet.catalog, live=True)
        run = upgrade(fleet.catalog, jobs=1)
    finally:
        paused.kill()
    results = {r.shard: r for r in run.results}
    for shard in ("s1", "s2"):
        assert results[shard].result == "locked"
        assert f"move {live.id} is live on this shard" in (results[shard].error or "")
        assert f"tenantry moves resume {live.id}" in (results[shard].error or "")
    assert results["d1"].result == results["q1"].result == "skipped"
    moves.abort(fleet.catalog, live.id)
    assert upgrade(fleet.catalog, jobs=1).ok
    assert_clean(fleet)


def test_migration_holding_the_lock_makes_a_move_refuse(fleet):
    before = rows(fleet, "s1", "acme")
    engine = fleet.engine("s2")
    migration = engine.connect()
    try:
        migration.begin()
        migration.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        with pytest.raises(MoveError) as info:
            moves.move(fleet.catalog, "acme", "s2", mode="online")
        (planned,) = moves.list_moves(fleet.catalog, live=True)
        assert str(info.value) == (
            "shard 's2' is being migrated (`tenantry migrate` holds its lock): run "
            f"`tenantry moves resume {planned.id}` when it has finished"
        )
        # Refused before any step: nothing frozen, copied or published.
        assert planned.state is MoveState.PLANNED
        assert residency(fleet.engine("s1"), "acme") == "active"
        assert count_rows(fleet.engine("s2"), "acme") == 0
        assert replication_objects(fleet) == set()
    finally:
        migration.rollback()
        migration.close()
        engine.dispose()
    (done,) = moves.resume(fleet.catalog, planned.id)
    assert done.succeeded and done.mode.value == "online"
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert_clean(fleet)
