"""A refused ``promote --server`` changes nothing, and an aborted one drops only the
database it provably created.

Before: the journal recorded the new database as the move's before creating it, so a
promote refused because the database existed aborted by deleting the tenant's rows at
"the target" (its own home, when the name was its shard's database) or by dropping
another shard's database.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from movefleet import Fleet, build_fleet, count_rows, residency, seed, tenant_rows

from tenantry import moves
from tenantry.errors import MoveRefused
from tenantry.moves.journal import Journal


@pytest.fixture
def fleet(make_pg_database):
    """s1 (server 0) with tenants acme and neighbor; d1 dedicated (server 1) with bigco."""
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("d1", make_pg_database(1), "dedicated")],
    )
    for tenant in ("acme", "neighbor"):
        built.catalog.add_tenant(tenant, shard="s1")
        seed(built.engine("s1"), tenant, sessions=30)
    built.catalog.add_tenant("bigco", tier="dedicated", shard="d1")
    seed(built.engine("d1"), "bigco", sessions=30)
    yield built
    built.close()


def database_of(fleet: Fleet, shard: str) -> str:
    name = sa.make_url(fleet.urls[shard]).database
    assert name is not None
    return name


def snapshot(fleet: Fleet) -> dict[str, object]:
    """Every tenant's rows at its home, the placements, and what the journal holds."""
    engines = {shard: fleet.engine(shard) for shard in ("s1", "d1")}
    try:
        return {
            "rows": {
                tenant: tenant_rows(engines[shard], tenant)
                for tenant, shard in (("acme", "s1"), ("neighbor", "s1"), ("bigco", "d1"))
            },
            "residency": {
                tenant: residency(engines[shard], tenant)
                for tenant, shard in (("acme", "s1"), ("bigco", "d1"))
            },
            "placements": {t.id: t.shard for t in fleet.catalog.list_tenants()},
            "shards": sorted(s.name for s in fleet.catalog.list_shards()),
            "moves": len(moves.list_moves(fleet.catalog)),
        }
    finally:
        for engine in engines.values():
            engine.dispose()


def exists(server: str, database: str) -> bool:
    engine = sa.create_engine(server)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
            ).first()
        return found is not None
    finally:
        engine.dispose()


@pytest.mark.parametrize("which", ["its-own-home", "another-shards-database"])
def test_promote_into_an_existing_database_is_refused_and_changes_nothing(
    fleet: Fleet, pg_servers: list[str], which: str
) -> None:
    shard, server = ("s1", pg_servers[0]) if which == "its-own-home" else ("d1", pg_servers[1])
    database = database_of(fleet, shard)
    before = snapshot(fleet)
    assert count_rows(fleet.engine(shard), "acme" if shard == "s1" else "bigco") > 0
    with pytest.raises(MoveRefused, match="exists already") as refused:
        moves.promote(fleet.catalog, "acme", server=server, database=database, mode="offline")
    assert "\n" not in str(refused.value)
    assert snapshot(fleet) == before  # not a row, not a journal record
    assert exists(server, database)


def test_promote_under_an_existing_shard_name_is_refused(
    fleet: Fleet, pg_servers: list[str]
) -> None:
    before = snapshot(fleet)
    with pytest.raises(MoveRefused, match="shard 'd1' exists already"):
        moves.promote(fleet.catalog, "acme", server=pg_servers[1], database="d1")
    assert snapshot(fleet) == before


def test_the_default_name_taken_by_a_database_outside_the_fleet_is_refused(
    fleet: Fleet, pg_servers: list[str], make_pg_database
) -> None:
    # a database named like the tenant, not a shard: someone else's
    stranger = make_pg_database(1, name="acme")
    engine = sa.create_engine(stranger)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE precious (id int)"))
        conn.execute(sa.text("INSERT INTO precious VALUES (1), (2)"))
    engine.dispose()
    before = snapshot(fleet)
    with pytest.raises(MoveRefused, match="database 'acme'"):
        moves.promote(fleet.catalog, "acme", server=pg_servers[1], mode="offline")
    assert snapshot(fleet) == before
    engine = sa.create_engine(stranger)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM precious")).scalar() == 2
    engine.dispose()


def test_an_abort_drops_only_the_database_the_move_recorded_creating(
    fleet: Fleet, pg_servers: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote stopped after provisioning, before its move ran: abort drops the
    database it created (its identity recorded), but not one whose identity it never
    recorded (a crash between creating it and recording it): that one is left."""
    from tenantry.moves.mover import Mover

    # What the journal holds when the mover dies right after provisioning.
    monkeypatch.setattr(Mover, "run", lambda self, move_id: self.journal.get(move_id))
    for recorded in (True, False):
        database = f"t_promo_{uuid.uuid4().hex[:10]}"
        move = moves.promote(
            fleet.catalog, "acme", server=pg_servers[1], database=database, mode="offline"
        )
        journal = Journal(fleet.catalog)
        provisioned = dict(journal.get(move.id).artifacts["provisioned"])
        assert provisioned["database_id"]  # recorded once created
        if not recorded:
            journal.update(move.id, artifacts={"provisioned": {**provisioned, "database_id": None}})
        aborted = moves.abort(fleet.catalog, move.id)
        assert aborted.ended_at is not None
        assert exists(pg_servers[1], database) is not recorded
        assert fleet.catalog.get_tenant("acme").shard == "s1"
        engine = fleet.engine("s1")
        assert residency(engine, "acme") == "active"
        engine.dispose()
