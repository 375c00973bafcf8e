"""Tenant moves end to end: the protocol, refusals, verification, rollback, the CLI."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from movefleet import (
    AtCheckpoint,
    Fleet,
    analyzed_tables,
    assert_one_home,
    build_fleet,
    count_rows,
    residency,
    seed,
    tenant_rows,
)

from tenantry import moves
from tenantry.cli import cli
from tenantry.errors import (
    MoveError,
    MoveInProgress,
    MoveRefused,
    SchemaContractError,
    ShardNotActive,
    ShardOccupied,
    ShardUnavailable,
    UnknownShard,
    VerificationFailed,
)
from tenantry.moves import MoveState
from tenantry.shardmap.dedicated import constant_tenant


@pytest.fixture
def fleet(make_pg_database, tmp_path):
    """s1 (server 0) and s2 (server 1) shared, d1 dedicated (server 1), two SQLite
    shards; tenants acme and neighbor on s1, with rows."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("d1", make_pg_database(1), "dedicated"),
            ("q1", f"sqlite:///{tmp_path / 'q1.db'}", "shared"),
            ("q2", f"sqlite:///{tmp_path / 'q2.db'}", "shared"),
        ],
    )
    for tenant in ("acme", "neighbor"):
        built.catalog.add_tenant(tenant, shard="s1")
        with built.engine("s1").connect() as _:
            pass
        seed(built.engine("s1"), tenant, sessions=60 if tenant == "acme" else 25)
    yield built
    built.close()


def _rows(fleet: Fleet, shard: str, tenant: str):
    engine = fleet.engine(shard)
    try:
        return tenant_rows(engine, tenant)
    finally:
        engine.dispose()


def test_offline_move_between_servers(fleet):
    before = _rows(fleet, "s1", "acme")
    neighbor = _rows(fleet, "s1", "neighbor")
    version = fleet.catalog.map_version()
    done = moves.move(fleet.catalog, "acme", "s2", mode="offline")
    assert done.succeeded and done.state is MoveState.CLEANED
    assert done.stats["rows"] == sum(len(v) for v in before.values())
    assert done.stats["freeze_seconds"] >= 0
    assert assert_one_home(fleet, "acme", before) == "s2"
    assert residency(fleet.engine("s1"), "acme") == "moved"
    assert _rows(fleet, "s1", "neighbor") == neighbor
    assert fleet.catalog.map_version() > version
    # The new home's planner statistics were refreshed after the bulk copy.
    assert analyzed_tables(fleet.engine("s2")) >= {"users", "chargers", "charging_sessions"}
    assert done.stats["analyzed"] is True


def test_auto_chooses_offline_for_sqlite_and_says_why(fleet):
    notes = []

    class Notes(moves.NullObserver):
        def note(self, message: str) -> None:
            notes.append(message)

    before = _rows(fleet, "s1", "acme")
    done = moves.move(fleet.catalog, "acme", "q1", mode="auto", observer=Notes())
    assert done.mode.value == "offline"
    assert any("offline" in n and "SQLite" in n for n in notes)
    assert assert_one_home(fleet, "acme", before) == "q1"


@pytest.mark.parametrize(
    "path",
    [("q1", "q2"), ("q1", "s2"), ("s2", "q1")],
    ids=["sqlite-to-sqlite", "sqlite-to-pg", "pg-to-sqlite"],
)
def test_moves_across_dialects(fleet, path):
    before = _rows(fleet, "s1", "acme")
    for target in ("q1", *path) if path[0] != "q1" else path:
        if fleet.catalog.get_tenant("acme").shard != target:
            moves.move(fleet.catalog, "acme", target, mode="offline")
    assert fleet.catalog.get_tenant("acme").shard == path[-1]
    assert assert_one_home(fleet, "acme", before) == path[-1]


def test_round_trip_promote_demote(fleet):
    before = _rows(fleet, "s1", "acme")
    promoted = moves.promote(fleet.catalog, "acme", to="d1", mode="offline")
    assert promoted.kind.value == "promote"
    tenant = fleet.catalog.get_tenant("acme")
    assert (tenant.shard, tenant.tier.value) == ("d1", "dedicated")
    assert_one_home(fleet, "acme", before)
    demoted = moves.demote(fleet.catalog, "acme", to="s1", mode="offline")
    assert demoted.kind.value == "demote"
    tenant = fleet.catalog.get_tenant("acme")
    assert (tenant.shard, tenant.tier.value) == ("s1", "shared")
    assert assert_one_home(fleet, "acme", before) == "s1"
    # Demote without --drop-source keeps the emptied database, marked retired.
    assert fleet.catalog.get_shard("d1").state.value == "retired"
    assert count_rows(fleet.engine("d1"), "acme") == 0


def test_promote_to_new_server_and_demote_dropping_it(fleet, pg_servers):
    before = _rows(fleet, "s1", "acme")
    import uuid

    database = f"t_promo_{uuid.uuid4().hex[:10]}"
    done = moves.promote(
        fleet.catalog, "acme", server=pg_servers[1], database=database, mode="offline"
    )
    assert done.succeeded
    shard = fleet.catalog.get_shard(database)
    assert shard.tier.value == "dedicated"
    fleet.urls[database] = shard.url
    assert assert_one_home(fleet, "acme", before) == database
    # demote: the ring picks a shared shard; --drop-source drops the database
    demoted = moves.demote(fleet.catalog, "acme", drop_source=True, mode="offline")
    assert demoted.succeeded
    with pytest.raises(UnknownShard):
        fleet.catalog.get_shard(database)
    server = sa.create_engine(pg_servers[1])
    with server.connect() as conn:
        assert not conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
        ).first()
    server.dispose()
    home = assert_one_home(fleet, "acme", before)
    assert fleet.catalog.get_shard(home).tier.value == "shared"


def _constant(fleet: Fleet, shard: str) -> str | None:
    """The tenant installed as *shard*'s constant (shard revision s0007), or None."""
    engine = fleet.engine(shard)
    try:
        with engine.begin() as conn:
            return constant_tenant(conn)
    finally:
        engine.dispose()


def test_moves_make_and_retire_the_dedicated_constant(fleet):
    """A promote makes the tenant its dedicated database's constant (when the target's
    residency row arrives); an aborted promote and a demote's switch take it back, in the
    transaction that writes the residency: the database itself keeps it true."""
    assert _constant(fleet, "d1") is None  # marked dedicated at shard add, but empty
    before = _rows(fleet, "s1", "acme")
    seen: dict[str, str | None] = {}
    hooks = AtCheckpoint("verified", lambda: seen.update(copying=_constant(fleet, "d1")))
    with pytest.raises(VerificationFailed):
        moves.promote(
            fleet.catalog, "acme", to="d1", mode="offline", hooks=_Both(hooks, Corrupt(fleet, "d1"))
        )
    assert seen == {"copying": "acme"}  # incoming: the tenant's rows are all it has
    assert _constant(fleet, "d1") is None  # aborted: its residency row is gone
    _untouched(fleet, before)
    moves.promote(fleet.catalog, "acme", to="d1", mode="offline")
    assert (_constant(fleet, "d1"), _constant(fleet, "s1")) == ("acme", None)
    moves.demote(fleet.catalog, "acme", to="s1", mode="offline")
    assert _constant(fleet, "d1") is None  # moved: its leftovers show to no one
    assert assert_one_home(fleet, "acme", before) == "s1"


class _Both:
    def __init__(self, *hooks):
        self.hooks = hooks

    def checkpoint(self, name: str) -> None:
        for hook in self.hooks:
            hook.checkpoint(name)


# -- refusals: nothing frozen, nothing copied --------------------------------------------


def _untouched(fleet: Fleet, before, *, target: bool = True) -> None:
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    assert fleet.catalog.get_tenant("acme").state.value == "active"
    assert residency(fleet.engine("s1"), "acme") == "active"
    assert _rows(fleet, "s1", "acme") == before
    if target:
        assert count_rows(fleet.engine("s2"), "acme") == 0
    assert not moves.list_moves(fleet.catalog, live=True)


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        ("s1", MoveRefused, "lives on shard 's1' already"),
        ("nowhere", UnknownShard, "unknown shard"),
    ],
)
def test_refused_targets(fleet, target, error, words):
    before = _rows(fleet, "s1", "acme")
    with pytest.raises(error, match=words):
        moves.move(fleet.catalog, "acme", target, mode="offline")
    _untouched(fleet, before)


def test_refuses_draining_target(fleet):
    before = _rows(fleet, "s1", "acme")
    fleet.catalog.set_shard_state("s2", "draining")
    with pytest.raises(ShardNotActive, match="draining"):
        moves.move(fleet.catalog, "acme", "s2", mode="offline")
    _untouched(fleet, before)


def test_refuses_occupied_dedicated_target(fleet):
    before = _rows(fleet, "s1", "acme")
    moves.promote(fleet.catalog, "neighbor", to="d1", mode="offline")
    with pytest.raises(ShardOccupied, match="already holds tenant 'neighbor'"):
        moves.promote(fleet.catalog, "acme", to="d1", mode="offline")
    _untouched(fleet, before)


def test_refuses_other_revision(fleet):
    before = _rows(fleet, "s1", "acme")
    from tenantry.migrations import downgrade

    assert downgrade(fleet.catalog, "d0001", shards=["s2"], jobs=1).ok
    with pytest.raises(MoveRefused, match="migration revision d0001"):
        moves.move(fleet.catalog, "acme", "s2", mode="offline")
    _untouched(fleet, before, target=False)


def test_refuses_unreachable_target(fleet):
    before = _rows(fleet, "s1", "acme")
    fleet.catalog.add_shard("gone", "postgresql://app:S3cretPw@127.0.0.1:1/nothing", prepare=False)
    with pytest.raises(ShardUnavailable) as info:
        moves.move(fleet.catalog, "acme", "gone", mode="offline")
    assert "S3cretPw" not in str(info.value)
    _untouched(fleet, before)


def test_refuses_table_without_tenant_in_primary_key(fleet):
    before = _rows(fleet, "s1", "acme")
    for shard in ("s1", "s2"):
        with fleet.engine(shard).begin() as conn:
            conn.execute(sa.text("CREATE TABLE notes (id int PRIMARY KEY, tenant_id text)"))
    with pytest.raises(SchemaContractError, match="notes"):
        moves.move(fleet.catalog, "acme", "s2", mode="offline")
    _untouched(fleet, before)


def test_one_live_move_per_tenant(fleet):
    mover = moves.Mover(fleet.catalog)
    planned = mover.plan("acme", "s2")
    with pytest.raises(MoveInProgress, match=f"move {planned.id}"):
        mover.plan("acme", "q1")
    with pytest.raises(Exception, match="being moved"):
        fleet.catalog.remove_tenant("acme")
    aborted = moves.abort(fleet.catalog, planned.id)
    assert aborted.state is MoveState.ABORTED and not aborted.live
    _untouched(fleet, _rows(fleet, "s1", "acme"))


# -- verification gates the switch --------------------------------------------------------


class Corrupt:
    """Test seam: damage the target copy just before verification."""

    def __init__(self, fleet: Fleet, target: str) -> None:
        self.fleet, self.target = fleet, target

    def checkpoint(self, name: str) -> None:
        if name == "verified":
            with self.fleet.engine(self.target).begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE chargers SET name = 'tampered' WHERE tenant_id = 'acme' AND id = 1"
                    )
                )


def test_verification_failure_rolls_back(fleet):
    before = _rows(fleet, "s1", "acme")
    with pytest.raises(VerificationFailed) as info:
        moves.move(fleet.catalog, "acme", "s2", mode="offline", hooks=Corrupt(fleet, "s2"))
    assert info.value.tables == ["chargers"]
    record = moves.list_moves(fleet.catalog)[0]
    assert record.state is MoveState.ABORTED and not record.live
    assert "chargers" in (record.error or "")
    _untouched(fleet, before)


def test_abort_after_switch_is_refused(fleet):
    class StopAfterSwitch:
        def checkpoint(self, name: str) -> None:
            if name == "cleaned":
                raise RuntimeError("stop here")

    # A failure after the switch is not rolled back: the move stays live, saying why.
    with pytest.raises(MoveError, match=r"stopped \(cleaned\): stop here; run `tenantry moves"):
        moves.move(fleet.catalog, "acme", "s2", mode="offline", hooks=StopAfterSwitch())
    live = moves.list_moves(fleet.catalog, live=True)[0]
    assert live.state is MoveState.CLEANED and live.error == "stop here"
    with pytest.raises(MoveError, match="can only be completed"):
        moves.abort(fleet.catalog, live.id)
    before = _rows(fleet, "s2", "acme")
    (done,) = moves.resume(fleet.catalog)
    assert done.succeeded
    assert assert_one_home(fleet, "acme", before) == "s2"


# -- the CLI --------------------------------------------------------------------------------


def test_cli_move_list_show_json(fleet):
    runner = CliRunner()
    base = ["--catalog", fleet.catalog_url]
    env = {"TENANTRY_ALEMBIC_CONFIG": str(fleet.catalog.settings.alembic_config)}
    result = runner.invoke(
        cli, [*base, "move", "acme", "--to", "s2", "--mode", "offline", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["state"] == "cleaned" and record["target"] == "s2" and record["live"] is False
    listed = json.loads(runner.invoke(cli, [*base, "moves", "list", "--json"], env=env).output)
    assert [m["id"] for m in listed] == [record["id"]]
    shown = runner.invoke(cli, [*base, "moves", "show", str(record["id"])], env=env)
    assert shown.exit_code == 0 and "cleaned" in shown.output
    bad = runner.invoke(cli, [*base, "move", "acme", "--to", "nowhere"], env=env)
    assert bad.exit_code == 1 and "unknown shard" in bad.output
    assert "Traceback" not in bad.output
    none = runner.invoke(cli, [*base, "moves", "resume"], env=env)
    assert none.exit_code == 0 and "no unfinished moves" in none.output
