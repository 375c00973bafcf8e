"""``tenant remove``: refused while the tenant has rows at its home (naming them per
table), unless ``--purge`` (deleted in batches, none left) or ``--keep-rows`` (left,
and said so). On a PostgreSQL and a SQLite shard; other tenants are never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
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

from tenantry import PlacementError, TenantHasRows, UnknownTenant, moves
from tenantry.cli import cli
from tenantry.errors import ConfigurationError

#: acme's rows: 5 users, 5 chargers, 10 charging sessions
COUNTS = {"charging_sessions": 10, "chargers": 5, "users": 5}


@pytest.fixture(params=["postgresql", "sqlite"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path):
    """Shard ``home`` (PostgreSQL or SQLite) holding acme and neighbor, COUNTS rows each."""
    if request.param == "postgresql":
        url = request.getfixturevalue("make_pg_database")(0)
    else:
        url = f"sqlite:///{tmp_path / 'home.db'}"
    built = build_fleet(f"sqlite:///{tmp_path / 'catalog.db'}", [("home", url, "shared")])
    for tenant in ("acme", "neighbor"):
        built.catalog.add_tenant(tenant, shard="home")
        engine = built.engine("home")
        if request.param == "postgresql":
            seed(engine, tenant, users=5, chargers=5, sessions=10)
        else:
            seed_sqlite(engine, tenant)
        engine.dispose()
    yield built
    built.close()


def snapshot(fleet: Fleet, tenant: str) -> tuple[int, str, str | None]:
    engine = fleet.engine("home")
    try:
        return (
            count_rows(engine, tenant),
            fingerprint(tenant_rows(engine, tenant)),
            residency(engine, tenant),
        )
    finally:
        engine.dispose()


def test_remove_is_refused_while_the_tenant_has_rows(fleet: Fleet) -> None:
    before = (snapshot(fleet, "acme"), snapshot(fleet, "neighbor"), fleet.catalog.map_version())
    assert moves.tenant_row_counts(fleet.catalog, "acme") == COUNTS
    with pytest.raises(TenantHasRows) as caught:
        moves.remove_tenant(fleet.catalog, "acme")
    assert isinstance(caught.value, PlacementError)
    assert str(caught.value) == (
        "tenant 'acme' still has 20 row(s) on shard 'home' (chargers 5, charging_sessions 10, "
        "users 5): delete them with `tenantry tenant remove acme --purge`, or leave them "
        "with --keep-rows (a tenant added again as 'acme' would see them)"
    )
    assert caught.value.counts == COUNTS
    assert (caught.value.tenant_id, caught.value.shard) == ("acme", "home")
    # nothing changed
    after = (snapshot(fleet, "acme"), snapshot(fleet, "neighbor"), fleet.catalog.map_version())
    assert after == before and before[0][2] == "active"
    assert fleet.catalog.get_tenant("acme").state.value == "active"


def test_purge_deletes_every_row_of_the_tenant_and_only_its(fleet: Fleet) -> None:
    neighbor = snapshot(fleet, "neighbor")
    seen: list[tuple[str, int]] = []
    done = moves.remove_tenant(
        fleet.catalog,
        "acme",
        rows="purge",
        batch_size=3,
        progress=lambda table, n: seen.append((table, n)),
    )
    assert done.policy == "purge" and not done.kept
    assert done.rows == COUNTS and done.deleted == COUNTS
    assert ("charging_sessions", 3) in seen  # in batches
    rows, _, state = snapshot(fleet, "acme")
    assert (rows, state) == (0, None)
    assert snapshot(fleet, "neighbor") == neighbor
    with pytest.raises(UnknownTenant):
        fleet.catalog.get_tenant("acme")
    # a new tenant with the same id starts empty
    fleet.catalog.add_tenant("acme", shard="home")
    assert moves.tenant_row_counts(fleet.catalog, "acme") == dict.fromkeys(COUNTS, 0)
    # and one with no rows is removed without any flag
    assert moves.remove_tenant(fleet.catalog, "acme").rows == dict.fromkeys(COUNTS, 0)


def test_keep_rows_unregisters_and_leaves_the_rows(fleet: Fleet) -> None:
    before = snapshot(fleet, "acme")
    done = moves.remove_tenant(fleet.catalog, "acme", rows="keep")
    assert done.kept and done.rows == COUNTS and done.deleted == {}
    assert snapshot(fleet, "acme")[:2] == before[:2]
    with pytest.raises(UnknownTenant):
        fleet.catalog.get_tenant("acme")
    # as said: a tenant added again with this id sees them
    fleet.catalog.add_tenant("acme", shard="home")
    assert moves.tenant_row_counts(fleet.catalog, "acme") == COUNTS


def test_a_tenant_being_moved_is_not_removed(fleet: Fleet) -> None:
    before = snapshot(fleet, "acme")
    planned = moves.Mover(fleet.catalog).journal.create(
        "acme", "home", "home", kind=moves.MoveKind.MOVE, mode=moves.MoveMode.OFFLINE
    )
    with pytest.raises(PlacementError, match=f"being moved \\(move {planned.id}\\)"):
        moves.remove_tenant(fleet.catalog, "acme", rows="purge")
    assert snapshot(fleet, "acme") == before


def test_an_unknown_rows_policy_is_refused(fleet: Fleet) -> None:
    with pytest.raises(ConfigurationError, match="invalid rows policy 'all'"):
        moves.remove_tenant(fleet.catalog, "acme", rows="all")  # type: ignore[arg-type]


def test_the_cli(fleet: Fleet) -> None:
    runner = CliRunner(env={"COLUMNS": "400"})

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli, ["--catalog", fleet.catalog_url, *args], prog_name="tenantry")
        return result.exit_code, result.stdout, result.stderr

    neighbor = snapshot(fleet, "neighbor")
    code, out, err = invoke("tenant", "remove", "acme")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error: tenant 'acme' still has 20 row(s) on shard 'home' (chargers 5, "
        "charging_sessions 10, users 5): delete them with `tenantry tenant remove acme "
        "--purge`, or leave them with --keep-rows (a tenant added again as 'acme' would see "
        "them)"
    ]
    code, out, err = invoke("tenant", "remove", "acme", "--purge", "--keep-rows")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == "Error: give --purge or --keep-rows, not both"
    assert snapshot(fleet, "acme")[0] == 20

    code, out, err = invoke("tenant", "remove", "acme", "--purge")
    assert (code, err) == (0, "")
    assert out == (
        "removed tenant acme: deleted 20 row(s) on shard home "
        "(chargers 5, charging_sessions 10, users 5)\n"
    )
    assert snapshot(fleet, "acme")[0] == 0

    code, out, err = invoke("tenant", "remove", "neighbor", "--keep-rows", "--json")
    assert (code, err) == (0, "")
    record = json.loads(out)
    assert (record["id"], record["shard"], record["rows"]) == ("neighbor", "home", "keep")
    assert record["row_counts"] == COUNTS and record["deleted"] == {}
    assert snapshot(fleet, "neighbor")[:2] == neighbor[:2]

    fleet.catalog.add_tenant("neighbor", shard="home")
    code, out, err = invoke("tenant", "remove", "neighbor", "--keep-rows")
    assert (code, err) == (0, "")
    assert out == (
        "removed tenant neighbor: its 20 row(s) stay on shard home; a tenant added again "
        "as neighbor will see them\n"
    )
