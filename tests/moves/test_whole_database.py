"""A move sees the whole database, or refuses before anything is frozen (issue 13,
items 2 and 5): tenant rows in another schema, and foreign keys from tables that do
not move with the tenant, would be left behind or lost to ON DELETE CASCADE."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from movefleet import Fleet, build_fleet, count_rows, residency, seed, tenant_rows

from tenantry import moves
from tenantry.errors import SchemaContractError

#: DDL applied to both shards (the fleet's schema stays one), then what the probe checks.
CASES = {
    "tenant-table-in-another-schema": (
        [
            "CREATE SCHEMA billing",
            "CREATE TABLE billing.invoices (tenant_id varchar(63), id int,"
            " PRIMARY KEY (tenant_id, id))",
        ],
        "INSERT INTO billing.invoices VALUES ('acme', 1), ('acme', 2)",
        "billing.invoices",
    ),
    "cascading-key-from-another-schema": (
        [
            "CREATE SCHEMA notes",
            "CREATE TABLE notes.user_notes (id int PRIMARY KEY, tenant varchar(63),"
            " user_id int, FOREIGN KEY (tenant, user_id) REFERENCES public.users"
            " (tenant_id, id) ON DELETE CASCADE)",
        ],
        "INSERT INTO notes.user_notes VALUES (1, 'acme', 1), (2, 'acme', 2)",
        "notes.user_notes",
    ),
}


@pytest.fixture
def fleet(make_pg_database):
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
    )
    built.catalog.add_tenant("acme", shard="s1")
    seed(built.engine("s1"), "acme", sessions=10)
    yield built
    built.close()


def execute(fleet: Fleet, shard: str, *statements: str) -> None:
    engine = fleet.engine(shard)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    engine.dispose()


def extra_rows(fleet: Fleet, shard: str, table: str) -> int:
    engine = fleet.engine(shard)
    with engine.connect() as conn:
        found = int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    engine.dispose()
    return found


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_a_move_would_not_see_make_it_refuse(fleet: Fleet, case: str, mode: str) -> None:
    ddl, rows_sql, table = CASES[case]
    execute(fleet, "s1", *ddl, rows_sql)
    execute(fleet, "s2", *ddl)
    engine = fleet.engine("s1")
    before = tenant_rows(engine, "acme")
    engine.dispose()
    with pytest.raises(SchemaContractError) as refused:
        moves.move(fleet.catalog, "acme", "s2", mode=mode)
    message = str(refused.value)
    assert table in message and "\n" not in message
    # nothing frozen, nothing copied, nothing deleted, no live move
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    engine = fleet.engine("s1")
    assert residency(engine, "acme") == "active"
    assert tenant_rows(engine, "acme") == before
    engine.dispose()
    assert extra_rows(fleet, "s1", table) == 2
    assert count_rows(fleet.engine("s2"), "acme") == 0
    assert not moves.list_moves(fleet.catalog, live=True)
