"""The cross-tenant leak suite: every way we know to reach another tenant, zero leaks.

Tenants acme, globex and initech share shard "shared-a" with the same primary keys;
umbrella has a dedicated shard. Every attempt runs as acme (unless it says otherwise)
and must see, change or create nothing of another tenant's. Most run on SQLite and
PostgreSQL (the ORM layer alone guards SQLite); the raw-SQL ones run on PostgreSQL,
where row-level security guards a routing role that is neither superuser nor BYPASSRLS.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, exists, func, insert, literal, or_, select, text, true, update
from sqlalchemy.orm import (
    aliased,
    joinedload,
    make_transient_to_detached,
    selectinload,
    subqueryload,
)

from tenantry import AsyncRouter, tenant_context
from tenantry.errors import (
    CrossTenantWrite,
    InvalidTenantId,
    NoTenantInContext,
    RoutingError,
    UnknownTenant,
)
from tenantry.router import scoping
from tenantry.router.fence import TENANT_KEY
from tenantry.shardmap.roles import check_role

ME = "acme"
OTHERS = ("globex", "initech", "umbrella")


def own(tenant: str, values: Iterable[Any]) -> list[Any]:
    """Assert every value (a name, or an object with one) belongs to *tenant*."""
    found = list(values)
    for value in found:
        label = value if isinstance(value, str) else _label(value)
        assert label.startswith(f"{tenant}-"), f"{tenant} saw {label!r}"
        if not isinstance(value, str):
            assert value.tenant_id == tenant
    return found


def _label(obj: Any) -> str:
    return str(getattr(obj, "name", None) or obj.title)


def seeded_names(tenant: str, kind: str = "p") -> list[str]:
    ids = (1, 2) if kind == "p" else (11, 12, 21, 22)
    return [f"{tenant}-{kind}{i}" for i in ids]


def others_untouched(fleet: Any) -> None:
    """Every other tenant's rows are exactly as seeded (read as the operations role)."""
    for table, kind in (("projects", "p"), ("tasks", "t")):
        rows = fleet.rows("shared-a", table)
        for tenant in ("globex", "initech"):
            mine = [row for row in rows if row[0] == tenant]
            column = 2 if table == "projects" else 3
            assert [row[column] for row in mine] == seeded_names(tenant, kind), table
    solo = fleet.rows("solo")
    assert [row[2] for row in solo] == seeded_names("umbrella")


# -- ORM reads --------------------------------------------------------------------------


def test_select_sees_only_own_rows(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        projects = session.scalars(select(app.Project).order_by(app.Project.id)).all()
        tasks = session.scalars(select(app.Task)).all()
    assert [p.name for p in own(ME, projects)] == seeded_names(ME)
    assert len(own(ME, tasks)) == 4


def test_filter_on_foreign_tenant_id_finds_nothing(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        found = session.scalars(select(app.Project).where(app.Project.tenant_id == "globex"))
        assert found.all() == []


def test_or_true_does_not_widen_the_scope(fleet: Any, app: Any) -> None:
    query = select(app.Project).where(or_(app.Project.tenant_id == "globex", true()))
    with fleet.router.session(ME) as session:
        assert len(own(ME, session.scalars(query))) == 2


def test_count_counts_only_own_rows(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        assert session.scalar(select(func.count()).select_from(app.Project)) == 2
        assert session.scalar(select(func.count(app.Task.id))) == 4


def test_column_select_sees_only_own(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        rows = session.execute(select(app.Project.tenant_id, app.Project.name)).all()
    assert sorted(rows) == [(ME, name) for name in seeded_names(ME)]


def test_legacy_query_api_is_scoped(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        assert len(own(ME, session.query(app.Project).all())) == 2
        assert session.query(app.Task).count() == 4
        assert session.query(app.Project).filter_by(tenant_id="globex").all() == []


@pytest.mark.parametrize("other", OTHERS)
def test_get_by_a_foreign_primary_key_returns_none(fleet: Any, app: Any, other: str) -> None:
    with fleet.router.session(ME) as session:
        assert session.get(app.Project, (other, 1)) is None
        assert session.get(app.Task, (other, 11)) is None
        assert session.get(app.Project, (other, 1), populate_existing=True) is None
        assert own(ME, [session.get(app.Project, (ME, 1))])


def test_refresh_of_a_foreign_object_fails(fleet: Any, app: Any) -> None:
    with fleet.router.session("globex") as theirs:
        project = theirs.get(app.Project, ("globex", 1))
        theirs.expunge(project)
    with fleet.router.session(ME) as session:
        session.add(project)
        with pytest.raises(sa.exc.InvalidRequestError, match="Could not refresh"):
            session.refresh(project)
        assert "name" not in sa.inspect(project).dict  # expired, never reloaded


def test_a_forged_foreign_key_loads_nothing(fleet: Any, app: Any) -> None:
    forged = app.Project(tenant_id="globex", id=2)
    make_transient_to_detached(forged)  # as if loaded: attribute access will SELECT it
    with fleet.router.session(ME) as session:
        session.add(forged)
        with pytest.raises(sa.orm.exc.ObjectDeletedError):
            _ = forged.name
        assert "name" not in sa.inspect(forged).dict


def test_second_transaction_is_scoped_again(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        session.commit()
        own(ME, session.scalars(select(app.Project)))
        session.rollback()
        assert len(own(ME, session.scalars(select(app.Project)))) == 2


# -- relationships, joins, aliases, subqueries ------------------------------------------------


def test_lazy_load_of_children(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        project = session.get(app.Project, (ME, 1))
        assert [t.title for t in own(ME, project.tasks)] == ["acme-t11", "acme-t12"]


def test_lazy_load_of_a_relationship_that_ignores_tenant_id(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        project = session.get(app.Project, (ME, 2))
        assert [t.title for t in own(ME, project.loose_tasks)] == ["acme-t21", "acme-t22"]


@pytest.mark.parametrize("loader", [selectinload, joinedload, subqueryload])
def test_eager_loads_stay_inside_the_tenant(fleet: Any, app: Any, loader: Any) -> None:
    query = select(app.Project).options(loader(app.Project.loose_tasks), loader(app.Project.tasks))
    with fleet.router.session(ME) as session:
        projects = own(ME, session.scalars(query).unique())
        for project in projects:
            assert len(own(ME, project.loose_tasks)) == 2
            assert own(ME, project.tasks) == project.loose_tasks


def test_many_to_one_load_is_own(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        tasks = session.scalars(select(app.Task)).all()
        assert {own(ME, [task.project])[0].id for task in tasks} == {1, 2}


def test_join_on_id_only_stays_inside_the_tenant(fleet: Any, app: Any) -> None:
    query = select(app.Project.name, app.Task.title).join(
        app.Task, app.Task.project_id == app.Project.id
    )
    with fleet.router.session(ME) as session:
        rows = session.execute(query).all()
    assert len(rows) == 4
    own(ME, [name for row in rows for name in row])


def test_outer_join_of_two_entities(fleet: Any, app: Any) -> None:
    query = select(app.Project, app.Task).outerjoin(app.Task, app.Task.project_id == app.Project.id)
    with fleet.router.session(ME) as session:
        rows = session.execute(query).all()
        assert len(rows) == 4
        own(ME, [obj for row in rows for obj in row])


def test_aliased_entity_is_scoped(fleet: Any, app: Any) -> None:
    alias = aliased(app.Project)
    with fleet.router.session(ME) as session:
        assert own(ME, session.scalars(select(alias.name)).all()) == seeded_names(ME)


def test_self_join_of_two_aliases(fleet: Any, app: Any) -> None:
    left, right = aliased(app.Project), aliased(app.Project)
    query = select(left.name, right.name).join(right, left.id == right.id)
    with fleet.router.session(ME) as session:
        rows = session.execute(query).all()
    assert sorted(rows) == [("acme-p1", "acme-p1"), ("acme-p2", "acme-p2")]


def test_subquery_in_where_cannot_read_foreign_rows(fleet: Any, app: Any) -> None:
    foreign_titles = select(app.Task.title).where(app.Task.tenant_id == "globex")
    with fleet.router.session(ME) as session:
        assert (
            session.scalars(select(app.Task).where(app.Task.title.in_(foreign_titles))).all() == []
        )
        scalar = select(foreign_titles.limit(1).scalar_subquery())
        assert session.scalar(scalar) is None


def test_exists_cannot_probe_foreign_rows(fleet: Any, app: Any) -> None:
    probe = exists(select(app.Task.id).where(app.Task.title == "globex-t11"))
    with fleet.router.session(ME) as session:
        assert session.scalars(select(app.Project.id).where(probe)).all() == []


def test_union_is_scoped_on_both_sides(fleet: Any, app: Any) -> None:
    union = sa.union_all(select(app.Project.name), select(app.Task.title))
    with fleet.router.session(ME) as session:
        assert len(own(ME, session.scalars(union))) == 6


def test_subquery_and_cte_in_from_are_scoped(fleet: Any, app: Any) -> None:
    sub = select(app.Project).subquery()
    cte = select(app.Task.title).cte("titles")
    with fleet.router.session(ME) as session:
        assert session.scalar(select(func.count()).select_from(sub)) == 2
        assert len(own(ME, session.scalars(select(cte.c.title)))) == 4


# -- ORM writes ------------------------------------------------------------------------------


def test_bulk_update_touches_only_own_rows(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        result = session.execute(update(app.Project).values(name=app.Project.name + "-x"))
        assert result.rowcount == 2
        session.commit()
    assert [r[2] for r in fleet.rows("shared-a") if r[0] == ME] == ["acme-p1-x", "acme-p2-x"]
    others_untouched(fleet)


def test_bulk_update_naming_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    statement = update(app.Project).where(app.Project.tenant_id == "globex").values(name="x")
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.execute(statement)
        session.commit()
    others_untouched(fleet)


def test_bulk_delete_removes_only_own_rows(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        assert session.execute(delete(app.Task)).rowcount == 4
        assert session.execute(delete(app.Project).where(app.Project.id == 1)).rowcount == 1
        session.commit()
    assert [r[1] for r in fleet.rows("shared-a") if r[0] == ME] == [2]
    others_untouched(fleet)


def test_bulk_delete_naming_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.execute(delete(app.Task).where(app.Task.tenant_id == "globex"))
        session.commit()
    others_untouched(fleet)


def test_update_cannot_move_rows_to_another_tenant(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite, match="globex"):
            session.execute(update(app.Task).values(tenant_id="globex"))
    others_untouched(fleet)


def test_bulk_update_by_foreign_primary_keys_is_refused(fleet: Any, app: Any) -> None:
    rows = [{"tenant_id": "globex", "id": 1, "name": "taken"}]
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.execute(update(app.Project), rows)
        session.commit()
    others_untouched(fleet)


def test_legacy_bulk_update_mappings_of_foreign_rows_is_refused(fleet: Any, app: Any) -> None:
    rows = [{"tenant_id": "globex", "id": 1, "name": "taken"}]
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.bulk_update_mappings(app.Project, rows)
        session.rollback()
        session.commit()
    others_untouched(fleet)


def test_insert_values_with_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    statement = insert(app.Project).values(tenant_id="globex", id=9, name="globex-planted")
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite) as info:
            session.execute(statement)
        session.commit()
    assert isinstance(info.value, RoutingError)
    assert info.value.tenant_id == ME
    others_untouched(fleet)


def test_insert_executemany_with_one_foreign_row_is_refused(fleet: Any, app: Any) -> None:
    rows = [
        {"tenant_id": ME, "id": 8, "name": "acme-p8"},
        {"tenant_id": "globex", "id": 9, "name": "globex-planted"},
    ]
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.execute(insert(app.Project), rows)
        session.commit()
    assert [r[1] for r in fleet.rows("shared-a") if r[0] == ME] == [1, 2]
    others_untouched(fleet)


def test_insert_multi_values_with_one_foreign_row_is_refused(fleet: Any, app: Any) -> None:
    statement = insert(app.Project).values(
        [
            {"tenant_id": ME, "id": 8, "name": "acme-p8"},
            {"tenant_id": "initech", "id": 9, "name": "initech-planted"},
        ]
    )
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite, match="initech"):
            session.execute(statement)
    others_untouched(fleet)


def test_legacy_bulk_insert_mappings_with_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite):
            session.bulk_insert_mappings(
                app.Project, [{"tenant_id": "globex", "id": 9, "name": "globex-planted"}]
            )
        session.rollback()
        session.commit()
    others_untouched(fleet)


def test_insert_from_select_copies_only_own_rows(fleet: Any, app: Any) -> None:
    copy = select(literal(ME), app.Project.id + 100, app.Project.name)
    with fleet.router.session(ME) as session:
        session.execute(insert(app.Project).from_select(["tenant_id", "id", "name"], copy))
        session.commit()
    mine = [r[2] for r in fleet.rows("shared-a") if r[0] == ME]
    assert own(ME, mine) == seeded_names(ME) * 2
    others_untouched(fleet)


def test_insert_from_select_into_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    copy = select(literal("globex"), app.Project.id + 100, app.Project.name)
    with fleet.router.session(ME) as session:
        with pytest.raises(CrossTenantWrite, match="globex"):
            session.execute(insert(app.Project).from_select(["tenant_id", "id", "name"], copy))
        session.commit()
    others_untouched(fleet)


def test_add_of_a_foreign_object_is_refused_at_flush(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        session.add(app.Project(tenant_id="globex", id=9, name="globex-planted"))
        with pytest.raises(CrossTenantWrite, match="globex"):
            session.flush()
        session.rollback()
        session.commit()
    others_untouched(fleet)


def test_add_stamps_the_session_tenant(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        project = app.Project(id=3, name="acme-p3")
        project.tasks.append(app.Task(id=31, title="acme-t31"))
        session.add(project)
        session.commit()
        assert project.tenant_id == ME
    assert (ME, 3, "acme-p3") in fleet.rows("shared-a")
    assert (ME, 31, 3, "acme-t31") in fleet.rows("shared-a", "tasks")
    others_untouched(fleet)


def test_foreign_child_added_by_cascade_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        project = session.get(app.Project, (ME, 1))
        project.tasks.append(app.Task(tenant_id="globex", id=19, title="globex-planted"))
        with pytest.raises(CrossTenantWrite):
            session.flush()
    others_untouched(fleet)


def test_changing_an_objects_tenant_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        task = session.get(app.Task, (ME, 11))
        task.tenant_id = "globex"
        with pytest.raises(CrossTenantWrite):
            session.commit()
    assert (ME, 11, 1, "acme-t11") in fleet.rows("shared-a", "tasks")
    others_untouched(fleet)


def test_merge_of_a_foreign_object_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session(ME) as session:
        session.merge(app.Project(tenant_id="globex", id=1, name="globex-overwritten"))
        with pytest.raises(CrossTenantWrite):
            session.commit()
    others_untouched(fleet)


def test_delete_of_a_foreign_object_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session("globex") as theirs:
        task = theirs.get(app.Task, ("globex", 22))
        theirs.expunge(task)
    with fleet.router.session(ME) as session:
        session.add(task)
        session.delete(task)
        with pytest.raises(CrossTenantWrite):
            session.commit()
    others_untouched(fleet)


def test_update_of_a_foreign_detached_object_is_refused(fleet: Any, app: Any) -> None:
    with fleet.router.session("globex") as theirs:
        task = theirs.get(app.Task, ("globex", 21))
        theirs.expunge(task)
    task.title = "globex-overwritten"
    with fleet.router.session(ME) as session:
        session.add(task)
        with pytest.raises(CrossTenantWrite):
            session.commit()
    others_untouched(fleet)


# -- Core connections ----------------------------------------------------------------------


def test_core_insert_with_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    with pytest.raises(CrossTenantWrite), fleet.router.connection(ME) as conn:
        conn.execute(app.projects.insert().values(tenant_id="globex", id=9, name="planted"))
    others_untouched(fleet)


def test_core_executemany_insert_with_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    rows = [
        {"tenant_id": ME, "id": 8, "name": "acme-p8"},
        {"tenant_id": "globex", "id": 9, "name": "x"},
    ]
    with pytest.raises(CrossTenantWrite), fleet.router.connection(ME) as conn:
        conn.execute(app.projects.insert(), rows)
    assert [r[1] for r in fleet.rows("shared-a") if r[0] == ME] == [1, 2]  # rolled back
    others_untouched(fleet)


def test_core_update_to_or_of_a_foreign_tenant_is_refused(fleet: Any, app: Any) -> None:
    table = app.projects
    with pytest.raises(CrossTenantWrite), fleet.router.connection(ME) as conn:
        conn.execute(table.update().where(table.c.tenant_id == ME).values(tenant_id="globex"))
    with pytest.raises(CrossTenantWrite), fleet.router.connection(ME) as conn:
        conn.execute(table.update().where(table.c.tenant_id == "globex").values(name="x"))
    with pytest.raises(CrossTenantWrite), fleet.router.connection(ME) as conn:
        conn.execute(table.delete().where(table.c.tenant_id == sa.bindparam("t")), {"t": "globex"})
    others_untouched(fleet)


# -- no tenant, bad tenants ----------------------------------------------------------------


def test_no_tenant_in_context_never_means_all_tenants(fleet: Any, app: Any) -> None:
    router = fleet.router
    with pytest.raises(NoTenantInContext), router.session() as session:
        session.scalars(select(app.Project)).all()  # pragma: no cover - never reached
    with pytest.raises(NoTenantInContext), router.connection():
        pass  # pragma: no cover
    with pytest.raises(NoTenantInContext):
        router.engine_for()
    with tenant_context(ME):
        with router.session() as session:
            assert len(own(ME, session.scalars(select(app.Project)))) == 2
    with pytest.raises(NoTenantInContext), router.session():
        pass  # pragma: no cover - the context was left


@pytest.mark.parametrize(
    "bad", ["ACME", "", "a" * 64, "-acme", "acme corp", "acme'--", "../acme", "acme\x00"]
)
def test_invalid_tenant_ids_are_refused(fleet: Any, bad: str) -> None:
    with pytest.raises(InvalidTenantId), fleet.router.session(bad):
        pass  # pragma: no cover
    with pytest.raises(InvalidTenantId), fleet.router.connection(bad):
        pass  # pragma: no cover


def test_unknown_tenant_is_refused(fleet: Any) -> None:
    with pytest.raises(UnknownTenant) as info, fleet.router.session("nobody"):
        pass  # pragma: no cover
    assert info.value.tenant_id == "nobody"
    with pytest.raises(UnknownTenant), fleet.router.connection("nobody"):
        pass  # pragma: no cover
    assert not fleet.router.has_tenant("nobody")


# -- concurrency ---------------------------------------------------------------------------

ALL = ("acme", "globex", "initech", "umbrella")


def read_own(router: Any, app: Any, tenant: str | None = None) -> list[str]:
    with router.session(tenant) as session:
        names = session.scalars(select(app.Project.name).order_by(app.Project.id)).all()
        titles = session.scalars(select(app.Task.title)).all()
        expected = tenant or session.tenant_id
    return own(expected, [*names, *titles])


def test_threads_each_see_only_their_tenant(fleet: Any, app: Any) -> None:
    router = fleet.new_router()
    start = threading.Barrier(8)

    def worker(n: int) -> int:
        rng = random.Random(n)
        start.wait()
        done = 0
        for _ in range(25):
            tenant = rng.choice(ALL)
            if rng.random() < 0.5:
                assert len(read_own(router, app, tenant)) == 6
            else:
                with tenant_context(tenant):
                    assert len(read_own(router, app)) == 6
            done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(worker, range(8))) == [25] * 8


def test_asyncio_tasks_each_see_only_their_tenant(fleet: Any, app: Any) -> None:
    router = fleet.new_router()

    async def task(tenant: str) -> int:
        async with tenant_context(tenant):
            for _ in range(6):
                # to_thread carries the context over: the worker thread reads as *tenant*
                names = await asyncio.to_thread(read_own, router, app)
                assert names[0] == f"{tenant}-p1"
                await asyncio.sleep(0)
        return len(names)

    async def main() -> list[int]:
        return await asyncio.gather(*(task(t) for t in ALL * 3))

    assert asyncio.run(main()) == [6] * 12


def test_async_router_tasks_each_see_only_their_tenant(fleet: Any, app: Any) -> None:
    async def task(router: AsyncRouter, tenant: str) -> list[str]:
        async with tenant_context(tenant), router.session() as session:
            await asyncio.sleep(0)
            result = await session.scalars(select(app.Project.name))
            return own(tenant, result.all())

    async def main() -> list[list[str]]:
        router = AsyncRouter(catalog=fleet.catalog, background=False)
        try:
            return await asyncio.gather(*(task(router, t) for t in ALL * 2))
        finally:
            await router.close()

    results = asyncio.run(main())
    assert [sorted(r) for r in results] == [seeded_names(t) for t in ALL * 2]


# -- PostgreSQL: row-level security stops raw SQL ----------------------------------------------


def test_routing_role_does_not_bypass_rls(pg_fleet: Any) -> None:
    with pg_fleet.router.connection(ME) as conn:
        role = check_role(conn)
    assert role.role == "app"
    assert not role.bypasses_rls
    assert role.warning("shared-a") is None


def test_operations_role_sees_every_tenant(pg_fleet: Any) -> None:
    # The control: the rows are there; row-level security is what hides them.
    assert {row[0] for row in pg_fleet.rows("shared-a")} == {"acme", "globex", "initech"}


def test_raw_select_sees_only_own_rows(pg_fleet: Any) -> None:
    with pg_fleet.router.session(ME) as session:
        names = session.scalars(text("SELECT name FROM projects ORDER BY id")).all()
        titles = session.scalars(text("SELECT title FROM tasks")).all()
        count = session.scalar(text("SELECT count(*) FROM projects"))
    assert own(ME, names) == seeded_names(ME)
    assert len(own(ME, titles)) == 4
    assert count == 2


def test_raw_select_of_a_foreign_tenant_finds_nothing(pg_fleet: Any) -> None:
    with pg_fleet.router.session(ME) as session:
        sql = text("SELECT * FROM tasks WHERE tenant_id = :t OR true")
        assert len(session.execute(sql, {"t": "globex"}).all()) == 4
        sql = text("SELECT * FROM projects WHERE tenant_id = :t")
        assert session.execute(sql, {"t": "globex"}).all() == []


def test_raw_update_touches_only_own_rows(pg_fleet: Any) -> None:
    with pg_fleet.router.session(ME) as session:
        assert session.execute(text("UPDATE projects SET name = name || '-x'")).rowcount == 2
        sql = text("UPDATE projects SET name = 'x' WHERE tenant_id = 'globex'")
        assert session.execute(sql).rowcount == 0
        session.commit()
    others_untouched(pg_fleet)


def test_raw_delete_touches_only_own_rows(pg_fleet: Any) -> None:
    with pg_fleet.router.session(ME) as session:
        assert session.execute(text("DELETE FROM tasks")).rowcount == 4
        session.commit()
    others_untouched(pg_fleet)


def test_raw_insert_with_a_foreign_tenant_is_refused(pg_fleet: Any) -> None:
    sql = text("INSERT INTO projects (tenant_id, id, name) VALUES ('globex', 9, 'planted')")
    with pg_fleet.router.session(ME) as session:
        with pytest.raises(sa.exc.ProgrammingError, match="row-level security") as info:
            session.execute(sql)
    assert info.value.orig.sqlstate == "42501"  # type: ignore[union-attr]
    others_untouched(pg_fleet)


def test_raw_update_moving_rows_to_a_foreign_tenant_is_refused(pg_fleet: Any) -> None:
    with pg_fleet.router.session(ME) as session:
        with pytest.raises(sa.exc.ProgrammingError, match="row-level security"):
            session.execute(text("UPDATE tasks SET tenant_id = 'globex'"))
    others_untouched(pg_fleet)


def test_from_statement_of_raw_sql_sees_only_own(pg_fleet: Any, app: Any) -> None:
    query = select(app.Project).from_statement(text("SELECT * FROM projects"))
    with pg_fleet.router.session(ME) as session:
        assert len(own(ME, session.scalars(query))) == 2


def test_core_statements_on_a_connection_touch_only_own_rows(pg_fleet: Any, app: Any) -> None:
    with pg_fleet.router.connection(ME) as conn:
        rows = conn.execute(sa.select(app.projects)).all()
        assert {row.tenant_id for row in rows} == {ME}
        assert conn.execute(app.tasks.update().values(title="acme-done")).rowcount == 4
        assert conn.execute(app.tasks.delete().where(app.tasks.c.id < 20)).rowcount == 2
        assert conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar() == 2
    others_untouched(pg_fleet)


def test_raw_insert_on_a_core_connection_is_refused(pg_fleet: Any) -> None:
    sql = "INSERT INTO tasks (tenant_id, id, project_id, title) VALUES ('globex', 99, 1, 'x')"
    with pytest.raises(sa.exc.ProgrammingError, match="row-level security"):
        with pg_fleet.router.connection(ME) as conn:
            conn.exec_driver_sql(sql)
    others_untouched(pg_fleet)


def test_pooled_connection_carries_no_tenant(pg_fleet: Any) -> None:
    router = pg_fleet.new_router()
    with router.session(ME) as session:
        pid = session.scalar(text("SELECT pg_backend_pid()"))
        assert session.scalar(text("SELECT current_setting('tenantry.tenant_id', true)")) == ME
        session.commit()
    engine = router.engine_for(ME)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT pg_backend_pid()")) == pid  # the same pooled connection
        assert conn.scalar(text("SELECT current_setting('tenantry.tenant_id', true)")) in ("", None)
        assert conn.info.get(TENANT_KEY) is None
        # no tenant setting: the policies match no row at all (fail closed)
        assert conn.scalar(text("SELECT count(*) FROM projects")) == 0
        assert conn.execute(text("UPDATE tasks SET title = 'x'")).rowcount == 0
        conn.rollback()
    others_untouched(pg_fleet)


def test_dedicated_shard_holds_no_other_tenant(fleet: Any, app: Any) -> None:
    with fleet.router.session("umbrella") as session:
        assert len(own("umbrella", session.scalars(select(app.Project)))) == 2
        assert session.get(app.Project, (ME, 1)) is None
    assert fleet.router.shard_for("umbrella").name == "solo"
    assert fleet.router.engine_for("umbrella") is not fleet.router.engine_for(ME)


def test_one_statement_object_reused_by_every_tenant_stays_scoped(fleet: Any, app: Any) -> None:
    """A plain ``select(Model)`` is scoped by the engine's compiler alone; other ORM
    statements get the shared criteria, in a copy kept per statement object (the same
    for every tenant: the tenant is a bound parameter). Either way a statement executed
    again by another tenant, or in a thread of its own, sees that tenant's rows only."""
    everything = select(app.Project).order_by(app.Project.id)
    joined = (
        select(app.Project)
        .join(app.Task, app.Project.loose_tasks)
        .where(app.Task.id == 11)
        .options(selectinload(app.Project.tasks))
    )
    tasks = select(app.Task.title).where(app.Task.project_id == 1)
    for tenant in (ME, *OTHERS, ME):
        with fleet.router.session(tenant) as session:
            assert [p.name for p in session.scalars(everything)] == seeded_names(tenant)
            found = session.scalars(joined).all()
            assert [p.name for p in found] == seeded_names(tenant)[:1]
            assert own(tenant, [t.title for t in found[0].tasks]) == [
                f"{tenant}-t11",
                f"{tenant}-t12",
            ]
            assert own(tenant, session.scalars(tasks)) == sorted(session.scalars(tasks))
            assert len(session.scalars(tasks).all()) == 2
    assert everything not in scoping._SCOPED  # the compiler's
    assert scoping._plain(sa.inspect(app.Project), "tenant_id")
    assert not scoping._plain(sa.inspect(app.Project), "org_id")  # another column: criteria
    scoped = scoping._SCOPED[joined]
    assert scoping._with_shared_criteria(joined) is scoped

    def names(tenant: str) -> list[str]:
        with fleet.router.session(tenant) as session:
            plain = [p.name for p in session.scalars(everything)]
            assert [p.name for p in session.scalars(joined)] == plain[:1]
            return plain

    tenants = [random.choice((ME, *OTHERS)) for _ in range(40)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(names, tenants))
    assert results == [seeded_names(t) for t in tenants]
