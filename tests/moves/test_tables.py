"""Which tables move: reflection, foreign-key order, and the schema contract."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tenantry.errors import SchemaContractError, TenantryError
from tenantry.moves.tables import (
    TenantTable,
    _parents_first,
    check_same_tables,
    check_whole_database,
    tenant_tables,
    unindexed_foreign_keys,
)
from tenantry.shardmap.drivers import make_engine


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def run(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def reflect(engine: sa.Engine, **options: str) -> list[TenantTable]:
    with engine.connect() as conn:
        return tenant_tables(conn, **options)


# Declared in reverse alphabetical order of their place in the chain, children first.
CHAIN = (
    "CREATE TABLE zeta_parent (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "name TEXT, PRIMARY KEY (tenant_id, id))",
    "CREATE TABLE mid_child (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "parent_id INTEGER, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, parent_id) REFERENCES zeta_parent (tenant_id, id))",
    "CREATE TABLE alpha_grandchild (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "child_id INTEGER, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, child_id) REFERENCES mid_child (tenant_id, id))",
    "CREATE TABLE beta_other (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "PRIMARY KEY (id, tenant_id))",
    # reference data and tenantry's own tables stay where they are
    "CREATE TABLE countries (code TEXT PRIMARY KEY, name TEXT)",
    "CREATE TABLE tenantry_residency (tenant_id VARCHAR(63) PRIMARY KEY, state TEXT)",
)


def test_parents_come_before_children_whatever_their_names(engine: sa.Engine) -> None:
    run(engine, *CHAIN)
    tables = reflect(engine)
    names = [t.name for t in tables]
    assert names == ["beta_other", "zeta_parent", "mid_child", "alpha_grandchild"]
    child = tables[2]
    assert child.columns == ("tenant_id", "id", "parent_id")
    assert child.primary_key == ("tenant_id", "id")
    # a key may carry the tenant column anywhere in it
    assert tables[0].primary_key == ("id", "tenant_id")
    assert child.schema is None
    assert child.sequences == ()


def test_column_types_as_each_database_spells_them(engine: sa.Engine) -> None:
    run(
        engine,
        "CREATE TABLE t (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
        "amount NUMERIC(12, 2), at TIMESTAMP, PRIMARY KEY (tenant_id, id))",
    )
    (table,) = reflect(engine)
    if engine.dialect.name == "postgresql":
        assert table.column_types == (
            "character varying(63)",
            "integer",
            "numeric(12,2)",
            "timestamp without time zone",
        )
    else:
        assert table.column_types == ("VARCHAR(63)", "INTEGER", "NUMERIC(12, 2)", "TIMESTAMP")
    assert table.column_type("amount") == table.column_types[2]
    assert table.column_type("nope") is None


def test_a_primary_key_without_the_tenant_column_is_refused(engine: sa.Engine) -> None:
    run(
        engine,
        *CHAIN,
        "CREATE TABLE invoices (tenant_id VARCHAR(63) NOT NULL, id INTEGER PRIMARY KEY)",
    )
    with pytest.raises(SchemaContractError) as info:
        reflect(engine)
    error = info.value
    assert isinstance(error, TenantryError)
    assert error.table == "invoices"
    assert "primary key (id)" in error.reason
    message = str(error)
    assert "invoices" in message
    assert "make tenant_id part of the primary key" in message


def test_a_table_without_primary_key_is_refused(engine: sa.Engine) -> None:
    run(engine, "CREATE TABLE events (tenant_id VARCHAR(63) NOT NULL, body TEXT)")
    with pytest.raises(SchemaContractError, match=r"events.*no primary key") as info:
        reflect(engine)
    assert info.value.table == "events"


def test_a_table_that_references_tenant_rows_without_the_column_is_refused(
    engine: sa.Engine,
) -> None:
    run(
        engine,
        *CHAIN,
        "CREATE TABLE audit (id INTEGER PRIMARY KEY, t VARCHAR(63), parent INTEGER, "
        "FOREIGN KEY (t, parent) REFERENCES zeta_parent (tenant_id, id))",
    )
    with pytest.raises(SchemaContractError, match="leave its rows behind") as info:
        reflect(engine)
    assert info.value.table == "audit"
    assert "zeta_parent" in info.value.reason


def test_another_tenant_column_name(engine: sa.Engine) -> None:
    run(
        engine,
        "CREATE TABLE teams (org_id TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (org_id, id))",
        "CREATE TABLE legacy (tenant_id TEXT NOT NULL, id INTEGER PRIMARY KEY)",
    )
    assert [t.name for t in reflect(engine, column="org_id")] == ["teams"]
    with pytest.raises(SchemaContractError):
        reflect(engine)


def test_generated_columns_are_not_copied_postgresql(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE TABLE lines (tenant_id text NOT NULL, id int NOT NULL, qty int, "
        "price numeric, total numeric GENERATED ALWAYS AS (qty * price) STORED, "
        "note text, PRIMARY KEY (tenant_id, id))",
        "ALTER TABLE lines DROP COLUMN note",
    )
    (table,) = reflect(pg_engine)
    assert table.columns == ("tenant_id", "id", "qty", "price")
    assert table.column_types == ("text", "integer", "integer", "numeric")


def test_generated_columns_are_not_copied_sqlite(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        run(
            engine,
            "CREATE TABLE lines (tenant_id TEXT NOT NULL, id INTEGER NOT NULL, qty INTEGER, "
            "double_qty INTEGER GENERATED ALWAYS AS (qty * 2) VIRTUAL, price REAL, "
            "total REAL GENERATED ALWAYS AS (qty * price) STORED, PRIMARY KEY (tenant_id, id))",
        )
        (table,) = reflect(engine)
    finally:
        engine.dispose()
    assert table.columns == ("tenant_id", "id", "qty", "price")
    assert table.column_types == ("TEXT", "INTEGER", "INTEGER", "REAL")


def test_serial_and_identity_sequences_are_found(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE SCHEMA app",
        "CREATE TABLE a (tenant_id text, id serial, n int, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE b (tenant_id text, id bigint GENERATED ALWAYS AS IDENTITY, "
        "PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE c (tenant_id text, id int GENERATED BY DEFAULT AS IDENTITY, "
        "other bigserial, PRIMARY KEY (tenant_id, id))",
        # a default drawn from a sequence that no column owns
        "CREATE SEQUENCE app.shared_ids",
        "CREATE TABLE d (tenant_id text, id bigint DEFAULT nextval('app.shared_ids'), "
        "PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE e (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
    )
    found = {t.name: t.sequences for t in reflect(pg_engine)}
    assert found == {
        "a": (("id", "public.a_id_seq"),),
        "b": (("id", "public.b_id_seq"),),
        "c": (("id", "public.c_id_seq"), ("other", "public.c_other_seq")),
        "d": (("id", "app.shared_ids"),),
        "e": (),
    }


def test_tables_of_another_schema(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE SCHEMA app",
        "CREATE TABLE app.items (tenant_id text, id serial, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE public.other (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
    )
    (table,) = reflect(pg_engine, schema="app")
    assert (table.schema, table.name, table.qualified_name) == ("app", "items", "app.items")
    assert table.sequences == (("id", "app.items_id_seq"),)
    # Every application schema; the default one's tables carry no schema.
    found = reflect(pg_engine)
    assert [(t.schema, t.name) for t in found] == [("app", "items"), (None, "other")]
    assert found[0].sequences == (("id", "app.items_id_seq"),)
    # The setting limits the schemas (the default one always moves).
    with pg_engine.connect() as conn:
        assert [t.name for t in tenant_tables(conn, schemas=["nothing"])] == ["other"]
        assert len(tenant_tables(conn, schemas=["app"])) == 2


def test_system_and_own_schemas_never_move(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE TEMPORARY TABLE scratch (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
        "CREATE SCHEMA IF NOT EXISTS tenantry",
        "CREATE TABLE tenantry.own (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE items (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
    )
    assert [t.qualified_name for t in reflect(pg_engine)] == ["items"]


def test_a_foreign_key_across_schemas_orders_parents_first(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE SCHEMA zz",
        "CREATE TABLE zz.accounts (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE aa_invoices (tenant_id text, id int, account int,"
        " PRIMARY KEY (tenant_id, id),"
        " FOREIGN KEY (tenant_id, account) REFERENCES zz.accounts (tenant_id, id))",
        # a name that sorts before the parent's, in a schema that sorts first too
        "CREATE SCHEMA a",
        "CREATE TABLE a.lines (tenant_id text, id int, invoice int, PRIMARY KEY (tenant_id, id),"
        " FOREIGN KEY (tenant_id, invoice) REFERENCES aa_invoices (tenant_id, id))",
    )
    assert [t.qualified_name for t in reflect(pg_engine)] == [
        "zz.accounts",
        "aa_invoices",
        "a.lines",
    ]


def test_a_table_of_a_schema_that_does_not_move_may_not_reference_tenant_rows(
    pg_engine: sa.Engine,
) -> None:
    run(
        pg_engine,
        "CREATE TABLE items (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
        "CREATE SCHEMA stats",
        "CREATE TABLE stats.hits (tenant_id text, id int, item int, PRIMARY KEY (tenant_id, id),"
        " CONSTRAINT hits_item FOREIGN KEY (tenant_id, item) REFERENCES items (tenant_id, id))",
    )
    assert [t.qualified_name for t in reflect(pg_engine)] == ["items", "stats.hits"]
    with pg_engine.connect() as conn, pytest.raises(SchemaContractError) as info:
        tenant_tables(conn, schemas=["other"])
    assert info.value.table == "stats.hits"
    message = str(info.value)
    assert "'hits_item'" in message and "TENANTRY_MOVE_SCHEMAS" in message
    assert "\n" not in message


def test_partitions_are_copied_through_their_parent(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE TABLE events (tenant_id text, id int, PRIMARY KEY (tenant_id, id)) "
        "PARTITION BY LIST (tenant_id)",
        "CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('acme')",
        "CREATE TABLE events_rest PARTITION OF events DEFAULT",
    )
    assert [t.name for t in reflect(pg_engine)] == ["events"]


def test_cycles_and_self_references_do_not_hang(engine: sa.Engine) -> None:
    deferrable = " DEFERRABLE" if engine.dialect.name == "postgresql" else ""
    run(
        engine,
        "CREATE TABLE root (tenant_id TEXT, id INTEGER, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE b_node (tenant_id TEXT, id INTEGER, a_id INTEGER, up INTEGER, "
        "PRIMARY KEY (tenant_id, id), "
        "FOREIGN KEY (tenant_id, up) REFERENCES b_node (tenant_id, id))",
        "CREATE TABLE a_node (tenant_id TEXT, id INTEGER, b_id INTEGER, root_id INTEGER, "
        "PRIMARY KEY (tenant_id, id), "
        "FOREIGN KEY (tenant_id, b_id) REFERENCES b_node (tenant_id, id), "
        "FOREIGN KEY (tenant_id, root_id) REFERENCES root (tenant_id, id))",
        "CREATE TABLE leaf (tenant_id TEXT, id INTEGER, a_id INTEGER, "
        "PRIMARY KEY (tenant_id, id), "
        "FOREIGN KEY (tenant_id, a_id) REFERENCES a_node (tenant_id, id))",
    )
    if engine.dialect.name == "postgresql":
        run(
            engine,
            "ALTER TABLE b_node ADD FOREIGN KEY (tenant_id, a_id) REFERENCES a_node "
            f"(tenant_id, id){deferrable}",
        )
    else:  # SQLite cannot add a foreign key to an existing table: rebuild b_node
        run(
            engine,
            "DROP TABLE b_node",
            "CREATE TABLE b_node (tenant_id TEXT, id INTEGER, a_id INTEGER, up INTEGER, "
            "PRIMARY KEY (tenant_id, id), "
            "FOREIGN KEY (tenant_id, up) REFERENCES b_node (tenant_id, id), "
            "FOREIGN KEY (tenant_id, a_id) REFERENCES a_node (tenant_id, id))",
        )
    first = [t.name for t in reflect(engine)]
    # root has no parents. Then a_node and b_node wait for each other (and leaf for
    # a_node): each has one unplaced parent, so the first by name breaks the cycle.
    assert first == ["root", "a_node", "b_node", "leaf"]
    assert [t.name for t in reflect(engine)] == first


def test_parents_first_is_deterministic_and_total() -> None:
    assert _parents_first({}) == []
    assert _parents_first({"b": [], "a": [], "c": ["a"]}) == ["a", "b", "c"]
    # a three-cycle and a self-reference, plus a child of the cycle
    graph = {"x": ["z"], "y": ["x"], "z": ["y"], "s": ["s"], "w": ["y", "s"]}
    order = _parents_first(graph)
    assert sorted(order) == sorted(graph)
    assert order == _parents_first(dict(reversed(graph.items())))
    assert order.index("s") < order.index("w") and order.index("y") < order.index("w")
    # references to tables outside the set are no one's business
    assert _parents_first({"a": ["b"], "b": []}) == ["b", "a"]


def test_parents_first_keeps_every_edge_outside_cycles() -> None:
    rng = random.Random(5)
    for _ in range(300):
        names = [f"t{i}" for i in range(rng.randint(1, 12))]
        graph = {n: rng.sample(names, rng.randint(0, min(3, len(names)))) for n in names}
        order = _parents_first(graph)
        assert sorted(order) == sorted(names)
        place = {n: i for i, n in enumerate(order)}
        for child, refs in graph.items():
            for parent in refs:
                if place[parent] > place[child]:
                    # only allowed when the child is also an ancestor of the parent
                    assert reaches(graph, parent, child), (graph, order)


def reaches(graph: dict[str, list[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    return False


def table(name: str, *columns: str) -> TenantTable:
    return TenantTable(name, ("tenant_id", *columns), ("tenant_id", "id"))


def test_same_tables_accepts_columns_in_another_order() -> None:
    check_same_tables([table("a", "id", "x")], [table("a", "x", "id"), table("extra", "id")])
    check_same_tables([], [])


def test_same_tables_names_the_first_missing_table() -> None:
    with pytest.raises(SchemaContractError, match="missing on the target") as info:
        check_same_tables(
            [table("a", "id"), table("b", "id"), table("c", "id")], [table("a", "id")]
        )
    assert info.value.table == "b"
    assert "tenantry migrate" in str(info.value)


def test_same_tables_names_the_columns_that_differ() -> None:
    with pytest.raises(SchemaContractError) as info:
        check_same_tables([table("a", "id", "x", "y")], [table("a", "id", "y", "z")])
    assert info.value.table == "a"
    assert "the target lacks x" in info.value.reason
    assert "the target has z in addition" in info.value.reason


def test_same_tables_between_sqlite_and_postgresql(pg_engine: sa.Engine, sqlite_url: str) -> None:
    lite = make_engine(sqlite_url)
    try:
        for engine in (pg_engine, lite):
            run(engine, *CHAIN)
        check_same_tables(reflect(lite), reflect(pg_engine))
        run(lite, "ALTER TABLE mid_child ADD COLUMN note TEXT")
        with pytest.raises(SchemaContractError, match="lacks note") as info:
            check_same_tables(reflect(lite), reflect(pg_engine))
        assert info.value.table == "mid_child"
    finally:
        lite.dispose()


def test_foreign_keys_without_an_index_are_named_with_the_fix(pg_engine: sa.Engine) -> None:
    run(
        pg_engine,
        "CREATE TABLE owners (tenant_id text, id int, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE pets (tenant_id text, id int, owner_id int, vet_id int,"
        " PRIMARY KEY (tenant_id, id),"
        " FOREIGN KEY (tenant_id, owner_id) REFERENCES owners (tenant_id, id),"
        " FOREIGN KEY (tenant_id, vet_id) REFERENCES owners (tenant_id, id))",
        # Leads with the key's columns in another order: it serves the check.
        "CREATE INDEX ON pets (vet_id, tenant_id, id)",
        # Partial: it does not.
        "CREATE INDEX ON pets (tenant_id, owner_id) WHERE owner_id > 0",
    )
    with pg_engine.connect() as conn:
        tables = tenant_tables(conn)
        assert unindexed_foreign_keys(conn, tables) == [
            "table pets has no index on (tenant_id, owner_id) for its foreign key to owners: "
            "deleting a tenant's owners rows (a move's cleanup) scans pets once per row; "
            "CREATE INDEX ON pets (tenant_id, owner_id)"
        ]
    run(pg_engine, "CREATE INDEX ON pets (tenant_id, owner_id)")
    with pg_engine.connect() as conn:
        assert unindexed_foreign_keys(conn, tenant_tables(conn)) == []


def test_the_demo_schema_indexes_its_foreign_keys(pg_engine: sa.Engine) -> None:
    from tenantry.demo.models import Base

    Base.metadata.create_all(pg_engine)
    with pg_engine.connect() as conn:
        assert unindexed_foreign_keys(conn, tenant_tables(conn)) == []


def test_a_key_from_any_schema_to_a_tenant_table_is_found_in_the_catalog(
    pg_engine: sa.Engine,
) -> None:
    run(
        pg_engine,
        "CREATE TABLE items (tenant_id text, id int, PRIMARY KEY (tenant_id, id))"
        " PARTITION BY LIST (tenant_id)",
        "CREATE TABLE items_rest PARTITION OF items DEFAULT",
        "CREATE SCHEMA app",
        "CREATE TABLE app.lines (tenant_id text, id int, item int, PRIMARY KEY (tenant_id, id),"
        " FOREIGN KEY (tenant_id, item) REFERENCES items (tenant_id, id))",
    )
    with pg_engine.connect() as conn:
        check_whole_database(conn, tenant_tables(conn))  # tenant tables, partitions: fine
    # tenantry's own schema is never reflected, but its keys are seen
    run(
        pg_engine,
        "CREATE SCHEMA IF NOT EXISTS tenantry",
        "CREATE TABLE tenantry.audit (id int PRIMARY KEY, t text, item int,"
        " CONSTRAINT audit_item FOREIGN KEY (t, item) REFERENCES items (tenant_id, id))",
    )
    with pg_engine.connect() as conn:
        tables = tenant_tables(conn)
        assert [t.qualified_name for t in tables] == ["items", "app.lines"]
        with pytest.raises(SchemaContractError) as info:
            check_whole_database(conn, tables)
    assert info.value.table == "tenantry.audit"
    assert "'audit_item'" in str(info.value) and "\n" not in str(info.value)


def test_same_tables_match_by_schema_and_name() -> None:
    here = [TenantTable("invoices", ("tenant_id", "id"), ("tenant_id", "id"), schema="billing")]
    there = [TenantTable("invoices", ("tenant_id", "id"), ("tenant_id", "id"))]
    with pytest.raises(SchemaContractError, match="missing on the target") as info:
        check_same_tables(here, there)
    assert info.value.table == "billing.invoices"
    check_same_tables(here, here)
