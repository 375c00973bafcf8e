"""The tail of an online move: changed keys decoded from a real logical slot (pgoutput),
and the changed rows compared between two real databases.

Needs ``wal_level=logical`` (the throwaway test servers have it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tenantry.moves import tail_decoder
from tenantry.moves.tables import tenant_tables

SLOT = "tenantry_move_test_7_tail"

SCHEMA = """
CREATE TABLE items (tenant_id text, id int, name text, price numeric(10, 2),
                    seen timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE notes (tenant_id text, id int, body text, PRIMARY KEY (tenant_id, id));
ALTER TABLE notes REPLICA IDENTITY FULL;
CREATE TABLE tenantry_move_sentinel (tenant_id text, move_id int, token text,
                                     written_at timestamptz, PRIMARY KEY (tenant_id, move_id));
CREATE PUBLICATION pub FOR TABLE items WHERE (tenant_id = 'acme'),
    notes WHERE (tenant_id = 'acme'), tenantry_move_sentinel WHERE (tenant_id = 'acme')
    WITH (publish = 'insert, update, delete');
"""


@pytest.fixture
def source(pg_url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        tail_decoder.create_tail_slot(conn, SLOT)
        yield conn
        conn.execute(sa.text("SELECT pg_drop_replication_slot(:s)"), {"s": SLOT})
    engine.dispose()


def _run(conn: sa.Connection, *statements: str) -> None:
    for statement in statements:
        conn.exec_driver_sql(statement)


def _drain(engine_url: str, changed: tail_decoder.Tail, upto: str | None = None) -> int:
    # The test servers commit asynchronously; decoding reads only flushed WAL.
    engine = sa.create_engine(engine_url)
    try:
        with engine.connect() as conn:
            for _ in range(100):
                with conn.begin():
                    flushed = conn.execute(
                        sa.text("SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()")
                    ).scalar()
                if flushed:
                    break
                time.sleep(0.02)
            return tail_decoder.drain(conn, SLOT, "pub", changed, upto_lsn=upto)
    finally:
        engine.dispose()


def test_keys_of_inserted_updated_and_deleted_rows_of_the_tenant_only(source, pg_url):
    _run(
        source,
        "INSERT INTO items VALUES ('acme', 1, 'a', 1.50, now()), ('acme', 2, 'b', 2, now()),"
        " ('other', 1, 'x', 9, now()), ('acme', 3, 'c', 3, now())",
        "UPDATE items SET name = 'B' WHERE id = 2",
        "DELETE FROM items WHERE tenant_id = 'acme' AND id = 3",
        "UPDATE items SET id = 10 WHERE tenant_id = 'acme' AND id = 1",  # the key changes
        "INSERT INTO tenantry_move_sentinel VALUES ('acme', 7, 't', now())",
    )
    changed = tail_decoder.Tail()
    assert _drain(pg_url, changed) > 0
    (items,) = changed.tables.values()
    assert (items.schema, items.name, items.key_columns) == ("public", "items", ("tenant_id", "id"))
    assert not items.whole
    # Old and new key of the row whose key changed; the other tenant's row not at all;
    # the sentinel table ignored.
    assert items.keys == {("acme", "1"), ("acme", "2"), ("acme", "3"), ("acme", "10")}
    assert len(changed) == 4
    # Consumed: a second drain finds nothing new.
    again = tail_decoder.Tail()
    assert _drain(pg_url, again) == 0 and len(again) == 0


def test_replica_identity_full_keys_whole_rows(source, pg_url):
    _run(
        source,
        "INSERT INTO notes VALUES ('acme', 1, 'hello'), ('acme', 2, NULL)",
        "UPDATE notes SET body = 'bye' WHERE id = 1",
        "DELETE FROM notes WHERE id = 2",
    )
    changed = tail_decoder.Tail()
    _drain(pg_url, changed)
    (notes,) = changed.tables.values()
    assert notes.key_columns == ("tenant_id", "id", "body") and not notes.whole
    # Every version of every row: old rows (FULL sends them) and new ones.
    assert notes.keys == {("acme", "1", "hello"), ("acme", "1", "bye"), ("acme", "2", None)}


def test_changes_committed_before_the_cut_are_left_out(source, pg_url):
    _run(source, "INSERT INTO items VALUES ('acme', 1, 'a', 1, now())")
    cut = str(source.execute(sa.text("SELECT pg_current_wal_insert_lsn()")).scalar())
    _run(source, "INSERT INTO items VALUES ('acme', 2, 'b', 2, now())")
    _drain(pg_url, tail_decoder.Tail(), upto=cut)  # before the cut: discarded
    changed = tail_decoder.Tail()
    _drain(pg_url, changed)
    assert changed.tables[("public", "items")].keys == {("acme", "2")}


@pytest.fixture
def pair(pg_url: str, pg_url2: str) -> Iterator[tuple[sa.Connection, sa.Connection]]:
    engines = [sa.create_engine(u) for u in (pg_url, pg_url2)]
    conns = [e.connect() for e in engines]
    for conn in conns:
        with conn.begin():
            conn.exec_driver_sql(SCHEMA.split("CREATE PUBLICATION", maxsplit=1)[0])
            conn.exec_driver_sql(
                "INSERT INTO items SELECT 'acme', i, 'n' || i, i * 1.25,"
                " '2026-11-29 10:00+00'::timestamptz + i * interval '1 minute'"
                " FROM generate_series(1, 50) AS i"
            )
    yield conns[0], conns[1]
    for conn in conns:
        conn.close()
    for engine in engines:
        engine.dispose()


def _tail(*keys: tuple[str, str]) -> tail_decoder.Tail:
    changed = tail_decoder.Tail()
    changed.tables[("public", "items")] = tail_decoder.TailTable(
        "public", "items", ("tenant_id", "id"), set(keys)
    )
    return changed


def test_compare_tail_finds_a_changed_row_that_differs(pair):
    src, dst = pair
    tables = tenant_tables(src)
    src.rollback()
    with dst.begin():
        dst.exec_driver_sql("UPDATE items SET price = 99 WHERE id = 7")
        dst.exec_driver_sql("DELETE FROM items WHERE id = 8")
    with src.begin():
        src.exec_driver_sql("DELETE FROM items WHERE id = 9")
        src.exec_driver_sql("DELETE FROM items WHERE id = 10")
    with dst.begin():
        dst.exec_driver_sql("DELETE FROM items WHERE id = 10")

    def differ(*keys: tuple[str, str]) -> list[str]:
        with src.begin(), dst.begin():
            return tail_decoder.compare_tail(src, dst, "acme", tables, _tail(*keys))

    # Same on both ends, or deleted on both: no difference.
    assert differ(("acme", "1"), ("acme", "2"), ("acme", "10"), ("acme", "999")) == []
    assert differ(("acme", "7")) == ["items"]  # a value differs
    assert differ(("acme", "8")) == ["items"]  # gone from the target only
    assert differ(("acme", "9")) == ["items"]  # gone from the source only
    # A row the tail does not name is not looked at: that is the cut's job.
    assert differ(("acme", "3")) == []


def test_compare_tail_whole_table_and_many_keys(pair):
    src, dst = pair
    tables = tenant_tables(src)
    src.rollback()
    changed = _tail(*(("acme", str(i)) for i in range(1, 12_001)))  # several batches
    with src.begin(), dst.begin():
        assert tail_decoder.compare_tail(src, dst, "acme", tables, changed) == []
    with dst.begin():
        dst.exec_driver_sql("UPDATE items SET name = 'changed' WHERE id = 50")
    with src.begin(), dst.begin():
        assert tail_decoder.compare_tail(src, dst, "acme", tables, changed) == ["items"]
    whole = tail_decoder.Tail()
    whole.tables[("public", "items")] = tail_decoder.TailTable("public", "items", whole=True)
    with src.begin(), dst.begin():
        assert tail_decoder.compare_tail(src, dst, "acme", tables, whole) == ["items"]


def test_compare_tail_by_primary_key_inside_full_rows(pair):
    """Under REPLICA IDENTITY FULL the tail holds whole rows; they are looked up by the
    primary key they contain, so a row whose other columns changed is still found."""
    src, dst = pair
    tables = tenant_tables(src)
    src.rollback()
    full = tail_decoder.Tail()
    full.tables[("public", "notes")] = tail_decoder.TailTable(
        "public", "notes", ("tenant_id", "id", "body"), {("acme", "1", "old text")}
    )
    for conn, body in ((src, "same"), (dst, "same")):
        with conn.begin():
            conn.exec_driver_sql(f"INSERT INTO notes VALUES ('acme', 1, '{body}')")
    with src.begin(), dst.begin():
        assert tail_decoder.compare_tail(src, dst, "acme", tables, full) == []
    with dst.begin():
        dst.exec_driver_sql("UPDATE notes SET body = 'other' WHERE id = 1")
    with src.begin(), dst.begin():
        assert tail_decoder.compare_tail(src, dst, "acme", tables, full) == ["notes"]
