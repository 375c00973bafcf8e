"""A step that fails leaves a clean, explained state.

Before, a driver error raised during COPY (psycopg raises those unwrapped) escaped as a
traceback, the journal's error stayed empty, the tenant stayed frozen at its source and
``moves resume`` repeated the failure; an error on the source's connection was
reported under the target's name. Now the reason is in the journal, the right shard is
named, a move that has not switched is rolled back (the tenant home and writable) and
the CLI prints one line.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from movefleet import Fleet, build_fleet, count_rows, residency, seed, tenant_rows

from tenantry import moves
from tenantry.cli import cli
from tenantry.demo import MIGRATIONS
from tenantry.errors import MoveRolledBack
from tenantry.moves.journal import MoveState


@pytest.fixture
def fleet(make_pg_database):
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
    )
    built.catalog.add_tenant("acme", shard="s1")
    built.catalog.add_tenant("zeta", shard="s2")
    seed(built.engine("s1"), "acme", users=8, sessions=30)
    seed(built.engine("s2"), "zeta", users=3, sessions=5)
    yield built
    built.close()


def snapshot(fleet: Fleet) -> dict[str, object]:
    """Every row of both tenants at both ends, and acme's residency on each."""
    found: dict[str, object] = {}
    for shard in ("s1", "s2"):
        engine = fleet.engine(shard)
        for tenant in ("acme", "zeta"):
            found[f"{shard}/{tenant}"] = tenant_rows(engine, tenant)
        found[f"{shard}/residency"] = residency(engine, "acme")
        engine.dispose()
    return found


def execute(fleet: Fleet, shard: str, statement: str) -> None:
    engine = fleet.engine(shard)
    with engine.begin() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


def assert_rolled_back(fleet: Fleet, before: dict[str, object], reason: str) -> None:
    """The tenant is home, active and writable; nothing of it is at the target; the
    journal says why; no move is left live."""
    assert snapshot(fleet) == before
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    (record,) = moves.list_moves(fleet.catalog)
    assert record.state is MoveState.ABORTED and not record.live
    assert reason in (record.error or ""), record.error
    engine = fleet.engine("s1")
    with engine.begin() as conn:  # writable again
        conn.execute(sa.text("UPDATE users SET name = name WHERE tenant_id = 'acme'"))
    engine.dispose()


def test_a_copy_the_target_refuses_is_rolled_back_and_named(fleet: Fleet) -> None:
    # The target refuses the rows (a constraint the source lacks): psycopg's COPY
    # raises the CheckViolation itself, not through SQLAlchemy.
    execute(fleet, "s2", "ALTER TABLE chargers ADD CONSTRAINT no_chargers CHECK (false) NOT VALID")
    before = snapshot(fleet)
    with pytest.raises(MoveRolledBack) as failed:
        moves.move(fleet.catalog, "acme", "s2", mode="offline")
    message = str(failed.value)
    assert "\n" not in message
    assert "rolled back (tenant 'acme' stays on 's1', writable)" in message
    assert "shard 's2' failed" in message and "no_chargers" in message
    assert_rolled_back(fleet, before, "no_chargers")


def test_the_cli_prints_one_line(fleet: Fleet) -> None:
    execute(fleet, "s2", "ALTER TABLE chargers ADD CONSTRAINT no_chargers CHECK (false) NOT VALID")
    before = snapshot(fleet)
    result = CliRunner().invoke(
        cli,
        ["--catalog", fleet.catalog_url, "move", "acme", "--to", "s2", "--mode", "offline"],
        env={"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)},
    )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rolled back" in errors[0] and "no_chargers" in errors[0]
    assert "Traceback" not in result.output
    assert_rolled_back(fleet, before, "no_chargers")


class KillSourceCopy:
    """At ``copy-mid``: terminate the mover's connection reading the source."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.killed = 0

    def checkpoint(self, name: str) -> None:
        if name != "copy-mid":
            return
        engine = self.fleet.engine("s1")
        with engine.connect() as conn:
            self.killed = int(
                conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND backend_type = 'client backend' AND state <> 'idle'"
                    )
                ).scalar_one()
            )
        engine.dispose()


def test_a_source_failure_names_the_source(fleet: Fleet) -> None:
    before = snapshot(fleet)
    hooks = KillSourceCopy(fleet)
    with pytest.raises(MoveRolledBack) as failed:
        moves.move(fleet.catalog, "acme", "s2", mode="offline", hooks=hooks)
    assert hooks.killed == 1
    message = str(failed.value)
    assert "shard 's1'" in message and "shard 's2'" not in message, message
    assert_rolled_back(fleet, before, "shard 's1'")
    # and a new move of the tenant goes through
    done = moves.move(fleet.catalog, "acme", "s2", mode="offline")
    assert done.succeeded
    assert count_rows(fleet.engine("s1"), "acme") == 0
    engine = fleet.engine("s2")
    assert tenant_rows(engine, "acme") == before["s1/acme"]
    engine.dispose()


class DdlBeforeSwitch:
    """Just before the switch: a column added by hand on one end."""

    def __init__(self, fleet: Fleet, shard: str) -> None:
        self.fleet, self.shard = fleet, shard

    def checkpoint(self, name: str) -> None:
        if name == "switched":
            execute(self.fleet, self.shard, "ALTER TABLE chargers ADD COLUMN note text")


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("shard", ["s1", "s2"])
def test_ddl_by_hand_during_a_move_is_caught_before_the_switch(
    fleet: Fleet, mode: str, shard: str
) -> None:
    before = snapshot(fleet)
    with pytest.raises(MoveRolledBack) as failed:
        moves.move(fleet.catalog, "acme", "s2", mode=mode, hooks=DdlBeforeSwitch(fleet, shard))
    message = str(failed.value)
    assert f"table 'chargers' cannot be moved: it changed on shard {shard!r}" in message
    assert_rolled_back(fleet, before, "changed on shard")


def test_an_online_moves_summary_counts_the_rows_it_verified(fleet: Fleet) -> None:
    """Not "0 rows, 0 B copied in 0.00s": logical replication copied them, the
    verification counted them."""
    engine = fleet.engine("s1")
    rows = count_rows(engine, "acme")
    engine.dispose()
    result = CliRunner().invoke(
        cli,
        ["--catalog", fleet.catalog_url, "move", "acme", "--to", "s2", "--mode", "online"],
        env={"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)},
    )
    assert result.exit_code == 0, result.output
    assert f"done; {rows:,} rows replicated and verified; writes frozen" in result.output
