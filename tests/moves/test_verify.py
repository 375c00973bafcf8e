"""Verification: counts and order-independent checksums of a tenant's rows.

The same data, written independently (in different orders) to two databases, must
digest the same: on the two PostgreSQL servers with either method, and between SQLite
and PostgreSQL with the python method. One changed value, one missing row or one extra
row must show, in the table where it happened.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy as sa
from test_copy import (
    ACCOUNTS,
    SOURCE_OPTIONS,
    TARGET_OPTIONS,
    create_schema,
    insert_rows,
    make_rows,
    pg_engine,
)

from tenantry.moves.tables import tenant_tables
from tenantry.moves.verify import (
    TableDigest,
    canonical,
    compare_digests,
    digest_tenant,
    row_hash,
)
from tenantry.shardmap.drivers import make_engine
from tenantry.testing import DatabaseFactory

Digests = dict[str, TableDigest]


Method = Literal["sql", "python"]


def digest(engine: sa.Engine, method: Method, tenant: str = "acme") -> Digests:
    with engine.connect() as conn, conn.begin():
        return digest_tenant(conn, tenant, tenant_tables(conn), method=method)


def reverse(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {table: list(reversed(values)) for table, values in rows.items()}


def open_end(kind: str, index: int, factory: DatabaseFactory | None, tmp: Path) -> sa.Engine:
    if kind == "pg":
        assert factory is not None
        return pg_engine(factory(index), (SOURCE_OPTIONS, TARGET_OPTIONS)[index])
    return make_engine(f"sqlite:///{tmp / f'{index}.db'}")


@pytest.fixture(params=["pg-pg", "sqlite-pg", "sqlite-sqlite"])
def twins(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """Two databases holding the same tenants, inserted in opposite orders."""
    kinds = request.param.split("-")
    factory = request.getfixturevalue("make_pg_database") if "pg" in kinds else None
    left = open_end(kinds[0], 0, factory, tmp_path)
    right = open_end(kinds[1], 1, factory, tmp_path)
    try:
        for engine, order in ((left, lambda r: r), (right, reverse)):
            create_schema(engine)
            insert_rows(engine, order(make_rows("acme", 200)))
        insert_rows(left, make_rows("globex", 20))  # other tenants do not count
        yield left, right
    finally:
        left.dispose()
        right.dispose()


def methods(*engines: sa.Engine) -> list[Method]:
    pg = all(e.dialect.name == "postgresql" for e in engines)
    return ["sql", "python"] if pg else ["python"]


def test_the_same_data_digests_the_same(twins: tuple[sa.Engine, sa.Engine]) -> None:
    left, right = twins
    for method in methods(left, right):
        a, b = digest(left, method), digest(right, method)
        assert list(a) == ["accounts", "orders", "lines"]
        assert [d.rows for d in a.values()] == [20, 200, 200]
        assert a == b, method
        assert compare_digests(a, b) == []
        assert all(len(d.checksum) == 16 and d.checksum != "0" * 16 for d in a.values())
        assert digest(left, method, "globex") != a
        empty = digest(left, method, "nobody")
        assert [(d.rows, d.checksum) for d in empty.values()] == [(0, "0" * 16)] * 3


Change = Callable[[sa.Connection], None]

CHANGES: dict[str, tuple[str, Change]] = {
    "one value": (
        "orders",
        lambda c: c.execute(sa.text("UPDATE orders SET amount = amount + 0.01 WHERE id = 17")),
    ),
    "NULL to empty": (
        "orders",
        lambda c: c.execute(sa.text("UPDATE orders SET note = '' WHERE note IS NULL AND id = 7")),
    ),
    "one timestamp by a microsecond": (
        "orders",
        lambda c: c.execute(
            sa.update(sa.table("orders", sa.column("placed_at"), sa.column("id")))
            .where(sa.column("id") == 3)
            .values(placed_at=dt.datetime(2024, 2, 29, 23, 59, 59, 1, tzinfo=dt.UTC))
        ),
    ),
    "one missing row": (
        "lines",
        lambda c: c.execute(sa.text("DELETE FROM lines WHERE tenant_id = 'acme' AND id = 50")),
    ),
    "one extra row": (
        "accounts",
        lambda c: c.execute(ACCOUNTS.insert(), [{"tenant_id": "acme", "id": 77, "name": None}]),
    ),
    "two values swapped between rows": (
        "lines",
        lambda c: c.execute(
            sa.text(
                "UPDATE lines SET qty = CASE id WHEN 10 THEN 3 WHEN 11 THEN 2 END "
                "WHERE tenant_id = 'acme' AND id IN (10, 11)"
            )
        ),
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_difference_names_its_table(twins: tuple[sa.Engine, sa.Engine], change: str) -> None:
    left, right = twins
    table, apply = CHANGES[change]
    with right.begin() as conn:
        conn.execute(sa.text("UPDATE lines SET qty = 2 WHERE id = 10 AND tenant_id = 'acme'"))
        conn.execute(sa.text("UPDATE lines SET qty = 3 WHERE id = 11 AND tenant_id = 'acme'"))
    with left.begin() as conn:  # the same, so that only the change below differs
        conn.execute(sa.text("UPDATE lines SET qty = 2 WHERE id = 10 AND tenant_id = 'acme'"))
        conn.execute(sa.text("UPDATE lines SET qty = 3 WHERE id = 11 AND tenant_id = 'acme'"))
    for method in methods(left, right):
        assert compare_digests(digest(left, method), digest(right, method)) == []
    with right.begin() as conn:
        apply(conn)
    for method in methods(left, right):
        a, b = digest(left, method), digest(right, method)
        assert compare_digests(a, b) == [table], method
        # a swap or an edit keeps the count: only the checksum tells
        same_count = change not in ("one missing row", "one extra row")
        assert (a[table].rows == b[table].rows) == same_count


def test_every_differing_table_is_named_in_table_order() -> None:
    def d(name: str, rows: int = 1, checksum: str = "a") -> TableDigest:
        return TableDigest(name, rows, checksum)

    source = {"a": d("a"), "b": d("b"), "c": d("c"), "d": d("d")}
    target = {"d": d("d", 2), "c": d("c"), "b": d("b", checksum="b"), "e": d("e")}
    assert compare_digests(source, target) == ["a", "b", "d", "e"]
    assert compare_digests(source, dict(source)) == []


@pytest.fixture
def two_servers(make_pg_database: DatabaseFactory) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    left = pg_engine(make_pg_database(0), SOURCE_OPTIONS)
    right = pg_engine(make_pg_database(1), TARGET_OPTIONS)
    yield left, right
    left.dispose()
    right.dispose()


def test_sql_digest_does_not_depend_on_session_settings(
    two_servers: tuple[sa.Engine, sa.Engine],
) -> None:
    left, right = two_servers
    table = (
        "CREATE TABLE t (tenant_id text, id int, at timestamptz, d date, span interval, "
        "f8 float8, f4 float4, b bytea, PRIMARY KEY (tenant_id, id))"
    )
    row = (
        "INSERT INTO t VALUES ('acme', 1, '2024-03-01 12:00:00.123456+05:30', '2024-12-31', "
        "'1 day -02:03:04.5', 0.1, 0.3, '\\x00ff'), ('acme', 2, NULL, NULL, NULL, NULL, "
        "NULL, NULL)"
    )
    for engine in (left, right):
        with engine.begin() as conn:
            conn.exec_driver_sql(table)
            conn.exec_driver_sql(row)
    for method in methods(left, right):
        assert digest(left, method) == digest(right, method)
    # the session's own settings come back after the digest
    with left.connect() as conn, conn.begin():
        digest_tenant(conn, "acme", tenant_tables(conn))
        assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Kolkata"
        assert conn.exec_driver_sql("SHOW DateStyle").scalar() == "SQL, DMY"
        assert conn.exec_driver_sql("SHOW extra_float_digits").scalar() == "0"


def test_sql_method_needs_postgresql(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        create_schema(engine)
        with engine.connect() as conn:
            tables = tenant_tables(conn)
            with pytest.raises(ValueError, match="needs PostgreSQL"):
                digest_tenant(conn, "acme", tables, method="sql")
            with pytest.raises(ValueError, match="method must be"):
                digest_tenant(conn, "acme", tables, method="md5")  # type: ignore[arg-type]
    finally:
        engine.dispose()


# canonical values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Decimal("12.30"), Decimal("12.3")),
        (Decimal("100"), Decimal("1E+2")),
        (Decimal("-0.00"), Decimal("0")),
        (Decimal("12.34"), 12.34),  # SQLite keeps NUMERIC as REAL
        (
            dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            dt.datetime(2024, 1, 1, 10),
        ),  # naive means UTC
        (b"\x00\xff", memoryview(b"\x00\xff")),
        ({"b": [1, 2], "a": None}, {"a": None, "b": [1, 2]}),
        (True, True),
    ],
)
def test_canonical_forms_agree(left: Any, right: Any) -> None:
    assert canonical(left) == canonical(right)


def test_canonical_forms() -> None:
    assert canonical(Decimal("100")) == "100"  # no exponent
    assert canonical(Decimal("0.000001")) == "0.000001"
    assert canonical(True) == "t" and canonical(False) == "f" and canonical(1) == "1"
    assert canonical(0.1) == "0.1"
    assert canonical(dt.date(2024, 2, 29)) == "2024-02-29"
    assert canonical(dt.datetime(2024, 2, 29, 1, 2, 3, 4)) == "2024-02-29T01:02:03.000004"
    assert canonical(b"\x01\xab") == "01ab"
    assert canonical({"z": 1, "a": [Decimal("1.50"), "é"]}) == '{"a":["1.5","é"],"z":1}'


def test_row_hash_tells_apart_what_a_join_would_not() -> None:
    assert row_hash([None]) != row_hash([""]) != row_hash(["N"])
    assert row_hash(["a", "bc"]) != row_hash(["ab", "c"])
    assert row_hash(["1", 2]) != row_hash([2, "1"])
    assert row_hash([1, 2]) == row_hash((1, 2))
    # the sum of two rows' hashes does not depend on their order, but on their pairing
    pairs = row_hash([1, 1]) + row_hash([2, 2])
    assert pairs == row_hash([2, 2]) + row_hash([1, 1])
    assert pairs != row_hash([1, 2]) + row_hash([2, 1])
