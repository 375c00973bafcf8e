"""Operator actions that would break a live move are refused: the
target of a live move cannot be drained, retired or removed, nor its source retired
or removed, until the move is finished or aborted."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from movefleet import Fleet, build_fleet, seed

from tenantry import moves
from tenantry.cli import cli
from tenantry.errors import PlacementError
from tenantry.moves.mover import Mover


@pytest.fixture
def fleet(make_pg_database, tmp_path):
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("q1", f"sqlite:///{tmp_path / 'q1.db'}", "shared"),
        ],
    )
    built.catalog.add_tenant("acme", shard="s1")
    seed(built.engine("s1"), "acme", sessions=10)
    yield built
    built.close()


def test_the_ends_of_a_live_move_are_guarded(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    # a move planned and then left (its mover died before running it)
    with monkeypatch.context() as patch:
        patch.setattr(Mover, "run", lambda self, move_id: self.journal.get(move_id))
        live = moves.move(fleet.catalog, "acme", "s2", mode="offline")
    assert live.ended_at is None
    states = {s.name: s.state for s in fleet.catalog.list_shards()}

    refusals = [
        (lambda: fleet.catalog.set_shard_state("s2", "retired"), "target"),
        (lambda: fleet.catalog.set_shard_state("s2", "draining"), "target"),
        (lambda: fleet.catalog.remove_shard("s2"), "target"),
        (lambda: fleet.catalog.set_shard_state("s1", "retired"), "source"),
    ]
    for action, end in refusals:
        with pytest.raises(PlacementError) as refused:
            action()
        message = str(refused.value)
        assert f"the {end} of live move {live.id}" in message
        assert f"tenantry moves abort {live.id}" in message and "\n" not in message
    assert {s.name: s.state for s in fleet.catalog.list_shards()} == states

    # the CLI: one line, exit 1, nothing changed
    env = {"TENANTRY_CATALOG_URL": fleet.catalog_url}
    out = CliRunner().invoke(cli, ["shard", "set", "s2", "--state", "retired"], env=env)
    assert out.exit_code == 1
    assert f"live move {live.id}" in out.output and "Traceback" not in out.output
    assert {s.name: s.state for s in fleet.catalog.list_shards()} == states

    # draining the source is fine (the tenant is leaving it), and other shards are free
    assert fleet.catalog.set_shard_state("s1", "draining").state.value == "draining"
    fleet.catalog.set_shard_state("s1", "active")
    assert fleet.catalog.set_shard_state("q1", "retired").state.value == "retired"

    moves.abort(fleet.catalog, live.id)
    assert fleet.catalog.set_shard_state("s2", "retired").state.value == "retired"
    assert fleet.catalog.remove_shard("s2").name == "s2"
