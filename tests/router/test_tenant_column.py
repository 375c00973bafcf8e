"""Another tenant column: a fleet whose settings say ``tenant_column="org_id"``.

The router scopes by the column its settings name, as moves and migrations do: ORM
criteria and the tenant stamp (``TenantScoped.tenant_id`` mapped to ``org_id``), Core
criteria (a look-alike table too), the write checks, and on PostgreSQL row-level
security installed on ``org_id``.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tenantry import CrossTenantWrite, Router, TenantScoped, Tier
from tenantry.migrations.rls import grant_routing_role, install_rls
from tenantry.shardmap.operations import operator_transaction

Fleet = Any  # conftest's Fleet (conftest modules are not importable)

COLUMN = "org_id"
TENANTS = ("acme", "globex")


class Base(DeclarativeBase):
    pass


class Note(TenantScoped, Base):
    __tablename__ = "org_notes"

    tenant_id: Mapped[str] = mapped_column(COLUMN, String(63), primary_key=True, sort_order=-1000)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(100))


NOTES: sa.Table = Note.__table__  # type: ignore[assignment]


@pytest.fixture
def org_fleet(fleet_builder: Any) -> Fleet:
    """One shared shard with ``org_notes`` (RLS on ``org_id``), two tenants' notes."""
    return _org_fleet(fleet_builder)


@pytest.fixture
def pg_org_fleet(pg_fleet_builder: Any) -> Fleet:
    """``org_fleet`` on PostgreSQL only (row-level security)."""
    return _org_fleet(pg_fleet_builder)


def _org_fleet(fleet_builder: Any) -> Fleet:
    fleet = fleet_builder(tenant_column=COLUMN)
    admin = fleet.new_database(0)
    engine = sa.create_engine(admin, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            if fleet.pg:
                assert [t.name for t in install_rls(conn, column=COLUMN)] == ["org_notes"]
    finally:
        engine.dispose()
    if fleet.pg:
        routing = sa.make_url(admin).set(username="app", password=None)  # conftest's role
        url = routing.render_as_string(hide_password=False)
        shard = fleet.catalog.add_shard("orgs", url, admin_url=admin)
        with operator_transaction(shard) as conn:
            grant_routing_role(conn, "app", column=COLUMN)
    else:
        shard = fleet.catalog.add_shard("orgs", admin, tier=Tier.SHARED)
    for tenant in TENANTS:
        fleet.catalog.add_tenant(tenant, tier=Tier.SHARED, shard="orgs")
    with operator_transaction(shard) as conn:
        rows = [{COLUMN: t, "id": i, "body": f"{t}-{i}"} for t in TENANTS for i in (1, 2)]
        conn.execute(NOTES.insert(), rows)
    return fleet


def all_rows(fleet: Fleet) -> list[tuple[Any, ...]]:
    """Every tenant's notes, read as the operations role."""
    with operator_transaction(fleet.shard("orgs")) as conn:
        return [tuple(r) for r in conn.execute(sa.select(NOTES).order_by(NOTES.c.org_id, "id"))]


def test_orm_reads_and_stamps_by_the_tenant_column(org_fleet: Fleet) -> None:
    router: Router = org_fleet.new_router()
    with router.session("acme") as session:
        assert [n.body for n in session.scalars(sa.select(Note).order_by(Note.id))] == [
            "acme-1",
            "acme-2",
        ]
        assert session.get(Note, ("globex", 1)) is None
        session.add(Note(id=3, body="acme-3"))  # no tenant given: stamped
        session.commit()
        with pytest.raises(CrossTenantWrite):
            session.add(Note(tenant_id="globex", id=4, body="globex-4"))
            session.flush()
        session.rollback()
        with pytest.raises(CrossTenantWrite):  # executemany: checked on the rows
            session.execute(sa.insert(Note), [{"tenant_id": "globex", "id": 5, "body": "x"}])
        session.rollback()
        session.execute(sa.update(Note).values(body="changed"))
        session.commit()
    rows = all_rows(org_fleet)
    assert [r for r in rows if r[0] == "globex"] == [
        ("globex", 1, "globex-1"),
        ("globex", 2, "globex-2"),
    ]
    assert [r for r in rows if r[0] == "acme"] == [("acme", i, "changed") for i in (1, 2, 3)]


def test_core_scopes_and_checks_by_the_tenant_column(org_fleet: Fleet) -> None:
    router: Router = org_fleet.new_router()
    look_alike = sa.table("org_notes", sa.column("id"), sa.column("body"))
    with router.connection("globex") as conn:
        assert conn.execute(sa.select(NOTES.c.body).order_by("id")).scalars().all() == [
            "globex-1",
            "globex-2",
        ]
        assert sorted(conn.execute(sa.select(look_alike.c.body)).scalars()) == [
            "globex-1",
            "globex-2",
        ]
        conn.execute(sa.delete(NOTES).where(NOTES.c.id == 1))
        conn.execute(NOTES.insert(), [{COLUMN: "globex", "id": 7, "body": "globex-7"}])
        with pytest.raises(CrossTenantWrite):
            conn.execute(NOTES.insert().values({COLUMN: "acme", "id": 8, "body": "acme-8"}))
    rows = all_rows(org_fleet)
    assert ("acme", 1, "acme-1") in rows and ("globex", 1, "globex-1") not in rows
    assert ("globex", 7, "globex-7") in rows and ("acme", 8, "acme-8") not in rows


def test_row_level_security_on_the_tenant_column(pg_org_fleet: Fleet) -> None:
    org_fleet = pg_org_fleet
    router: Router = org_fleet.new_router()
    with router.connection("acme") as conn:
        raw = conn.execute(sa.text("SELECT org_id, id FROM org_notes ORDER BY id")).all()
        assert [tuple(r) for r in raw] == [("acme", 1), ("acme", 2)]
    with pytest.raises(sa.exc.DBAPIError), router.connection("acme") as conn:
        conn.execute(sa.text("INSERT INTO org_notes VALUES ('globex', 9, 'x')"))
    assert ("globex", 9, "x") not in all_rows(org_fleet)
