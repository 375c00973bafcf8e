"""The application's triggers do not fire for the rows a move copies or cleans up:
the copy and the cleanup run as logical replication's apply worker
does (``session_replication_role = replica``). Before, an audit trigger wrote a row for
every copied and every deleted row, with the tenant's data, on both shards."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from movefleet import Fleet, build_fleet, count_rows, seed, tenant_rows

from tenantry import moves

AUDIT = [
    "CREATE TABLE audit_log (id serial PRIMARY KEY, op text, who text, row_data text)",
    "CREATE FUNCTION audit_users() RETURNS trigger LANGUAGE plpgsql AS $$"
    " BEGIN"
    "  INSERT INTO audit_log (op, who, row_data) VALUES"
    "   (TG_OP, coalesce(NEW.tenant_id, OLD.tenant_id), coalesce(NEW::text, OLD::text));"
    "  RETURN coalesce(NEW, OLD);"
    " END $$",
    "CREATE TRIGGER users_audit AFTER INSERT OR UPDATE OR DELETE ON users"
    " FOR EACH ROW EXECUTE FUNCTION audit_users()",
]


@pytest.fixture
def fleet(make_pg_database):
    built = build_fleet(
        make_pg_database(0),
        [("s1", make_pg_database(0), "shared"), ("s2", make_pg_database(1), "shared")],
    )
    for shard in ("s1", "s2"):
        engine = built.engine(shard)
        with engine.begin() as conn:
            for statement in AUDIT:
                conn.execute(sa.text(statement))
        engine.dispose()
    built.catalog.add_tenant("acme", shard="s1")
    seed(built.engine("s1"), "acme", users=12, sessions=20)
    yield built
    built.close()


def audit_rows(fleet: Fleet, shard: str) -> int:
    engine = fleet.engine(shard)
    with engine.connect() as conn:
        found = int(conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one())
    engine.dispose()
    return found


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_move_fires_no_application_trigger(fleet: Fleet, mode: str) -> None:
    seeded = audit_rows(fleet, "s1")  # the seed itself was audited: 12 inserts
    assert seeded == 12
    engine = fleet.engine("s1")
    before = tenant_rows(engine, "acme")
    engine.dispose()
    done = moves.move(fleet.catalog, "acme", "s2", mode=mode)
    assert done.succeeded
    engine = fleet.engine("s2")
    assert tenant_rows(engine, "acme") == before
    engine.dispose()
    assert count_rows(fleet.engine("s1"), "acme") == 0
    # no audit row for the copy (target) nor for the cleanup (source)
    assert audit_rows(fleet, "s2") == 0
    assert audit_rows(fleet, "s1") == seeded
