"""A move reflects the tenant tables once per end before its rows move.

Counted on real PostgreSQL with a ``before_cursor_execute`` listener that matches the
catalog query of :func:`tenantry.moves.tables.tenant_tables`, until the move reaches
its ``verified`` step (after the copy, or after an online move's final freeze). An
online move reflects the source once more at its cut, for the freezes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from movefleet import Fleet, build_fleet, drop_replication, seed
from sqlalchemy.engine import make_url

from tenantry import moves
from tenantry.moves import MoveState

#: A line of the column query every PostgreSQL reflection of the tenant tables runs.
_REFLECTION = "format_type(a.atttypid, a.atttypmod) AS column_type"


class _Reflections:
    """Counts reflections per database until a move reaches checkpoint *until*."""

    def __init__(self, until: str) -> None:
        self.until = until
        self.counting = True
        self.counts: Counter[str] = Counter()

    def checkpoint(self, name: str) -> None:
        if name == self.until:
            self.counting = False

    def __call__(self, conn, _cursor, statement, _parameters, _context, _many) -> None:
        if self.counting and _REFLECTION in statement:
            self.counts[str(conn.engine.url.database)] += 1


@pytest.fixture
def fleet(make_pg_database) -> Iterator[Fleet]:
    """s1 (server 0) and s2 (server 1); tenants acme and neighbor on s1, with rows."""
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
    )
    for tenant in ("acme", "neighbor"):
        built.catalog.add_tenant(tenant, shard="s1")
        engine = built.engine("s1")
        seed(engine, tenant, sessions=30)
        engine.dispose()
    try:
        yield built
    finally:
        drop_replication(built)
        built.close()


def _reflections(fleet: Fleet, mode: str) -> tuple[int, int]:
    """Reflections of (source, target) before the move's ``verified`` step."""
    counter = _Reflections("verified")
    sa.event.listen(sa.Engine, "before_cursor_execute", counter)
    try:
        done = moves.move(fleet.catalog, "acme", "s2", mode=mode, hooks=counter)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", counter)
    assert done.state is MoveState.CLEANED and done.succeeded
    assert done.mode.value == mode
    source, target = (str(make_url(fleet.urls[s]).database) for s in ("s1", "s2"))
    return counter.counts[source], counter.counts[target]


def test_offline_move_reflects_each_end_once(fleet):
    assert _reflections(fleet, "offline") == (1, 1)


def test_online_move_reflects_each_end_once_and_the_source_again_at_the_cut(fleet):
    assert _reflections(fleet, "online") == (2, 1)
