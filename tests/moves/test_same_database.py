"""A move whose source and target are one database (two shard names, its URL spelled
two ways) is refused before anything is frozen, and cleanup never deletes rows from the
move's target.

The catalog refuses to register a database twice (tests/shardmap/test_identity.py);
here its check is bypassed by writing the second shard's row into the catalog directly,
so that only the mover's own checks, on its live connections, stand between the tenant
and the loss of every row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from movefleet import (
    Fleet,
    build_fleet,
    count_rows,
    fingerprint,
    residency,
    seed,
    seed_sqlite,
    tenant_rows,
)
from sqlalchemy.engine import make_url

from tenantry import moves
from tenantry.errors import MoveError, MoveRefused
from tenantry.moves import MoveMode, MoveState
from tenantry.moves.journal import MoveKind
from tenantry.moves.mover import Mover
from tenantry.shardmap.schema import shards

ROWS = 20  # alpha's rows: 5 users, 5 chargers, 10 charging sessions


class Steps:
    """Hooks that record every checkpoint a move passes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def checkpoint(self, name: str) -> None:
        self.seen.append(name)


def register_behind_its_back(fleet: Fleet, name: str, url: str) -> None:
    """Add shard *name* at *url* to the catalog without any of its checks."""
    with fleet.catalog.transaction() as (conn, _version):
        conn.execute(
            shards.insert().values(
                name=name,
                url=url,
                admin_url=None,
                tier="shared",
                state="active",
                weight=1,
                created_at=datetime.now(UTC),
                database_id=None,
            )
        )
    fleet.urls[name] = url


@pytest.fixture
def fleet(make_pg_database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """pool-a (PostgreSQL) holding alpha (20 rows) and beta, pool-a-again: pool-a's
    database through ``localhost``; lite-a (SQLite) and lite-a-again: its file by a
    relative path."""
    monkeypatch.chdir(tmp_path)
    pool_a = make_pg_database(0)
    built = build_fleet(
        f"sqlite:///{tmp_path / 'catalog.db'}",
        [
            ("pool-a", pool_a, "shared"),
            ("lite-a", f"sqlite:///{tmp_path / 'lite-a.db'}", "shared"),
        ],
    )
    for tenant in ("alpha", "beta"):
        built.catalog.add_tenant(tenant, shard="pool-a")
        seed(built.engine("pool-a"), tenant, users=5, chargers=5, sessions=10)
    built.catalog.add_tenant("gamma", shard="lite-a")
    seed_sqlite(built.engine("lite-a"), "gamma")
    again = make_url(pool_a).set(host="localhost").render_as_string(hide_password=False)
    register_behind_its_back(built, "pool-a-again", again)
    register_behind_its_back(built, "lite-a-again", "sqlite:///lite-a.db")
    yield built
    built.close()


def state_of(fleet: Fleet, shard: str, tenant: str) -> tuple[int, str, str | None]:
    """(row count, fingerprint of every row, residency) of *tenant* on *shard*."""
    engine = fleet.engine(shard)
    try:
        return (
            count_rows(engine, tenant),
            fingerprint(tenant_rows(engine, tenant)),
            residency(engine, tenant),
        )
    finally:
        engine.dispose()


def assert_untouched(fleet: Fleet, shard: str, tenant: str, before: tuple[object, ...]) -> None:
    assert state_of(fleet, shard, tenant) == before
    assert before[0] == ROWS and before[2] == "active"
    placed = fleet.catalog.get_tenant(tenant)
    assert (placed.shard, placed.state.value) == (shard, "active")
    assert not moves.list_moves(fleet.catalog, live=True)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_move_to_the_same_database_is_refused_before_freezing(fleet: Fleet, mode: str) -> None:
    before = state_of(fleet, "pool-a", "alpha")
    beta = state_of(fleet, "pool-a", "beta")
    steps = Steps()
    with pytest.raises(MoveRefused) as caught:
        moves.move(fleet.catalog, "alpha", "pool-a-again", mode=mode, hooks=steps)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("source and target are the same database")
    assert "'pool-a'" in message and "'pool-a-again'" in message
    assert steps.seen == []
    assert_untouched(fleet, "pool-a", "alpha", before)
    assert state_of(fleet, "pool-a", "beta") == beta
    assert moves.list_moves(fleet.catalog) == []  # refused before it was recorded


@pytest.mark.parametrize("mode", [MoveMode.OFFLINE, MoveMode.ONLINE])
def test_a_move_planned_past_every_check_is_refused_before_freezing(
    fleet: Fleet, mode: MoveMode
) -> None:
    before = state_of(fleet, "pool-a", "alpha")
    steps = Steps()
    mover = Mover(fleet.catalog, hooks=steps)
    planned = mover.plan("alpha", "pool-a-again", mode=mode, check=False)
    with pytest.raises(MoveRefused, match=r"^source and target are the same database"):
        mover.run(planned.id)
    assert steps.seen == []  # not even the first step's checkpoint
    assert_untouched(fleet, "pool-a", "alpha", before)
    ended = moves.get_move(fleet.catalog, planned.id)
    assert ended.state is MoveState.ABORTED and ended.ended_at is not None
    assert ended.error is not None and "same database" in ended.error
    # resuming it does nothing more
    assert mover.run(planned.id).state is MoveState.ABORTED
    assert_untouched(fleet, "pool-a", "alpha", before)


def test_a_move_between_two_spellings_of_a_sqlite_file_is_refused(fleet: Fleet) -> None:
    before = state_of(fleet, "lite-a", "gamma")
    with pytest.raises(MoveRefused, match=r"^source and target are the same database"):
        moves.move(fleet.catalog, "gamma", "lite-a-again", mode="offline")
    assert_untouched(fleet, "lite-a", "gamma", before)


@pytest.mark.parametrize("mode", [MoveMode.OFFLINE, MoveMode.ONLINE])
def test_cleanup_never_deletes_rows_from_the_moves_target(fleet: Fleet, mode: MoveMode) -> None:
    """A move journalled as cleaning (a crash mid-clean), between two names of one
    database: resuming it refuses to delete, loudly, and deletes nothing."""
    before = state_of(fleet, "pool-a", "alpha")
    mover = Mover(fleet.catalog)
    planned = mover.journal.create(
        "alpha",
        "pool-a",
        "pool-a-again",
        kind=MoveKind.MOVE,
        mode=mode,
        # online: the replication is gone already, as after a crash in the clean step
        artifacts={"replication_dropped": True} if mode is MoveMode.ONLINE else None,
    )
    mover.journal.update(planned.id, state=MoveState.CLEANED)
    with pytest.raises(MoveError) as caught:
        mover.run(planned.id)
    message = str(caught.value)
    assert message.startswith("refusing to delete tenant 'alpha''s rows from shard 'pool-a'")
    assert "same database as the move's target 'pool-a-again'" in message
    assert state_of(fleet, "pool-a", "alpha") == before
    still = moves.get_move(fleet.catalog, planned.id)
    assert still.live and still.error == message
    with fleet.engine("pool-a").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one() == 10
