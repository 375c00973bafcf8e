"""Copying a tenant between shards, and deleting its rows in batches.

Every direction runs against real databases: PostgreSQL to PostgreSQL across the two
test servers (psycopg COPY), SQLite to PostgreSQL, PostgreSQL to SQLite and SQLite to
SQLite (batches). The PostgreSQL sessions use unusual time zones and date styles, so
that nothing depends on the servers' defaults.
"""

from __future__ import annotations

import datetime as dt
import math
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from tenantry.errors import SchemaContractError
from tenantry.moves.copy import (
    TableCopy,
    _binary_unsafe,
    _same_types,
    copy_tenant,
    delete_tenant_rows,
)
from tenantry.moves.tables import TenantTable, tenant_tables
from tenantry.moves.verify import compare_digests, digest_tenant
from tenantry.shardmap.drivers import WRITE, make_engine
from tenantry.testing import DatabaseFactory

# The application's schema, as its migrations would create it on each database.
PG_SCHEMA = (
    "CREATE TABLE accounts (tenant_id varchar(63) NOT NULL, id integer NOT NULL, "
    "name varchar(50), PRIMARY KEY (tenant_id, id))",
    "CREATE TABLE orders (tenant_id varchar(63) NOT NULL, id bigserial NOT NULL, "
    "account_id integer NOT NULL, amount numeric(12,2), note text, paid boolean, "
    "placed_at timestamptz, due date, meta jsonb, doc json, blob bytea, big bigint, "
    "ratio double precision, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, id))",
    "CREATE TABLE lines (tenant_id varchar(63) NOT NULL, "
    "id integer GENERATED ALWAYS AS IDENTITY, order_id bigint NOT NULL, qty integer, "
    "total integer GENERATED ALWAYS AS (qty * 2) STORED, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id))",
    "CREATE TABLE countries (code text PRIMARY KEY, name text)",
    "CREATE TABLE tenantry_residency (tenant_id varchar(63) PRIMARY KEY, state text)",
)
SQLITE_SCHEMA = (
    "CREATE TABLE accounts (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "name VARCHAR(50), PRIMARY KEY (tenant_id, id))",
    "CREATE TABLE orders (tenant_id VARCHAR(63) NOT NULL, id BIGINT NOT NULL, "
    "account_id INTEGER NOT NULL, amount NUMERIC(12, 2), note TEXT, paid BOOLEAN, "
    "placed_at DATETIME, due DATE, meta JSON, doc JSON, blob BLOB, big BIGINT, "
    "ratio FLOAT, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, id))",
    "CREATE TABLE lines (tenant_id VARCHAR(63) NOT NULL, id INTEGER NOT NULL, "
    "order_id BIGINT NOT NULL, qty INTEGER, "
    "total INTEGER GENERATED ALWAYS AS (qty * 2) VIRTUAL, PRIMARY KEY (tenant_id, id), "
    "FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id))",
    "CREATE TABLE countries (code TEXT PRIMARY KEY, name TEXT)",
    "CREATE TABLE tenantry_residency (tenant_id VARCHAR(63) PRIMARY KEY, state TEXT)",
)

# The same tables as the application's models see them (for writing and reading).
META = sa.MetaData()
ACCOUNTS = sa.Table(
    "accounts",
    META,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(50)),
)
ORDERS = sa.Table(
    "orders",
    META,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("account_id", sa.Integer),
    sa.Column("amount", sa.Numeric(12, 2)),
    sa.Column("note", sa.Text),
    sa.Column("paid", sa.Boolean),
    sa.Column("placed_at", sa.DateTime(timezone=True)),
    sa.Column("due", sa.Date),
    sa.Column(
        "meta", sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    ),
    sa.Column("doc", sa.JSON(none_as_null=True)),
    sa.Column("blob", sa.LargeBinary),
    sa.Column("big", sa.BigInteger),
    sa.Column("ratio", sa.Float),
)
LINES = sa.Table(
    "lines",
    META,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("order_id", sa.BigInteger),
    sa.Column("qty", sa.Integer),
    sa.Column("total", sa.Integer),
)
TABLES = (ACCOUNTS, ORDERS, LINES)

NOTES = (
    "plain",
    "",
    "tab\there",
    "new\nline\r\n",
    "back\\slash \\N \\.",
    'quote\'s "double" (paren, comma)',
    "naïve ☃ 日本語",
    None,
)

# Sessions that render values unlike the defaults: a copy or digest must not care.
SOURCE_OPTIONS = "-c TimeZone=Asia/Kolkata -c DateStyle=SQL,DMY -c extra_float_digits=0"
TARGET_OPTIONS = (
    "-c TimeZone=America/New_York -c DateStyle=German,DMY -c IntervalStyle=sql_standard "
    "-c bytea_output=escape"
)


def pg_engine(url: str, options: str = "") -> sa.Engine:
    return make_engine(url, connect_args={"options": options} if options else {})


def create_schema(engine: sa.Engine, *extra: str) -> None:
    schema = PG_SCHEMA if engine.dialect.name == "postgresql" else SQLITE_SCHEMA
    with engine.begin() as conn:
        for statement in (*schema, *extra):
            conn.exec_driver_sql(statement)


def make_rows(tenant: str, orders: int) -> dict[str, list[dict[str, Any]]]:
    """Deterministic rows of every type, NULLs included, for one tenant."""
    accounts = [
        {"tenant_id": tenant, "id": i, "name": None if i % 5 == 4 else f"{tenant} n°{i}"}
        for i in range(1, max(2, orders // 10) + 1)
    ]
    start = dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=dt.UTC)
    order_rows = []
    for i in range(1, orders + 1):
        order_rows.append(
            {
                "tenant_id": tenant,
                "id": i,
                "account_id": 1 + i % len(accounts),
                "amount": None if i % 7 == 0 else Decimal(i * 3779 % 10_000_000) / 100 - 1000,
                "note": NOTES[i % len(NOTES)],
                "paid": (True, False, None)[i % 3],
                "placed_at": None
                if i % 11 == 0
                else start + dt.timedelta(seconds=i * 3607, microseconds=i * 7919 % 1_000_000),
                "due": dt.date(1999, 12, 31) + dt.timedelta(days=i * 13),
                "meta": None
                if i % 9 == 0
                else "a JSON string"
                if i % 13 == 0
                else {"i": i, "tags": ["a", "ü"], "nested": {"x": i / 4, "ok": i % 2 == 0}},
                "doc": None if i % 4 == 0 else [i, "x", None, {"b": 1, "a": 2}],
                "blob": None if i % 6 == 0 else bytes([i % 256, 0, 255, 10, 92]) * (i % 5),
                "big": (2**62 + i) * (-1 if i % 2 else 1),
                "ratio": None if i % 10 == 0 else i / 7 + 1e-300,
            }
        )
    lines = [
        {"tenant_id": tenant, "id": 2 * i + k, "order_id": i, "qty": (i + k) % 10}
        for i in range(1, orders // 2 + 1)
        for k in (0, 1)
    ]
    return {"accounts": accounts, "orders": order_rows, "lines": lines}


def insert_rows(engine: sa.Engine, rows: dict[str, list[dict[str, Any]]]) -> None:
    with engine.begin() as conn:
        conn.execute(ACCOUNTS.insert(), rows["accounts"])
        conn.execute(ORDERS.insert(), rows["orders"])
        overriding = " OVERRIDING SYSTEM VALUE" if engine.dialect.name == "postgresql" else ""
        conn.execute(
            sa.text(
                f"INSERT INTO lines (tenant_id, id, order_id, qty){overriding} "
                "VALUES (:tenant_id, :id, :order_id, :qty)"
            ),
            rows["lines"],
        )


def normal(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def read_rows(engine: sa.Engine, tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    """The tenant's rows as the application reads them, by table, in key order."""
    out = {}
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # psycopg parses no other date style, and floats come as text
            conn.exec_driver_sql("SET LOCAL DateStyle = ISO")
            conn.exec_driver_sql("SET LOCAL extra_float_digits = 3")
        for table in TABLES:
            rows = conn.execute(
                sa.select(table).where(table.c.tenant_id == tenant).order_by(table.c.id)
            )
            out[table.name] = [tuple(normal(v) for v in row) for row in rows]
    return out


def run_copy(
    source: sa.Engine, target: sa.Engine, tenant: str = "acme", **options: Any
) -> list[TableCopy]:
    """Copy as the mover does: one read-only snapshot, one target transaction."""
    with source.connect() as src, target.connect() as dst:
        if src.dialect.name == "postgresql":
            src = src.execution_options(isolation_level="REPEATABLE READ")
        dst = dst.execution_options(**WRITE)
        with src.begin():
            if src.dialect.name == "postgresql":
                src.exec_driver_sql("SET TRANSACTION READ ONLY")
            tables = tenant_tables(src)
            with dst.begin():
                return copy_tenant(src, dst, tenant, tables, **options)


def python_digest(
    engine: sa.Engine, tenant: str = "acme", tables: list[TenantTable] | None = None
) -> dict[str, Any]:
    with engine.connect() as conn, conn.begin():
        tables = tenant_tables(conn) if tables is None else tables
        return digest_tenant(conn, tenant, tables, method="python")


def scalar(engine: sa.Engine, query: str, **params: Any) -> Any:
    with engine.begin() as conn:
        return conn.execute(sa.text(query), params).scalar()


@dataclass
class Ends:
    source: sa.Engine
    target: sa.Engine
    acme: dict[str, list[dict[str, Any]]]


PAIRS = ["pg-pg", "sqlite-pg", "pg-sqlite", "sqlite-sqlite"]


def open_end(
    kind: str, server: int, factory: DatabaseFactory | None, path: Path, options: str
) -> sa.Engine:
    if kind == "pg":
        assert factory is not None
        return pg_engine(factory(server), options)
    return make_engine(f"sqlite:///{path}")


@pytest.fixture(params=PAIRS)
def ends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ends]:
    """Source with tenants acme and globex; target with initech: both at one schema."""
    source_kind, target_kind = request.param.split("-")
    factory = request.getfixturevalue("make_pg_database") if "pg" in request.param else None
    source = open_end(source_kind, 0, factory, tmp_path / "source.db", SOURCE_OPTIONS)
    target = open_end(target_kind, 1, factory, tmp_path / "target.db", TARGET_OPTIONS)
    try:
        create_schema(source)
        create_schema(target)
        acme = make_rows("acme", 300)
        insert_rows(source, acme)
        insert_rows(source, make_rows("globex", 50))
        insert_rows(target, make_rows("initech", 40))
        yield Ends(source, target, acme)
    finally:
        source.dispose()
        target.dispose()


def test_copy_gives_the_same_rows(ends: Ends) -> None:
    initech = read_rows(ends.target, "initech")
    source_rows = read_rows(ends.source, "acme")
    reports: list[tuple[str, int, int]] = []
    points: list[str] = []

    copies = run_copy(
        ends.source,
        ends.target,
        batch_size=64,
        progress=lambda *r: reports.append(r),
        checkpoint=points.append,
    )

    assert [(c.table, c.rows) for c in copies] == [
        ("accounts", len(ends.acme["accounts"])),
        ("orders", 300),
        ("lines", 300),
    ]
    assert all(c.bytes > c.rows and c.seconds >= 0 for c in copies)
    assert read_rows(ends.target, "acme") == source_rows
    assert source_rows["orders"][0][4:6] == ("", False)  # the data is what we think
    assert read_rows(ends.target, "initech") == initech
    assert read_rows(ends.target, "globex") == {"accounts": [], "orders": [], "lines": []}
    assert read_rows(ends.source, "acme") == source_rows
    source_digest = python_digest(ends.source)
    assert compare_digests(source_digest, python_digest(ends.target)) == []
    assert source_digest["orders"].rows == 300
    # as the mover verifies: the source's table list (and column types) on both sides
    assert python_digest(ends.target, tables=reflect(ends.source)) == source_digest
    # generated columns are computed by the target
    assert scalar(ends.target, "SELECT count(*) FROM lines WHERE total = qty * 2") == 300 + 40
    assert points == ["copy-mid", "copy-table:accounts", "copy-table:orders", "copy-table:lines"]
    # progress ends each table with its totals, and never goes back
    for copy in copies:
        mine = [r for r in reports if r[0] == copy.table]
        assert mine[-1] == (copy.table, copy.rows, copy.bytes)
        assert [r[1] for r in mine] == sorted(r[1] for r in mine)


def test_copy_again_replaces_an_earlier_copy(ends: Ends) -> None:
    run_copy(ends.source, ends.target)
    with ends.target.begin() as conn:  # what an interrupted, older copy may leave
        conn.execute(sa.text("DELETE FROM lines WHERE tenant_id = 'acme' AND id > 100"))
        conn.execute(sa.text("UPDATE orders SET note = 'stale' WHERE tenant_id = 'acme'"))
        conn.execute(ACCOUNTS.insert(), [{"tenant_id": "acme", "id": 999, "name": "extra"}])
    initech = read_rows(ends.target, "initech")

    copies = run_copy(ends.source, ends.target)

    assert [c.rows for c in copies] == [len(ends.acme["accounts"]), 300, 300]
    assert read_rows(ends.target, "acme") == read_rows(ends.source, "acme")
    assert read_rows(ends.target, "initech") == initech


def test_a_copy_that_fails_midway_leaves_nothing(ends: Ends) -> None:
    def crash(point: str) -> None:
        if point == "copy-mid":
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_copy(ends.source, ends.target, batch_size=10, checkpoint=crash)
    assert read_rows(ends.target, "acme") == {"accounts": [], "orders": [], "lines": []}

    run_copy(ends.source, ends.target)
    assert read_rows(ends.target, "acme") == read_rows(ends.source, "acme")


def test_nothing_to_copy(ends: Ends) -> None:
    points: list[str] = []
    copies = run_copy(ends.source, ends.target, "nobody", checkpoint=points.append)
    assert [(c.table, c.rows) for c in copies] == [("accounts", 0), ("orders", 0), ("lines", 0)]
    assert points == ["copy-table:accounts", "copy-table:orders", "copy-table:lines"]
    with ends.source.connect() as conn:
        assert copy_tenant(conn, conn, "acme", []) == []
        with pytest.raises(ValueError, match="batch_size"):
            copy_tenant(conn, conn, "acme", tenant_tables(conn), batch_size=0)


def test_a_target_without_a_table_is_refused(ends: Ends) -> None:
    with ends.target.begin() as conn:
        conn.exec_driver_sql("DROP TABLE lines")
    with pytest.raises(SchemaContractError, match="missing on the target") as info:
        run_copy(ends.source, ends.target)
    assert info.value.table == "lines"
    assert count(ends.target, "orders", "acme") == 0
    assert count(ends.target, "orders", "initech") == 40


# sequences ------------------------------------------------------------------------------


@pytest.fixture(params=["pg", "sqlite"])
def to_postgresql(
    request: pytest.FixtureRequest, make_pg_database: DatabaseFactory, tmp_path: Path
) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """A source (PostgreSQL or SQLite) and a PostgreSQL target, at one schema."""
    source = open_end(request.param, 0, make_pg_database, tmp_path / "s.db", SOURCE_OPTIONS)
    target = pg_engine(make_pg_database(1), TARGET_OPTIONS)
    try:
        create_schema(source)
        create_schema(target)
        yield source, target
    finally:
        source.dispose()
        target.dispose()


def next_ids(target: sa.Engine, tenant: str = "acme") -> tuple[int, int]:
    """Ids the target gives the next order and line inserted without one."""
    with target.begin() as conn:
        order = conn.execute(
            sa.text("INSERT INTO orders (tenant_id, account_id) VALUES (:t, 1) RETURNING id"),
            {"t": tenant},
        ).scalar_one()
        line = conn.execute(
            sa.text("INSERT INTO lines (tenant_id, order_id, qty) VALUES (:t, :o, 1) RETURNING id"),
            {"t": tenant, "o": order},
        ).scalar_one()
    return order, line


def test_sequences_move_past_the_copied_ids(to_postgresql: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = to_postgresql
    insert_rows(source, make_rows("acme", 30))  # orders 1..30, lines 2..31
    insert_rows(target, make_rows("initech", 4))  # explicit ids: the sequences did not move
    run_copy(source, target)
    assert next_ids(target) == (31, 32)
    # "acme" on a shared shard: every tenant draws from the same sequences
    assert next_ids(target, "initech") == (32, 33)


def test_sequences_far_behind_are_set(to_postgresql: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = to_postgresql
    rows = make_rows("acme", 2)
    rows["orders"][1]["id"] = 500_000
    rows["lines"] = [{"tenant_id": "acme", "id": 70_000, "order_id": 500_000, "qty": 1}]
    insert_rows(source, rows)
    run_copy(source, target)
    assert next_ids(target) == (500_001, 70_001)


def test_sequences_never_go_back(to_postgresql: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = to_postgresql
    insert_rows(source, make_rows("acme", 30))
    with target.begin() as conn:
        conn.exec_driver_sql("SELECT setval('orders_id_seq', 9000)")
        conn.exec_driver_sql("SELECT setval('lines_id_seq', 40, false)")  # next: 40
    run_copy(source, target)
    assert next_ids(target) == (9001, 40)


# PostgreSQL to PostgreSQL: binary and text COPY ---------------------------------------


@pytest.fixture
def two_servers(make_pg_database: DatabaseFactory) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    source = pg_engine(make_pg_database(0), SOURCE_OPTIONS)
    target = pg_engine(make_pg_database(1), TARGET_OPTIONS)
    yield source, target
    source.dispose()
    target.dispose()


def test_text_format_when_column_types_differ(two_servers: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = two_servers
    mood = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')"
    feelings = (
        "CREATE TABLE feelings (tenant_id text, id int, moods mood[], at timestamp, "
        "span interval, f4 real, PRIMARY KEY (tenant_id, id))"
    )
    create_schema(source, mood, feelings)
    # The target's types differ: binary COPY would send int8 where numeric is
    # expected, and an array of another "mood" type.
    create_schema(
        target,
        "CREATE TYPE unrelated AS ENUM ('x')",
        mood,
        feelings,
        "ALTER TABLE orders ALTER COLUMN big TYPE numeric(30,0)",
        "ALTER TABLE accounts ALTER COLUMN name TYPE text",
    )
    oid = "SELECT 'mood[]'::regtype::oid"
    assert scalar(source, oid) != scalar(target, oid)
    insert_rows(source, make_rows("acme", 120))
    with source.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO feelings VALUES ('acme', 1, '{sad,happy}', '2024-03-01 04:05:06.789', "
            "'1 year 2 mons -3 days 04:05:06.5', 0.1), ('acme', 2, NULL, NULL, NULL, NULL)"
        )

    copies = run_copy(source, target)

    assert [c.rows for c in copies] == [12, 2, 120, 120]
    assert read_rows(target, "acme") == read_rows(source, "acme")
    query = "SELECT moods::text, at::text, span::text, f4::text FROM feelings ORDER BY id"
    with source.begin() as a, target.begin() as b:
        for conn in (a, b):
            conn.exec_driver_sql("SET LOCAL IntervalStyle = postgres")
            conn.exec_driver_sql("SET LOCAL DateStyle = ISO")
        assert a.exec_driver_sql(query).all() == b.exec_driver_sql(query).all()


def test_binary_copy_across_servers(two_servers: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = two_servers
    create_schema(source)
    create_schema(target)
    insert_rows(source, make_rows("acme", 50))
    with source.begin() as conn:  # text that only the server's encoding can carry
        conn.execute(sa.text("UPDATE accounts SET name = :n"), {"n": "\u00e9\U0001f600\x7f"})
    with source.connect() as a, target.connect() as b:
        tables, there = tenant_tables(a), tenant_tables(b)
        assert _binary_unsafe(a, tables) == set()
        assert all(_same_types(a, b, t, u) for t, u in zip(tables, there, strict=True))
    copies = run_copy(source, target)
    assert sum(c.rows for c in copies) == 5 + 50 + 50
    assert read_rows(target, "acme") == read_rows(source, "acme")


def test_a_large_table_streams_in_bounded_memory(two_servers: tuple[sa.Engine, sa.Engine]) -> None:
    source, target = two_servers
    table = (
        "CREATE TABLE events (tenant_id text NOT NULL, id bigint NOT NULL, at timestamptz, "
        "payload text, PRIMARY KEY (tenant_id, id))"
    )
    for engine in (source, target):
        with engine.begin() as conn:
            conn.exec_driver_sql(table)
    with source.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO events SELECT t, g, now(), repeat(md5(g::text), 4) "
            "FROM generate_series(1, 200000) g, (VALUES ('acme'), ('globex')) v(t) "
            "WHERE t = 'acme' OR g <= 1000"
        )
    reports: list[tuple[str, int, int]] = []

    tracemalloc.start()
    try:
        (copy,) = run_copy(source, target, progress=lambda *r: reports.append(r))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert copy.rows == 200_000
    assert copy.bytes > 200_000 * 128  # the payloads alone
    assert peak < copy.bytes / 20, (peak, copy.bytes)
    assert scalar(target, "SELECT count(*) FROM events WHERE tenant_id = 'acme'") == 200_000
    assert scalar(target, "SELECT count(*) FROM events WHERE tenant_id = 'globex'") == 0
    assert reports[-1] == ("events", 200_000, copy.bytes)
    assert [r[2] for r in reports] == sorted(r[2] for r in reports)


def test_a_copy_stopped_mid_stream_leaves_both_connections_usable(
    two_servers: tuple[sa.Engine, sa.Engine],
) -> None:
    source, target = two_servers
    for engine in (source, target):
        create_schema(engine)
    rows = make_rows("acme", 3000)  # orders: several blocks of COPY data
    insert_rows(source, rows)
    points: list[str] = []

    def stop(point: str) -> None:
        points.append(point)
        if point == "copy-mid":
            raise KeyboardInterrupt

    with source.connect() as src, target.connect() as dst:
        src = src.execution_options(isolation_level="REPEATABLE READ")
        with pytest.raises(KeyboardInterrupt):
            with src.begin(), dst.begin():
                tables = tenant_tables(src)
                tables = [t for t in tables if t.name == "orders"]
                copy_tenant(src, dst, "acme", tables, checkpoint=stop)
        # the source was still sending rows: it was stopped, and both can go on
        assert src.execute(sa.text("SELECT count(*) FROM orders")).scalar() == 3000
        assert dst.execute(sa.text("SELECT count(*) FROM orders")).scalar() == 0
        src.rollback()
        dst.rollback()
    assert points == ["copy-mid"]


def test_a_foreign_key_cycle_copies_when_deferrable(
    two_servers: tuple[sa.Engine, sa.Engine], tmp_path: Path
) -> None:
    pg = (
        "CREATE TABLE a_node (tenant_id text, id int, b_id int, PRIMARY KEY (tenant_id, id))",
        "CREATE TABLE b_node (tenant_id text, id int, a_id int, up int, "
        "PRIMARY KEY (tenant_id, id), FOREIGN KEY (tenant_id, a_id) REFERENCES a_node "
        "DEFERRABLE, FOREIGN KEY (tenant_id, up) REFERENCES b_node)",
        "ALTER TABLE a_node ADD FOREIGN KEY (tenant_id, b_id) REFERENCES b_node DEFERRABLE",
    )
    lite = (
        "CREATE TABLE a_node (tenant_id TEXT, id INTEGER, b_id INTEGER, PRIMARY KEY "
        "(tenant_id, id), FOREIGN KEY (tenant_id, b_id) REFERENCES b_node (tenant_id, id))",
        "CREATE TABLE b_node (tenant_id TEXT, id INTEGER, a_id INTEGER, up INTEGER, "
        "PRIMARY KEY (tenant_id, id), FOREIGN KEY (tenant_id, a_id) REFERENCES a_node "
        "(tenant_id, id), FOREIGN KEY (tenant_id, up) REFERENCES b_node (tenant_id, id))",
    )
    data = (
        "INSERT INTO a_node VALUES ('acme', 1, NULL), ('acme', 2, NULL)",
        # children before parents in key order: b 1 points up to b 2
        "INSERT INTO b_node VALUES ('acme', 2, 1, NULL), ('acme', 1, 2, 2)",
        "UPDATE a_node SET b_id = 3 - id",
    )
    pairs = [two_servers]
    lite_source = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    lite_target = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    pairs.append((lite_source, lite_target))
    try:
        for source, target in pairs:
            ddl = pg if source.dialect.name == "postgresql" else lite
            for engine in (source, target):
                with engine.begin() as conn:
                    for statement in ddl:
                        conn.exec_driver_sql(statement)
            with source.begin() as conn:
                if source.dialect.name == "sqlite":
                    conn.exec_driver_sql("PRAGMA defer_foreign_keys = ON")
                else:
                    conn.exec_driver_sql("SET CONSTRAINTS ALL DEFERRED")
                for statement in data:
                    conn.exec_driver_sql(statement)
            copies = run_copy(source, target)
            assert sorted((c.table, c.rows) for c in copies) == [("a_node", 2), ("b_node", 2)]
            query = "SELECT * FROM a_node, b_node WHERE a_node.b_id = b_node.id ORDER BY 2, 5"
            with source.connect() as a, target.connect() as b:
                assert a.exec_driver_sql(query).all() == b.exec_driver_sql(query).all()
    finally:
        lite_source.dispose()
        lite_target.dispose()


# delete_tenant_rows ---------------------------------------------------------------------


def count(engine: sa.Engine, table: str, tenant: str) -> int:
    value = scalar(engine, f"SELECT count(*) FROM {table} WHERE tenant_id = :t", t=tenant)
    return int(value)


@pytest.fixture
def shard(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    create_schema(engine)
    insert_rows(engine, make_rows("acme", 300))
    insert_rows(engine, make_rows("globex", 30))
    yield engine
    engine.dispose()


def reflect(engine: sa.Engine) -> list[TenantTable]:
    with engine.connect() as conn:
        return tenant_tables(conn)


def test_delete_in_batches_each_its_own_transaction(shard: sa.Engine) -> None:
    before = {t: count(shard, t, "acme") for t in ("accounts", "orders", "lines")}
    globex = read_rows(shard, "globex")
    seen: list[tuple[str, int, int]] = []
    points: list[str] = []

    def progress(table: str, deleted: int) -> None:
        # another connection sees each batch as soon as it is reported: committed
        seen.append((table, deleted, count(shard, table, "acme")))

    total = delete_tenant_rows(
        shard, "acme", reflect(shard), batch_size=40, progress=progress, checkpoint=points.append
    )

    assert total == sum(before.values())
    assert [t for t, _, _ in seen] == (
        ["lines"] * math.ceil(before["lines"] / 40)
        + ["orders"] * math.ceil(before["orders"] / 40)
        + ["accounts"] * math.ceil(before["accounts"] / 40)
    )
    for table, deleted, remaining in seen:
        assert remaining == before[table] - deleted
        assert deleted % 40 == 0 or deleted == before[table]
    assert points == ["clean-mid"]
    assert read_rows(shard, "acme") == {"accounts": [], "orders": [], "lines": []}
    assert read_rows(shard, "globex") == globex
    # again: nothing left to delete
    assert delete_tenant_rows(shard, "acme", reflect(shard), checkpoint=points.append) == 0
    assert points == ["clean-mid"]


def test_delete_refuses_a_batch_size_of_zero(shard: sa.Engine) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        delete_tenant_rows(shard, "acme", reflect(shard), batch_size=0)
    assert count(shard, "orders", "acme") == 300


def test_delete_from_a_partitioned_table(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE events (tenant_id text, id int, PRIMARY KEY (tenant_id, id)) "
                "PARTITION BY HASH (id)"
            )
            for r in range(2):
                conn.exec_driver_sql(
                    f"CREATE TABLE events_{r} PARTITION OF events "
                    f"FOR VALUES WITH (MODULUS 2, REMAINDER {r})"
                )
            # both tenants in both partitions: the partitions' ctids coincide
            conn.exec_driver_sql(
                "INSERT INTO events SELECT t, g FROM generate_series(1, 100) g, "
                "(VALUES ('acme'), ('globex')) v(t) ORDER BY g, t"
            )
        assert delete_tenant_rows(engine, "acme", reflect(engine), batch_size=7) == 100
        assert count(engine, "events", "globex") == 100
        assert count(engine, "events", "acme") == 0
    finally:
        engine.dispose()


def test_delete_from_a_without_rowid_table(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE tags (tenant_id TEXT, name TEXT, PRIMARY KEY (tenant_id, name)) "
                "WITHOUT ROWID"
            )
            for tenant in ("acme", "globex"):
                conn.execute(
                    sa.text("INSERT INTO tags VALUES (:t, :n)"),
                    [{"t": tenant, "n": f"tag{i}"} for i in range(25)],
                )
        (table,) = reflect(engine)
        assert table.without_rowid
        assert delete_tenant_rows(engine, "acme", [table], batch_size=10) == 25
        assert count(engine, "tags", "globex") == 25
        assert count(engine, "tags", "acme") == 0
    finally:
        engine.dispose()


def test_delete_then_copy_round_trip(ends: Ends) -> None:
    """Clean the source after a copy: the target keeps everything, the source nothing."""
    expected = read_rows(ends.source, "acme")
    run_copy(ends.source, ends.target)
    deleted = delete_tenant_rows(ends.source, "acme", reflect(ends.source), batch_size=100)
    assert deleted == sum(len(rows) for rows in expected.values())
    assert read_rows(ends.target, "acme") == expected
    assert read_rows(ends.source, "acme") == {"accounts": [], "orders": [], "lines": []}
    assert count(ends.source, "orders", "globex") == 50
