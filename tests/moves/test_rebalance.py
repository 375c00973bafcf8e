"""Rebalancing on real shards: sizes, the commands, applying plans while the tenants are
in use, draining, stopping half-way and planning again.

Writers and readers go through a :class:`tenantry.Router` (PostgreSQL catalog, map
changes by LISTEN/NOTIFY) and retry only errors whose ``retryable`` is True; anything
else fails the test. A write counts once its commit has returned; afterwards each one
must be at the tenant's final home exactly once, and nowhere else.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from movefleet import Fleet, assert_one_home, build_fleet, count_rows, tenant_rows

from tenantry import Router, moves
from tenantry.cli import cli
from tenantry.demo.models import Base, Charger, ChargingSession, User
from tenantry.rebalance.apply import AppliedMove, apply_plan, plan_for
from tenantry.rebalance.planner import Plan, PlannedMove, TenantSize, base_cost
from tenantry.rebalance.sizes import stored_sizes

#: Tenants of the PostgreSQL pool: four on s1, four on s2; s3 and s4 start empty.
POOL = {"s1": ["a1", "a2", "a3", "a4"], "s2": ["b1", "b2", "b3", "b4"]}
TENANTS = [t for tenants in POOL.values() for t in tenants]
Rows = dict[str, list[tuple[object, ...]]]


def seed(engine: sa.Engine, tenant: str, sessions: int = 40) -> None:
    """Five users, four chargers and *sessions* charging sessions, through typed
    inserts (SQLite's driver takes no Decimal in raw SQL)."""
    tables = Base.metadata.tables
    begin = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            tables["users"].insert(),
            [{"tenant_id": tenant, "id": i, "email": f"u{i}@{tenant}", "name": f"User {i}"}
             for i in range(1, 6)],
        )  # fmt: skip
        conn.execute(
            tables["chargers"].insert(),
            [{"tenant_id": tenant, "id": i, "name": f"C{i}", "location": "bay",
              "power_kw": Decimal("22.50") * i, "status": "available"} for i in range(1, 5)],
        )  # fmt: skip
        conn.execute(
            tables["charging_sessions"].insert(),
            [{"tenant_id": tenant, "id": i, "charger_id": 1 + i % 4, "user_id": 1 + i % 5,
              "started_at": begin + timedelta(minutes=i),
              "ended_at": None if i % 7 == 0 else begin + timedelta(minutes=i + 30),
              "energy_kwh": Decimal("1.125") * i} for i in range(1, sessions + 1)],
        )  # fmt: skip


@pytest.fixture
def pool(make_pg_database) -> Iterator[Fleet]:
    """Four shared PostgreSQL shards over two servers; eight tenants with rows on s1
    and s2, s3 and s4 empty (as if just added)."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("s3", make_pg_database(0), "shared"),
            ("s4", make_pg_database(1), "shared"),
        ],
    )
    for shard, tenants in POOL.items():
        engine = built.engine(shard)
        for i, tenant in enumerate(tenants):
            built.catalog.add_tenant(tenant, shard=shard)
            seed(engine, tenant, sessions=20 + 10 * i)
        engine.dispose()
    yield built
    built.close()


@pytest.fixture
def router(pool: Fleet) -> Iterator[Router]:
    with Router(pool.catalog_url, settings=pool.catalog.settings, listen=True) as routed:
        yield routed


def rows_at(fleet: Fleet, shard: str, tenant: str) -> Rows:
    engine = fleet.engine(shard)
    try:
        return tenant_rows(engine, tenant)
    finally:
        engine.dispose()


def homes(fleet: Fleet) -> dict[str, str]:
    return {t.id: t.shard for t in fleet.catalog.list_tenants()}


def counts(fleet: Fleet) -> dict[str, int]:
    found = dict.fromkeys(fleet.urls, 0)
    for shard in homes(fleet).values():
        found[shard] += 1
    return found


def run_cli(fleet: Fleet, *args: str) -> Result:
    env = {
        "COLUMNS": "400",
        "TENANTRY_ALEMBIC_CONFIG": str(fleet.catalog.settings.alembic_config),
    }
    return CliRunner(env=env).invoke(cli, ["--catalog", fleet.catalog_url, *args])


def run_json(fleet: Fleet, *args: str) -> Any:
    result = run_cli(fleet, *args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Worker(threading.Thread):
    """Loops over one tenant through the router until stopped; retries what is
    retryable, keeps any other error and stops there."""

    def __init__(self, router: Router, tenant: str) -> None:
        super().__init__(daemon=True, name=f"{type(self).__name__}-{tenant}")
        self.router = router
        self.tenant = tenant
        self.stop = threading.Event()
        self.done = 0
        self.retried = 0
        self.errors: list[BaseException] = []

    def step(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception as exc:  # the test reports every one that is not retryable
                if not getattr(exc, "retryable", False):
                    self.errors.append(exc)
                    return
                self.retried += 1
                time.sleep(0.005)
                continue
            self.done += 1
            # A breath between requests, as an application has: tight loops in eight
            # threads would mostly measure the GIL.
            time.sleep(0.002)


class Writer(Worker):
    """Inserts users with ids from 1000 up; an id counts once its commit returned."""

    def __init__(self, router: Router, tenant: str) -> None:
        super().__init__(router, tenant)
        self.ids = itertools.count(1000)
        self.next_id = next(self.ids)
        self.acknowledged: list[int] = []

    def step(self) -> None:
        with self.router.session(self.tenant) as session:
            session.add(User(id=self.next_id, email=f"w{self.next_id}@x", name="writer"))
            session.commit()
        self.acknowledged.append(self.next_id)
        self.next_id = next(self.ids)


class Reader(Worker):
    """Reads the tenant's rows; every read must see all of the seeded data."""

    def __init__(self, router: Router, tenant: str, expected: Rows) -> None:
        super().__init__(router, tenant)
        self.expected = {name: len(rows) for name, rows in expected.items()}
        self.short: list[dict[str, int]] = []

    def step(self) -> None:
        found = read_counts(self.router, self.tenant)
        if found != self.expected:
            self.short.append(found)


def read_counts(router: Router, tenant: str) -> dict[str, int]:
    with router.session(tenant) as session:
        return {
            model.__tablename__: session.scalar(sa.select(sa.func.count()).select_from(model))
            for model in (User, Charger, ChargingSession)
        }


def start(workers: Sequence[Worker]) -> None:
    for worker in workers:
        worker.start()
    wait_for(lambda: all(w.done >= 5 or w.errors for w in workers), "the workers to warm up")


def finish(workers: Sequence[Worker]) -> None:
    # Some more work after the moves, at the tenants' new homes.
    marks = [w.done for w in workers]
    wait_for(
        lambda: all(w.done >= m + 5 or w.errors for w, m in zip(workers, marks, strict=True)),
        "work after the moves",
    )
    for worker in workers:
        worker.stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    assert [e for w in workers for e in w.errors] == []


def assert_everything_home(fleet: Fleet, before: dict[str, Rows], writers: Sequence[Writer] = ()):
    """Each tenant's seeded rows plus its acknowledged writes, exactly once, at its one
    home; nothing of it anywhere else."""
    written = {w.tenant: w.acknowledged for w in writers}
    for tenant, seeded in before.items():
        home = fleet.catalog.get_tenant(tenant).shard
        found = rows_at(fleet, home, tenant)
        assert found["chargers"] == seeded["chargers"], tenant
        assert found["charging_sessions"] == seeded["charging_sessions"], tenant
        users = [row[1] for row in found["users"]]
        acknowledged = written.get(tenant, [])
        assert len(users) == len(set(users))
        assert sorted(users) == sorted([row[1] for row in seeded["users"]] + acknowledged), tenant
        assert assert_one_home(fleet, tenant, found) == home


def overlaps(a: moves.Move, b: moves.Move) -> bool:
    assert a.created_at and a.ended_at and b.created_at and b.ended_at
    return a.created_at < b.ended_at and b.created_at < a.ended_at


# -- apply with writers ----------------------------------------------------------------


def test_apply_parallel_with_writers_loses_nothing(pool, router):
    before = {t: rows_at(pool, home, t) for t, home in homes(pool).items()}
    writers = [Writer(router, t) for t in TENANTS]
    start(writers)
    try:
        result = run_json(pool, "rebalance", "--apply", "--parallel", "2", "--strategy", "by_count")
    finally:
        finish(writers)

    planned = [(m["tenant"], m["from"], m["to"]) for m in result["moves"]]
    assert len(planned) == 4 and result["spread_after"] == 0
    assert [a["ok"] for a in result["applied"]] == [True] * 4, result["applied"]
    assert counts(pool) == {"s1": 2, "s2": 2, "s3": 2, "s4": 2}
    assert_everything_home(pool, before, writers)
    moved = {m[0] for m in planned}
    assert sum(w.retried for w in writers if w.tenant in moved) >= 1, "no write met a move"
    assert all(w.retried == 0 for w in writers if w.tenant not in moved)

    # The journal: never two moves on one shard at once, each shard's moves in the
    # plan's order, and two moves on different shards did run at once.
    journal = {m.tenant_id: m for m in moves.list_moves(pool.catalog)}
    assert sorted(journal) == sorted(moved) and all(m.succeeded for m in journal.values())
    ordered = [journal[tenant] for tenant, _s, _t in planned]
    for (i, a), (j, b) in itertools.combinations(enumerate(ordered), 2):
        if {a.source, a.target} & {b.source, b.target}:
            assert not overlaps(a, b), (a, b)
            assert a.ended_at <= b.created_at, f"move {j} overtook move {i} on a shard"
    assert any(overlaps(a, b) for a, b in itertools.combinations(ordered, 2))


# -- stop half-way, plan again ---------------------------------------------------------


class StopAt(moves.NullObserver):
    """Sets *stop* when the first move reaches *state*; records every move's steps."""

    def __init__(self, stop: threading.Event, state: str) -> None:
        self.stop, self.state = stop, state
        self.steps: list[tuple[int, str]] = []

    def step(self, move_id: int, state: str) -> None:
        self.steps.append((move_id, state))
        if state == self.state:
            self.stop.set()


def test_stop_finishes_the_moves_in_flight_and_plans_again(pool, router):
    before = {t: rows_at(pool, home, t) for t, home in homes(pool).items()}
    plan = plan_for(pool.catalog, strategy="by_count")
    assert len(plan.moves) == 4
    # Plan order: the first two moves share no shard, so both start at once.
    first, second = plan.moves[:2]
    assert not {first.source, first.target} & {second.source, second.target}
    stop = threading.Event()
    observer = StopAt(stop, "copied")
    done: list[AppliedMove] = []
    results = apply_plan(pool.catalog, plan, parallel=2, mode="offline", stop=stop,
                         observer=observer, on_done=done.append)  # fmt: skip
    assert stop.is_set()
    # Both moves in flight finished; none started after the stop.
    assert [r.planned for r in results] == [r.planned for r in done]
    assert sorted(r.planned.tenant_id for r in results) == sorted(
        [first.tenant_id, second.tenant_id]
    )
    assert all(r.ok for r in results), [r.error for r in results]
    journal = moves.list_moves(pool.catalog)
    assert len(journal) == 2 and not moves.list_moves(pool.catalog, live=True)
    assert {state for _id, state in observer.steps} >= {"copied", "switched", "done"}
    # Half-way is no worse than before: the plan's prefix, measured again.
    assert counts(pool) == {"s1": 3, "s2": 3, "s3": 1, "s4": 1}

    again = plan_for(pool.catalog, strategy="by_count")
    assert again.spread_before() < plan.spread_before()
    assert len(again.moves) == 2
    assert not {m.tenant_id for m in again.moves} & {first.tenant_id, second.tenant_id}
    rest = apply_plan(pool.catalog, again, parallel=2, mode="offline")
    assert all(r.ok for r in rest), [r.error for r in rest]
    assert counts(pool) == {"s1": 2, "s2": 2, "s3": 2, "s4": 2}
    assert plan_for(pool.catalog, strategy="by_count").moves == []
    assert_everything_home(pool, before)
    assert read_counts(router, first.tenant_id) == {
        name: len(rows) for name, rows in before[first.tenant_id].items()
    }


# -- drain -----------------------------------------------------------------------------


def test_drain_cli_empties_the_shard_while_its_tenants_are_read(pool, router):
    # s2 holds four tenants and weighs 2: its share of the eight already.
    pool.catalog.set_shard_weight("s2", 2)
    before = {t: rows_at(pool, home, t) for t, home in homes(pool).items()}
    readers = [Reader(router, t, before[t]) for t in POOL["s1"]]
    start(readers)
    try:
        result = run_json(
            pool,
            "shard",
            "drain",
            "s1",
            "--apply",
            "--parallel",
            "2",
            "--strategy",
            "by_count",
            "--mode",
            "offline",
        )
    finally:
        finish(readers)
    assert result["draining"] == ["s1"] and result["left_behind"] == {}
    assert result["reason"].startswith("shard s1 drained")
    assert [a["ok"] for a in result["applied"]] == [True] * len(POOL["s1"])
    assert pool.catalog.get_shard("s1").state.value == "draining"
    assert [t for t, home in homes(pool).items() if home == "s1"] == []
    assert count_rows(pool.engine("s1"), "a1") == 0
    # Weighted by the remaining shards: the four went to s3 and s4, two each, and s2
    # (weight 2) kept its four.
    assert counts(pool) == {"s1": 0, "s2": 4, "s3": 2, "s4": 2}
    for reader in readers:
        assert reader.short == [], f"{reader.tenant} read partial data: {reader.short[:3]}"
        assert reader.done > 10
        assert read_counts(router, reader.tenant) == reader.expected
    assert_everything_home(pool, before)


def test_drain_leaves_a_pinned_tenant_and_says_so(pool):
    pool.catalog.set_pinned("a2", True)
    result = run_json(pool, "shard", "drain", "s1")  # a dry run still marks it draining
    assert pool.catalog.get_shard("s1").state.value == "draining"
    assert result["left_behind"] == {"a2": "pinned"}
    assert "shard s1 keeps 1 pinned tenant(s) (a2): unpin them" in result["reason"]
    assert sorted(m["tenant"] for m in result["moves"] if m["from"] == "s1") == ["a1", "a3", "a4"]
    assert moves.list_moves(pool.catalog) == []  # a dry run moves nothing
    text = run_cli(pool, "shard", "drain", "s1")
    assert text.exit_code == 0 and "keeps 1 pinned tenant(s) (a2)" in text.stdout
    assert "dry run: add --apply to run it" in text.stdout


# -- sizes -----------------------------------------------------------------------------


@pytest.fixture
def mixed(make_pg_database, tmp_path) -> Iterator[Fleet]:
    """A PostgreSQL shard s1 and a SQLite shard q1, shared, and a dedicated d1; big and
    small on s1, lite on q1."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("q1", f"sqlite:///{tmp_path / 'q1.db'}", "shared"),
            ("d1", make_pg_database(1), "dedicated"),
        ],
    )
    for tenant, shard, sessions in (("big", "s1", 60), ("small", "s1", 5), ("lite", "q1", 30)):
        built.catalog.add_tenant(tenant, shard=shard)
        engine = built.engine(shard)
        seed(engine, tenant, sessions=sessions)
        engine.dispose()
    yield built
    built.close()


def add_sessions(fleet: Fleet, shard: str, tenant: str, count: int) -> None:
    engine = fleet.engine(shard)
    start_at = datetime(2026, 12, 1, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id,"
                    " started_at, ended_at, energy_kwh) VALUES (:t, :i, 1, 1, :s, NULL, 1.5)"
                ),
                [
                    {"t": tenant, "i": 10_000 + i, "s": start_at + timedelta(minutes=i)}
                    for i in range(count)
                ],
            )
    finally:
        engine.dispose()


def by_tenant(listing: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["tenant"]: row for row in listing}


def test_sizes_are_measured_on_postgresql_and_sqlite_and_stored(mixed):
    empty = run_cli(mixed, "tenant", "sizes")
    assert empty.exit_code == 0 and "none stored: add --refresh" in empty.stdout
    assert run_json(mixed, "tenant", "sizes") == []

    began = datetime.now(UTC)
    measured = by_tenant(run_json(mixed, "tenant", "sizes", "--refresh"))
    # users 5 + chargers 4 + sessions: counted exactly on both kinds of database.
    assert {t: (r["shard"], r["rows"]) for t, r in measured.items()} == {
        "big": ("s1", 69),
        "small": ("s1", 14),
        "lite": ("q1", 39),
    }
    assert measured["big"]["bytes"] > measured["small"]["bytes"] > 0
    assert measured["lite"]["bytes"] > 0
    for row in measured.values():
        when = datetime.fromisoformat(row["measured_at"])
        assert began - timedelta(seconds=5) <= when <= datetime.now(UTC)
    stored = stored_sizes(mixed.catalog)
    assert {t: (s.rows, s.bytes) for t, (s, _shard, _when) in stored.items()} == {
        t: (r["rows"], r["bytes"]) for t, r in measured.items()
    }

    # Without --refresh: what is stored, however the data changed since.
    add_sessions(mixed, "s1", "small", 100)
    add_sessions(mixed, "q1", "lite", 100)
    assert by_tenant(run_json(mixed, "tenant", "sizes")) == measured
    table = run_cli(mixed, "tenant", "sizes")
    assert table.exit_code == 0
    small = next(line for line in table.stdout.splitlines() if " small " in line)
    assert small.split("│")[3].strip() == "14"
    remeasured = by_tenant(run_json(mixed, "tenant", "sizes", "--refresh"))
    assert remeasured["small"]["rows"] == 114 and remeasured["lite"]["rows"] == 139
    assert remeasured["small"]["bytes"] > measured["small"]["bytes"]
    assert remeasured["small"]["measured_at"] > measured["small"]["measured_at"]
    assert remeasured["big"]["rows"] == 69


def test_rebalance_uses_stored_sizes_unless_refresh(mixed):
    stored = by_tenant(run_json(mixed, "tenant", "sizes", "--refresh"))
    add_sessions(mixed, "q1", "lite", 300)

    def loads(plan: dict[str, Any]) -> dict[str, float]:
        return {row["shard"]: row["before"] for row in plan["shards"]}

    plan = run_json(mixed, "rebalance")
    # by_size: the bytes measured, plus 1% of the pool's mean tenant size
    pooled = [TenantSize(bytes=stored[t]["bytes"]) for t in ("big", "small", "lite")]
    expected_q1 = stored["lite"]["bytes"] + base_cost("by_size", pooled)
    assert base_cost("by_size", pooled) < 0.011 * sum(p.bytes for p in pooled) / 3
    assert loads(plan)["q1"] == expected_q1
    assert "d1" not in loads(plan)  # dedicated shards are not part of the pool
    refreshed = run_json(mixed, "rebalance", "--refresh")
    assert loads(refreshed)["q1"] > expected_q1
    # ... and --refresh stored what it measured.
    assert stored_sizes(mixed.catalog)["lite"][0].rows == 339
    assert loads(run_json(mixed, "rebalance")) == loads(refreshed)
    # Text output: the plan and the load per shard.
    text = run_cli(mixed, "rebalance", "--strategy", "by_count")
    assert text.exit_code == 0
    assert "load per shard" in text.stdout and "spread" in text.stdout


USAGE_ERRORS = [
    (["rebalance", "--threshold", "1.5"], "Invalid value for '--threshold'"),
    (["rebalance", "--threshold", "0"], "Invalid value for '--threshold'"),
    (["rebalance", "--threshold", "lots"], "Invalid value for '--threshold'"),
    (["rebalance", "--strategy", "by_mood"], "Invalid value for '--strategy'"),
    (["rebalance", "--parallel", "0"], "Invalid value for '--parallel'"),
    (["rebalance", "--max-moves", "-1"], "Invalid value for '--max-moves'"),
    (["shard", "drain", "q1", "--mode", "fast"], "Invalid value for '--mode'"),
]
DOMAIN_ERRORS = [
    (["shard", "drain", "nowhere"], "error: unknown shard 'nowhere'"),
    (["shard", "drain", "d1"], "error: only shared shards can be drained: 'd1' is dedicated"),
]


def test_bad_input_is_one_clear_line_and_changes_nothing(files):
    version = files.catalog.map_version()
    for args, words in USAGE_ERRORS + DOMAIN_ERRORS:
        result = run_cli(files, *args)
        status = 2 if words.startswith("Invalid") else 1
        assert result.exit_code == status, (args, result.output)
        assert "Traceback" not in result.output
        assert result.stdout == "", args
        if status == 2:
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
            assert len(errors) == 1 and words in errors[0], result.stderr
        else:
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith(words), result.stderr
    assert files.catalog.map_version() == version
    assert {s.name: s.state.value for s in files.catalog.list_shards()} == dict.fromkeys(
        [*files.urls], "active"
    )


# -- apply's order and failures (SQLite: fast offline moves) ----------------------------


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Fleet]:
    """Six shared SQLite shards q1..q6, a dedicated d1 and a SQLite catalog; t1..t4
    on q1, q2, q3 and q5."""
    built = build_fleet(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        [(f"q{i}", f"sqlite:///{tmp_path / f'q{i}.db'}", "shared") for i in range(1, 7)]
        + [("d1", f"sqlite:///{tmp_path / 'd1.db'}", "dedicated")],
    )
    for tenant, shard in (("t1", "q1"), ("t2", "q2"), ("t3", "q3"), ("t4", "q5")):
        built.catalog.add_tenant(tenant, shard=shard)
        engine = built.engine(shard)
        seed(engine, tenant, sessions=10)
        engine.dispose()
    yield built
    built.close()


def planned(*moves_: tuple[str, str, str]) -> Plan:
    return Plan([PlannedMove(t, s, d, 1.0, 100) for t, s, d in moves_], {}, {}, {}, 0.1)


def test_a_later_move_never_overtakes_an_earlier_one_on_a_shard(files):
    # t3's move shares no shard with t1's, but shares q3 with t2's, which must wait
    # for t1's (q2): it runs after both.
    plan = planned(("t1", "q1", "q2"), ("t2", "q2", "q3"), ("t3", "q3", "q4"))
    results = apply_plan(files.catalog, plan, parallel=3, mode="offline")
    assert [r.planned.tenant_id for r in results] == ["t1", "t2", "t3"]
    assert all(r.ok for r in results), [r.error for r in results]
    journal = {m.tenant_id: m for m in moves.list_moves(files.catalog)}
    assert journal["t1"].ended_at <= journal["t2"].created_at
    assert journal["t2"].ended_at <= journal["t3"].created_at


def test_after_a_failed_move_the_moves_that_depend_on_it_are_skipped(files):
    before = {t: rows_at(files, home, t) for t, home in homes(files).items()}
    plan = planned(("t1", "q1", "q2"), ("t2", "q2", "q3"), ("t3", "q3", "q4"), ("t4", "q5", "q6"))
    moves.move(files.catalog, "t1", "q6", mode="offline")  # the plan is stale for t1
    results = {r.planned.tenant_id: r for r in apply_plan(files.catalog, plan, parallel=2)}
    assert results["t1"].error == "the tenant moved since the plan was made"
    assert results["t2"].error == "skipped: the move of t1 on shard q2 did not succeed (plan again)"
    assert results["t3"].error == "skipped: the move of t2 on shard q3 did not succeed (plan again)"
    assert results["t4"].ok
    assert homes(files) == {"t1": "q6", "t2": "q2", "t3": "q3", "t4": "q6"}
    assert_everything_home(files, before)
