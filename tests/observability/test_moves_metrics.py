"""Movers' and fleet migrations' metrics: a move's steps and rows, a migration's results.

Movers and migrations report to the process's default registry when the ``metrics``
setting is on: the tests compare scrapes before and after known work.
"""

from __future__ import annotations

from typing import Any

from obshelpers import Scrape, value

from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.moves import NullObserver, move

STATES = ("frozen", "copied", "verified", "switched", "cleaned", "done")


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_an_offline_move_counted_step_by_step(fleet_of: Any, scrape: Any) -> None:
    fleet = fleet_of(metrics=True)
    rows = fleet.seed("acme", "s1", users=30, chargers=12)
    before = scrape(None)
    done = move(fleet.catalog, "acme", "s2", mode="offline")
    assert done.succeeded
    after = scrape(None)
    for state in STATES:
        assert delta(before, after, "tenantry_move_steps_total", kind="move", state=state) == 1
    assert delta(before, after, "tenantry_move_steps_total", kind="move", state="aborted") == 0
    assert delta(before, after, "tenantry_move_rows_copied_total") == rows == 42
    assert delta(before, after, "tenantry_move_bytes_copied_total") == done.stats["bytes"] > 0
    assert value(after, "tenantry_move_copy_rows_per_second") > 0
    assert value(after, "tenantry_moves_in_flight") == 0
    assert delta(before, after, "tenantry_move_freeze_seconds_count") == 1
    frozen = delta(before, after, "tenantry_move_freeze_seconds_sum")
    assert abs(frozen - done.stats["freeze_seconds"]) < 1e-6


class LagWatcher(NullObserver):
    """Scrapes the default registry whenever the mover notes replication lag."""

    def __init__(self, scrape: Any) -> None:
        self.scrape = scrape
        self.seen: list[float] = []

    def note(self, message: str) -> None:
        if message.startswith("replication lag"):
            got = self.scrape(None)
            self.seen.extend(
                v
                for (name, _labels), v in got.items()
                if name == "tenantry_move_replication_lag_bytes"
            )


def test_an_online_move_counted_with_its_lag_and_two_freezes(fleet_of: Any, scrape: Any) -> None:
    fleet = fleet_of(metrics=True)
    rows = fleet.seed("acme", "s1", users=20, chargers=5)
    watcher = LagWatcher(scrape)
    before = scrape(None)
    done = move(fleet.catalog, "acme", "s2", mode="online", max_freeze=5.0, observer=watcher)
    assert done.succeeded and done.mode.value == "online"
    after = scrape(None)
    for state in STATES:
        assert delta(before, after, "tenantry_move_steps_total", kind="move", state=state) == 1
    assert delta(before, after, "tenantry_move_rows_copied_total") == rows
    # the bytes its table-sync workers were seen copying (none, if each table was done
    # before the mover looked), as the journal records them
    copied = done.stats.get("copied_bytes", 0)
    assert delta(before, after, "tenantry_move_bytes_copied_total") == copied
    assert delta(before, after, "tenantry_move_freeze_seconds_count") == 2  # cut, final
    assert watcher.seen and all(v >= 0 for v in watcher.seen)  # the gauge, mid-move
    assert not [k for k in after if k[0] == "tenantry_move_replication_lag_bytes"]


def test_a_rolled_back_move_counts_aborted(fleet_of: Any, scrape: Any) -> None:
    from tenantry.moves.mover import Mover

    fleet = fleet_of(metrics=True)
    fleet.seed("acme", "s1")
    mover = Mover(fleet.catalog)
    planned = mover.plan("acme", "s2", mode="offline")
    before = scrape(None)
    mover.abort(planned.id)
    after = scrape(None)
    assert delta(before, after, "tenantry_move_steps_total", kind="move", state="aborted") == 1
    assert delta(before, after, "tenantry_move_steps_total", kind="move", state="frozen") == 0
    assert value(after, "tenantry_moves_in_flight") == 0


def test_fleet_migrations_counted_by_result(fleet_of: Any, scrape: Any) -> None:
    fleet = fleet_of(metrics=True)  # migrated to head already (two databases)
    before = scrape(None)
    run = upgrade(fleet.catalog, jobs=1)
    assert [r.result for r in run.results] == ["skipped", "skipped"]
    again = upgrade(fleet.catalog, "head", jobs=2, shards=["s1"])
    assert again.ok
    after = scrape(None)
    assert delta(before, after, "tenantry_migrations_total", result="skipped") == 3
    assert delta(before, after, "tenantry_migrations_total", result="upgraded") == 0
    assert delta(before, after, "tenantry_migration_seconds_count") == 3


def test_fleet_migration_upgrades_counted(make_pg_database: Any, scrape: Any) -> None:
    from tenantry import Catalog, load_settings

    url = make_pg_database(0)
    settings = load_settings(catalog_url=url, alembic_config=str(MIGRATIONS), metrics=True)
    with Catalog(settings=settings) as catalog:
        catalog.init()
        for name in ("a", "b", "c"):
            catalog.add_shard(name, make_pg_database(1))
        before = scrape(None)
        assert upgrade(catalog, jobs=2).ok
        after = scrape(None)
    assert delta(before, after, "tenantry_migrations_total", result="upgraded") == 3
    assert delta(before, after, "tenantry_migration_seconds_count") == 3
    assert delta(before, after, "tenantry_migration_seconds_sum") > 0
