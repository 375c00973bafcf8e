"""Core statements through a router are scoped like ORM ones.

Every test runs as acme on SQLite and on PostgreSQL shared shards, through
``router.session()`` and through ``router.connection()``, with Core statements on the
tenant tables (``projects``, ``tasks``: tables with a ``tenant_id`` column). SELECT,
UPDATE and DELETE see and touch acme's rows only, wherever a tenant table appears
(joins, aliases, subqueries, CTEs, set operations, EXISTS); an INSERT writes acme's
rows only or raises CrossTenantWrite. Afterwards every other tenant's rows, read as the
operations role and checksummed (md5 of the sorted rows), are unchanged, and nothing
the statement returned is theirs.

On SQLite this layer is the only one (raw ``text()`` SQL stays the documented gap:
tests/router/test_probes_sqlite.py); on PostgreSQL row-level security stands behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import (
    bindparam,
    cast,
    delete,
    except_,
    exists,
    func,
    insert,
    intersect,
    lambda_stmt,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    union,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from tenantry.errors import CrossTenantWrite
from tenantry.shardmap.operations import operator_transaction

ME = "acme"


@pytest.fixture(params=["session", "connection"])
def via(request: pytest.FixtureRequest) -> str:
    """How the statement is sent: ``router.session()`` or ``router.connection()``."""
    param: str = request.param
    return param


@pytest.fixture
def guard(fleet: Any, foreign_rows: Any) -> Any:
    """The other tenants' rows, checksummed before the test."""
    return foreign_rows(fleet)


@contextmanager
def routed(fleet: Any, via: str, tenant: str = ME) -> Iterator[Any]:
    """A routed session or connection for *tenant*, committed if the block succeeds."""
    if via == "session":
        with fleet.router.session(tenant) as session:
            yield session
            session.commit()
    else:
        with fleet.router.connection(tenant) as conn:
            yield conn


def run(fleet: Any, via: str, statement: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """Execute one statement as acme and commit; the rows it returned."""
    with routed(fleet, via) as executor:
        result = executor.execute(statement, params) if params else executor.execute(statement)
        return [tuple(row) for row in result] if result.returns_rows else []


def own(rows: list[Any]) -> list[Any]:
    """The values of *rows* (all of them acme's), flattened."""
    values = [value for row in rows for value in row]
    for value in values:
        if isinstance(value, str):
            assert value == ME or value.startswith(f"{ME}-"), value
    return values


def admin_rows(fleet: Any, table: str, tenant: str = ME) -> list[tuple[Any, ...]]:
    return [row for row in fleet.rows("shared-a", table) if row[0] == tenant]


def plant_lonely_project(fleet: Any, app: Any) -> None:
    """acme's project 9 has no tasks; globex's project 9 has task 91."""
    with operator_transaction(fleet.shard("shared-a")) as conn:
        conn.execute(
            app.projects.insert(),
            [
                {"tenant_id": ME, "id": 9, "name": "acme-p9"},
                {"tenant_id": "globex", "id": 9, "name": "globex-p9"},
            ],
        )
        conn.execute(
            app.tasks.insert(),
            {"tenant_id": "globex", "id": 91, "project_id": 9, "title": "globex-t91"},
        )


# -- reads ---------------------------------------------------------------------------------


def test_select_of_a_tenant_table_sees_own_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    rows = run(fleet, via, select(projects).order_by(projects.c.id))
    assert rows == [(ME, 1, "acme-p1"), (ME, 2, "acme-p2")]
    titles = sorted(own(run(fleet, via, select(tasks.c.title))))
    assert titles == [f"acme-t{t}" for t in (11, 12, 21, 22)]
    assert len(own(run(fleet, via, projects.select()))) == 6
    guard.unseen(rows)
    guard.unchanged()


def test_where_naming_another_tenant_finds_nothing(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    projects = app.projects
    assert run(fleet, via, select(projects).where(projects.c.tenant_id == "globex")) == []
    widened = select(projects.c.name).where(or_(projects.c.tenant_id == "globex", true()))
    assert sorted(own(run(fleet, via, widened))) == ["acme-p1", "acme-p2"]
    guard.unchanged()


def test_inner_join_on_the_id_alone(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    query = select(projects.c.name, tasks.c.title).join_from(
        projects, tasks, tasks.c.project_id == projects.c.id
    )
    rows = run(fleet, via, query)
    assert sorted(rows) == [
        ("acme-p1", "acme-t11"),
        ("acme-p1", "acme-t12"),
        ("acme-p2", "acme-t21"),
        ("acme-p2", "acme-t22"),
    ]
    guard.unseen(rows)
    guard.unchanged()


def test_left_outer_join_keeps_its_meaning(
    fleet: Any, app: Any, via: str, foreign_rows: Any
) -> None:
    # The criteria of the joined table go in the ON clause: acme's project 9 matches
    # only globex's task 91, so it must come back once, with no task, not vanish.
    plant_lonely_project(fleet, app)
    guard = foreign_rows(fleet)
    projects, tasks = app.projects, app.tasks
    query = (
        select(projects.c.name, tasks.c.title)
        .outerjoin_from(projects, tasks, tasks.c.project_id == projects.c.id)
        .where(projects.c.id == 9)
    )
    assert run(fleet, via, query) == [("acme-p9", None)]
    inferred = select(projects.c.name, tasks.c.title).select_from(projects.outerjoin(tasks))
    rows = run(fleet, via, inferred)
    assert sorted(rows, key=str) == sorted(
        [("acme-p9", None), *((f"acme-p{t // 10}", f"acme-t{t}") for t in (11, 12, 21, 22))],
        key=str,
    )
    guard.unseen(rows)
    guard.unchanged()


def test_full_outer_join_sees_own_rows_only(
    fleet: Any, app: Any, via: str, foreign_rows: Any
) -> None:
    plant_lonely_project(fleet, app)
    guard = foreign_rows(fleet)
    projects, tasks = app.projects, app.tasks
    query = select(projects.c.name, tasks.c.title).join_from(
        projects, tasks, tasks.c.project_id == projects.c.id, full=True
    )
    rows = run(fleet, via, query)
    assert sorted(rows, key=str) == sorted(
        [("acme-p9", None), *((f"acme-p{t // 10}", f"acme-t{t}") for t in (11, 12, 21, 22))],
        key=str,
    )
    guard.unseen(rows)
    guard.unchanged()


def test_aliases_and_a_self_join(fleet: Any, app: Any, via: str, guard: Any) -> None:
    left, right = app.projects.alias("p1"), app.projects.alias("p2")
    query = select(left.c.name, right.c.name).join_from(left, right, left.c.id == right.c.id)
    rows = run(fleet, via, query)
    assert sorted(rows) == [("acme-p1", "acme-p1"), ("acme-p2", "acme-p2")]
    lateral = select(app.tasks.c.title).where(app.tasks.c.project_id == left.c.id).lateral()
    if fleet.pg:  # SQLite has no LATERAL
        rows = run(fleet, via, select(left.c.name, lateral.c.title).join(lateral, true()))
        assert len(own(rows)) == 8
    guard.unseen(rows)
    guard.unchanged()


def test_subqueries_in_where_and_in_the_select_list(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    projects, tasks = app.projects, app.tasks
    foreign = select(tasks.c.project_id).where(tasks.c.title.like("globex%"))
    assert run(fleet, via, select(projects.c.name).where(projects.c.id.in_(foreign))) == []
    titles = select(tasks.c.title).where(tasks.c.tenant_id == "globex").limit(1)
    assert run(fleet, via, select(titles.scalar_subquery())) == [(None,)]
    per_project = select(func.count()).where(tasks.c.project_id == projects.c.id).scalar_subquery()
    rows = run(fleet, via, select(projects.c.name, per_project).order_by(projects.c.id))
    assert rows == [("acme-p1", 2), ("acme-p2", 2)]
    guard.unseen(rows)
    guard.unchanged()


def test_subqueries_and_ctes_in_from(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    sub = select(projects).subquery()
    assert run(fleet, via, select(func.count()).select_from(sub)) == [(2,)]
    cte = select(tasks.c.title, tasks.c.project_id).cte("titles")
    rows = run(fleet, via, select(cte.c.title))
    assert len(own(rows)) == 4
    nested = select(cte.c.title).where(cte.c.project_id == 1).cte("firsts")
    assert sorted(run(fleet, via, select(nested.c.title))) == [("acme-t11",), ("acme-t12",)]
    numbers = select(literal(1).label("n")).cte("numbers", recursive=True)
    numbers = numbers.union_all(select(numbers.c.n + 1).where(numbers.c.n < 30))
    joined = select(projects.c.name).join(numbers, numbers.c.n == projects.c.id)
    assert sorted(run(fleet, via, joined)) == [("acme-p1",), ("acme-p2",)]
    guard.unseen(rows)
    guard.unchanged()


def test_set_operations_are_scoped_on_every_side(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    projects, tasks = app.projects, app.tasks
    rows = run(fleet, via, union_all(select(projects.c.name), select(tasks.c.title)))
    assert len(own(rows)) == 6
    ids = run(fleet, via, union(select(projects.c.id), select(tasks.c.project_id)))
    assert sorted(ids) == [(1,), (2,)]
    both = intersect(select(projects.c.tenant_id), select(tasks.c.tenant_id))
    assert run(fleet, via, both) == [(ME,)]
    others = except_(select(tasks.c.tenant_id), select(projects.c.tenant_id))
    assert run(fleet, via, others) == []
    guard.unseen(rows)
    guard.unchanged()


def test_exists_cannot_probe_foreign_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    probe = exists(select(tasks.c.id).where(tasks.c.title == "globex-t11"))
    assert run(fleet, via, select(projects.c.id).where(probe)) == []
    assert run(fleet, via, select(probe)) == [(False,)]  # 0 on SQLite, which equals False
    guard.unchanged()


def test_aggregates_count_own_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    assert run(fleet, via, select(func.count()).select_from(projects)) == [(2,)]
    assert run(fleet, via, select(func.count(tasks.c.id))) == [(4,)]
    grouped = select(tasks.c.tenant_id, func.count()).group_by(tasks.c.tenant_id)
    assert run(fleet, via, grouped) == [(ME, 4)]
    assert run(fleet, via, select(func.max(tasks.c.title))) == [("acme-t22",)]
    window = select(projects.c.name, func.count().over()).order_by(projects.c.id)
    assert run(fleet, via, window) == [("acme-p1", 2), ("acme-p2", 2)]
    guard.unchanged()


def test_lambda_statements_are_scoped(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects = app.projects
    rows = run(fleet, via, lambda_stmt(lambda: select(projects.c.name)))
    assert sorted(own(rows)) == ["acme-p1", "acme-p2"]
    guard.unchanged()


def test_one_compiled_statement_serves_every_tenant(fleet: Any, app: Any, via: str) -> None:
    engine = fleet.router.engine_for(ME)
    hits: list[Any] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM projects" in statement:
            hits.append(_args[1].cache_hit)

    query = select(app.projects.c.name).where(app.projects.c.id == bindparam("id"))
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        seen = {}
        for tenant in ("acme", "globex", "initech", "acme"):
            with routed(fleet, via, tenant) as executor:
                seen[tenant] = executor.execute(query, {"id": 1}).scalars().all()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert seen == {t: [f"{t}-p1"] for t in ("acme", "globex", "initech")}
    assert len(hits) == 4
    assert all(hit is sa.engine.default.CACHE_HIT for hit in hits[1:]), hits


def test_postgresql_gets_the_same_criteria_not_only_row_level_security(
    pg_fleet: Any, app: Any, via: str
) -> None:
    # Row-level security would hide these rows on its own; the statements must carry
    # the criteria anyway (one layer does not lean on the other).
    projects, tasks = app.projects, app.tasks
    gone = delete(tasks).returning(tasks.c.id).cte("gone")
    statements = {
        select(projects): 1,
        select(projects.c.name, tasks.c.title).outerjoin_from(
            projects, tasks, tasks.c.project_id == projects.c.id
        ): 2,
        union_all(select(projects.c.name), select(tasks.c.title)): 2,
        select(gone.c.id): 1,
        update(tasks).where(tasks.c.project_id == projects.c.id).values(title="x"): 2,
    }
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    engine = pg_fleet.router.engine_for(ME)
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        for statement, tables in statements.items():
            sent.clear()
            with routed(pg_fleet, via) as executor:
                executor.execute(statement)
            assert sent[-1].count("tenant_id = %(tenantry_scope_tenant)s") == tables, sent[-1]
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


# -- UPDATE and DELETE -----------------------------------------------------------------------


def test_update_changes_only_own_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects = app.projects
    with routed(fleet, via) as executor:
        assert executor.execute(update(projects).values(name="pwn")).rowcount == 2
        widened = update(projects).where(or_(projects.c.tenant_id == "globex", true()))
        assert executor.execute(widened.values(name=projects.c.name + "-x")).rowcount == 2
    assert [row[2] for row in admin_rows(fleet, "projects")] == ["pwn-x", "pwn-x"]
    guard.unchanged()


def test_update_from_and_subqueries_read_own_rows(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    projects, tasks = app.projects, app.tasks
    titles = (
        select(tasks.c.title)
        .where(tasks.c.project_id == projects.c.id)
        .order_by(tasks.c.title.desc())
        .limit(1)
        .scalar_subquery()
    )
    with routed(fleet, via) as executor:
        assert executor.execute(update(projects).values(name=titles)).rowcount == 2
        # UPDATE ... FROM: the other table is scoped too
        joined = (
            update(tasks)
            .where(tasks.c.project_id == projects.c.id)
            .values(title=projects.c.name + "/" + tasks.c.title)
        )
        assert executor.execute(joined).rowcount == 4
    assert [row[2] for row in admin_rows(fleet, "projects")] == ["acme-t12", "acme-t22"]
    assert [row[3] for row in admin_rows(fleet, "tasks")] == [
        "acme-t12/acme-t11",
        "acme-t12/acme-t12",
        "acme-t22/acme-t21",
        "acme-t22/acme-t22",
    ]
    guard.unchanged()


@pytest.mark.parametrize(
    "value",
    [
        "globex",
        literal_column("'globex'"),
        func.lower("GLOBEX"),
        cast(literal("globex"), sa.String),
        None,
    ],
    ids=["bound", "literal_column", "function", "cast", "null"],
)
def test_update_setting_another_tenant_is_refused(
    fleet: Any, app: Any, via: str, guard: Any, value: Any
) -> None:
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(update(app.tasks).values(tenant_id=value))
    assert len(admin_rows(fleet, "tasks")) == 4
    guard.unchanged()


def test_delete_removes_only_own_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects, tasks = app.projects, app.tasks
    with routed(fleet, via) as executor:
        linked = exists(select(projects.c.id).where(projects.c.id == tasks.c.project_id))
        assert executor.execute(delete(tasks).where(tasks.c.id < 20, linked)).rowcount == 2
        foreign = select(tasks.c.project_id).where(tasks.c.tenant_id == "globex")
        assert executor.execute(delete(tasks).where(tasks.c.project_id.in_(foreign))).rowcount == 0
        assert executor.execute(delete(tasks)).rowcount == 2
    assert admin_rows(fleet, "tasks") == []
    guard.unchanged()


def test_data_modifying_ctes_are_scoped(
    pg_fleet: Any, app: Any, via: str, foreign_rows: Any
) -> None:
    # PostgreSQL only: WITH gone AS (DELETE ... RETURNING ...) SELECT ... FROM gone
    guard = foreign_rows(pg_fleet)
    tasks, projects = app.tasks, app.projects
    gone = delete(tasks).where(tasks.c.id > 0).returning(tasks.c.title).cte("gone")
    renamed = update(projects).values(name=projects.c.name + "-x").returning(projects.c.name)
    renamed_cte = renamed.cte("renamed")
    with routed(pg_fleet, via) as executor:
        titles = executor.execute(select(gone.c.title)).scalars().all()
        names = executor.execute(select(renamed_cte.c.name)).scalars().all()
    assert sorted(titles) == [f"acme-t{t}" for t in (11, 12, 21, 22)]
    assert sorted(names) == ["acme-p1-x", "acme-p2-x"]
    assert admin_rows(pg_fleet, "tasks") == []
    guard.unseen([titles, names])
    guard.unchanged()


def test_delete_naming_another_tenant_is_refused(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    tasks = app.tasks
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(delete(tasks).where(tasks.c.tenant_id == "globex"))
    guard.unchanged()


# -- INSERT --------------------------------------------------------------------------------


def _row(tenant: Any, pid: int = 9) -> dict[str, Any]:
    return {"tenant_id": tenant, "id": pid, "name": f"acme-p{pid}"}


@pytest.mark.parametrize(
    ("value", "params"),
    [
        ("globex", None),
        (literal_column("'globex'"), None),
        (literal("globex"), None),
        (func.lower("GLOBEX"), None),
        (cast(literal("globex"), sa.String), None),
        (bindparam("t"), {"t": "globex"}),
        (literal_column("'acme'"), None),  # an expression: refused even if it is acme
        ("subquery", None),
        (None, None),
    ],
    ids=[
        "bound",
        "literal_column",
        "literal",
        "function",
        "cast",
        "named-bind",
        "expression-of-own",
        "subquery",
        "null",
    ],
)
def test_insert_of_another_or_unverifiable_tenant_is_refused(
    fleet: Any, app: Any, via: str, guard: Any, value: Any, params: Any
) -> None:
    projects = app.projects
    if isinstance(value, str) and value == "subquery":
        value = select(projects.c.tenant_id).where(projects.c.name == "globex-p1").scalar_subquery()
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(insert(projects).values(_row(value)), params)
    assert len(admin_rows(fleet, "projects")) == 2
    guard.unchanged()


def test_insert_of_own_rows_works(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects = app.projects
    with routed(fleet, via) as executor:
        executor.execute(insert(projects).values(_row(ME, 3)))
        executor.execute(insert(projects).values(_row(literal(ME), 4)))
        executor.execute(insert(projects).values(_row(bindparam("t"), 5)), {"t": ME})
        executor.execute(insert(projects), [_row(ME, 6), _row(ME, 7), _row(ME, 8)])
        executor.execute(insert(projects).values([_row(ME, 10), _row(ME, 11)]))
    assert [row[1] for row in admin_rows(fleet, "projects")] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
    guard.unchanged()


def test_executemany_with_one_foreign_row_writes_nothing(
    fleet: Any, app: Any, via: str, guard: Any
) -> None:
    rows = [_row(ME, 6), _row("globex", 7), _row(ME, 8)]
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(insert(app.projects), rows)
    positional = insert(app.projects).values([("globex", 7, "x")])
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(positional)
    assert len(admin_rows(fleet, "projects")) == 2
    guard.unchanged()


@pytest.mark.parametrize("columns", [1, 3], ids=["one-column", "all-columns"])
def test_insert_from_a_text_select_is_refused(
    fleet: Any, app: Any, via: str, guard: Any, columns: int
) -> None:
    # An IndexError before; now a CrossTenantWrite that says why.
    names = ["tenant_id", "id", "name"]
    source = text("SELECT 'globex', 9, 'globex-planted'").columns(
        *(sa.column(name) for name in names[:columns])
    )
    statement = insert(app.projects).from_select(names, source)
    with pytest.raises(CrossTenantWrite, match=r"text\(\) FROM SELECT"), routed(fleet, via) as ex:
        ex.execute(statement)
    assert len(admin_rows(fleet, "projects")) == 2
    guard.unchanged()


def test_insert_from_a_select_of_another_tenant(fleet: Any, app: Any, via: str, guard: Any) -> None:
    projects = app.projects
    names = ["tenant_id", "id", "name"]
    copy = select(literal("globex"), projects.c.id + 100, projects.c.name)
    with pytest.raises(CrossTenantWrite, match="globex"), routed(fleet, via) as executor:
        executor.execute(insert(projects).from_select(names, copy))
    both = union_all(
        select(literal(ME), projects.c.id + 100, projects.c.name),
        select(literal("globex"), projects.c.id + 200, projects.c.name),
    )
    with pytest.raises(CrossTenantWrite, match="globex"), routed(fleet, via) as executor:
        executor.execute(insert(projects).from_select(names, both))
    # Copying another tenant's rows under one's own tenant column: the select is scoped.
    theirs = select(projects.c.tenant_id, projects.c.id + 100, projects.c.name).where(
        projects.c.tenant_id == "globex"
    )
    with routed(fleet, via) as executor:
        executor.execute(insert(projects).from_select(names, theirs))  # copies nothing
    mine = select(projects.c.tenant_id, projects.c.id + 100, projects.c.name)
    with routed(fleet, via) as executor:
        executor.execute(insert(projects).from_select(names, mine))
    assert [row[1:] for row in admin_rows(fleet, "projects")] == [
        (1, "acme-p1"),
        (2, "acme-p2"),
        (101, "acme-p1"),
        (102, "acme-p2"),
    ]
    guard.unchanged()


def test_upserts_write_only_own_rows(fleet: Any, app: Any, via: str, guard: Any) -> None:
    dialect_insert = postgresql.insert if fleet.pg else sqlite.insert
    projects = app.projects
    upsert = dialect_insert(projects).values(_row(ME, 1))
    with routed(fleet, via) as executor:
        executor.execute(
            upsert.on_conflict_do_update(
                index_elements=["tenant_id", "id"], set_={"name": "acme-upserted"}
            )
        )
    assert admin_rows(fleet, "projects")[0] == (ME, 1, "acme-upserted")
    moved = upsert.on_conflict_do_update(
        index_elements=["tenant_id", "id"], set_={"tenant_id": "globex"}
    )
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(moved)
    guard.unchanged()


def test_the_tenant_parameter_cannot_be_set(fleet: Any, app: Any, via: str, guard: Any) -> None:
    query = select(app.projects.c.name)
    with pytest.raises(CrossTenantWrite, match="tenantry_scope_tenant"):
        run(fleet, via, query, {"tenantry_scope_tenant": "globex"})
    rows = [{"tenantry_scope_tenant": "globex", "n": "x"}] * 2
    with pytest.raises(CrossTenantWrite), routed(fleet, via) as executor:
        executor.execute(update(app.projects).values(name=bindparam("n")), rows)
    guard.unchanged()
