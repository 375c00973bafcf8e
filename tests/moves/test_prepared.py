"""Prepared transactions cannot commit behind a move's freeze.

A transaction prepared before a move (``PREPARE TRANSACTION``) holding a write of the
moving tenant would commit it on the old home after the copy (``COMMIT PREPARED``).
The freeze waits prepared transactions out like running ones, and past its timeout
the move stops, naming them, with the tenant unfrozen and nothing moved.
"""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa
from movefleet import Fleet, build_fleet, count_rows, residency, seed, tenant_rows

from tenantry import moves
from tenantry.errors import FreezeTimeout, MoveError


@pytest.fixture
def fleet(make_pg_database):
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
    )
    built.catalog.settings = built.catalog.settings.model_copy(update={"freeze_timeout": 0.5})
    built.catalog.add_tenant("acme", shard="s1")
    seed(built.engine("s1"), "acme", sessions=20)
    yield built
    built.close()


def conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def rows(fleet: Fleet, shard: str) -> dict[str, list[tuple[object, ...]]]:
    engine = fleet.engine(shard)
    try:
        return tenant_rows(engine, "acme")
    finally:
        engine.dispose()


def test_a_prepared_write_holds_the_move_off_until_it_is_resolved(fleet: Fleet) -> None:
    before = rows(fleet, "s1")
    with psycopg.connect(conninfo(fleet.urls["s1"]), autocommit=True) as writer:
        writer.execute("BEGIN")
        writer.execute(
            "INSERT INTO users (tenant_id, id, email, name) VALUES ('acme', 9001, 'p@x', 'p')"
        )
        writer.execute("PREPARE TRANSACTION 'tenantry-test-prepared'")
    try:
        with pytest.raises((FreezeTimeout, MoveError), match="tenantry-test-prepared"):
            moves.move(fleet.catalog, "acme", "s2", mode="offline")
        # nothing moved, the tenant writes again at its home
        assert fleet.catalog.get_tenant("acme").shard == "s1"
        engine = fleet.engine("s1")
        assert residency(engine, "acme") == "active"
        engine.dispose()
        assert count_rows(fleet.engine("s2"), "acme") == 0
        assert rows(fleet, "s1") == before
    finally:
        with psycopg.connect(conninfo(fleet.urls["s1"]), autocommit=True) as admin:
            admin.execute("COMMIT PREPARED 'tenantry-test-prepared'")
    # resolved: the move goes through, and the prepared write moved with the tenant
    (live,) = moves.list_moves(fleet.catalog, live=True) or [None]
    if live is not None:
        moves.abort(fleet.catalog, live.id)
    done = moves.move(fleet.catalog, "acme", "s2", mode="offline")
    assert done.succeeded
    after = rows(fleet, "s2")
    assert sum(len(v) for v in after.values()) == sum(len(v) for v in before.values()) + 1
    assert count_rows(fleet.engine("s1"), "acme") == 0
