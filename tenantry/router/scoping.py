"""Tenant scoping of sessions and connections: fail closed, three layers deep.

1. Criteria: every ORM SELECT, UPDATE and DELETE of a :class:`TenantScoped` model
   (relationship loads, joins, ``Session.get`` included) gets
   ``tenant_id = <session tenant>`` through ``with_loader_criteria``; and every Core
   statement on a tenant table (a table with a ``tenant_id`` column) sent through a
   routed session or connection gets the same criteria when it is compiled: in the
   WHERE clause for each tenant table (or alias of one) in a FROM list, in the ON
   clause for one joined to the right of a join (so outer joins keep their meaning),
   in subqueries, CTEs, unions and EXISTS alike, and for an UPDATE's or DELETE's
   target. The tenant is one bound parameter for every tenant, so a compiled
   statement serves them all from the cache (see :class:`_ScopingCompiler`). Not
   scoped here: raw SQL (``text()``, ``exec_driver_sql``), and statements run on
   ``router.engine_for(t)`` directly, which are not routed.
2. Writes: at flush, new objects are stamped with the session's tenant and an object
   carrying another tenant's id raises :class:`CrossTenantWrite`; an INSERT or
   UPDATE whose tenant value is not the session's tenant as a bound value (another
   tenant's id, or a SQL expression that cannot be verified, ``text()`` FROM SELECT
   sources included) raises it too, and so does one naming another tenant's id in
   its WHERE clause.
3. PostgreSQL shards: row-level security admits only the tenant the fence of the
   transaction signed (``tenantry.tenant()``), whatever SQL the application sends,
   raw ``text()`` included, and refuses writes unless the tenant is active there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import Column, Engine, String, and_, bindparam, event, or_
from sqlalchemy import column as column_clause
from sqlalchemy.orm import (
    LoaderCriteriaOption,
    Mapped,
    ORMExecuteState,
    Session,
    UOWTransaction,
    mapped_column,
    with_loader_criteria,
)
from sqlalchemy.sql import Delete, Insert, Update, operators
from sqlalchemy.sql.base import _from_objects
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnClause,
    ColumnElement,
    Grouping,
    Label,
)
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    CompoundSelect,
    FromGrouping,
    Join,
    Select,
    TableClause,
    TextualSelect,
)
from sqlalchemy.sql.sqltypes import NullType

from tenantry.errors import CrossTenantWrite
from tenantry.router.fence import FROZEN_KEY, TENANT_KEY, frozen_error, reset_connection, run_fence

__all__ = [
    "SESSION_CRITERIA",
    "SESSION_SHARD",
    "SESSION_TENANT",
    "TenantScoped",
    "TenantSession",
    "check_statement",
    "configure_engine",
    "tenant_criteria",
]

SESSION_TENANT = "tenantry.tenant_id"
SESSION_SHARD = "tenantry.shard"
SESSION_CRITERIA = "tenantry.criteria"
_TENANT_COLUMN = "tenant_id"


class TenantScoped:
    """Declarative mixin for tenant tables: a ``tenant_id`` column leading the primary key.

    ::

        class Charger(TenantScoped, Base):
            __tablename__ = "chargers"
            id: Mapped[int] = mapped_column(primary_key=True)
    """

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True, sort_order=-1000)


class TenantSession(Session):
    """A Session bound to one tenant; made by the router, scoped by its events."""

    @property
    def tenant_id(self) -> str:
        """The tenant this session serves."""
        tenant: str = self.info[SESSION_TENANT]
        return tenant

    @property
    def frozen(self) -> bool:
        """Whether the tenant was frozen (read-only) when the transaction began."""
        return bool(self.info.get(FROZEN_KEY))


def tenant_criteria(tenant_id: str) -> LoaderCriteriaOption:
    """The ORM option that limits every TenantScoped entity to *tenant_id*.

    Immutable, so routers build it once per tenant and reuse it.
    """
    return with_loader_criteria(
        TenantScoped, lambda cls: cls.tenant_id == tenant_id, include_aliases=True
    )


_TENANT_PARAM = "tenantry_scope_tenant"
_SHARED_CRITERIA = with_loader_criteria(
    TenantScoped,
    # A literal name: SQLAlchemy's lambda tracking would wrap a global variable.
    lambda cls: cls.tenant_id == bindparam("tenantry_scope_tenant"),
    include_aliases=True,
)


def _tenant_of(session: Session) -> str | None:
    return session.info.get(SESSION_TENANT)


@event.listens_for(TenantSession, "after_begin")
def _fence(session: Session, _transaction: Any, connection: Any) -> None:
    tenant = _tenant_of(session)
    if tenant is None:
        return
    state = run_fence(connection, tenant, session.info.get(SESSION_SHARD, "?"))
    session.info[FROZEN_KEY] = state.value == "frozen"


@event.listens_for(TenantSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    tenant = _tenant_of(state.session)
    if tenant is None:
        return
    if state.is_insert or state.is_update or state.is_delete:
        check_statement(state.statement, state.parameters, tenant)
    from_select = state.is_insert and getattr(state.statement, "select", None) is not None
    if state.is_select or state.is_update or state.is_delete or from_select:
        # Propagates to lazy and eager relationship loads of the objects loaded here.
        params = state.parameters
        if not state.is_insert and (params is None or isinstance(params, Mapping)):
            # One criteria object for every tenant, the tenant a bound parameter: far
            # less work per statement than a criteria per tenant. A load that misses the
            # parameter fails ("a value is required"), never widens.
            state.parameters = _with_tenant(params or {}, tenant)
            state.statement = state.statement.options(_SHARED_CRITERIA)
        else:  # INSERT, executemany: the parameters are the rows, leave them alone
            criteria = state.session.info.get(SESSION_CRITERIA)
            if criteria is None:
                criteria = state.session.info[SESSION_CRITERIA] = tenant_criteria(tenant)
            state.statement = state.statement.options(criteria)
    if state.is_column_load:
        # SQLAlchemy leaves loader criteria out of refreshes and expired-attribute loads:
        # an object with another tenant's key, attached to this session, must not load.
        mapper = state.bind_mapper
        if mapper is not None and issubclass(mapper.class_, TenantScoped):
            refresh: Any = state.statement  # a Select of the mapper
            state.statement = refresh.where(mapper.columns[_TENANT_COLUMN] == tenant)


@event.listens_for(TenantSession, "before_flush")
def _stamp(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    tenant = _tenant_of(session)
    if tenant is None:
        return
    if session.info.get(FROZEN_KEY) and (session.new or session.dirty or session.deleted):
        raise frozen_error(tenant, session.info.get(SESSION_SHARD))
    for obj in session.new:
        if isinstance(obj, TenantScoped):
            if obj.tenant_id is None:
                obj.tenant_id = tenant
            elif obj.tenant_id != tenant:
                raise _cross(tenant, obj.tenant_id, type(obj).__name__)
    for obj in (*session.dirty, *session.deleted):
        if isinstance(obj, TenantScoped) and obj.tenant_id != tenant:
            raise _cross(tenant, obj.tenant_id, type(obj).__name__)


def _cross(tenant: str, other: object, what: str) -> CrossTenantWrite:
    return CrossTenantWrite(
        f"a session of tenant {tenant!r} cannot write {what} rows of tenant {other!r}: "
        "open a session for that tenant instead",
        tenant_id=tenant,
    )


def _refused(tenant: str, what: str, why: str) -> CrossTenantWrite:
    return CrossTenantWrite(
        f"a session of tenant {tenant!r} cannot write {what} rows with {why}, which "
        f"cannot be verified: write the tenant as a bound value (tenant_id={tenant!r}; in "
        f"a FROM SELECT, a select() of literal({tenant!r}) or of a tenant table's "
        "tenant_id)",
        tenant_id=tenant,
    )


def check_statement(statement: Any, parameters: Any, tenant: str) -> None:
    """Raise CrossTenantWrite unless an INSERT, UPDATE or DELETE writes only *tenant*.

    Looked at: the tenant values written (``values()``, multi-row values, executemany
    rows, ON CONFLICT DO UPDATE), an INSERT's FROM SELECT, and ``tenant_id = ...`` in
    an UPDATE's or DELETE's WHERE (how executemany by primary key names rows). A value
    written must be the tenant as a bound value, or the tenant column of a tenant table
    (scoped to the tenant when compiled); any other SQL expression cannot be verified
    and is refused, and so is a FROM SELECT whose source is ``text()``.
    """
    if isinstance(statement, StatementLambdaElement):
        statement = statement._resolved
    if not isinstance(statement, Insert | Update | Delete):
        return
    table = statement.table
    if _tenant_column(table) is None:
        return
    what = str(getattr(table, "name", ""))
    for prefix, _dialect in getattr(statement, "_prefixes", ()) or ():
        if "replace" in str(prefix).lower():
            raise CrossTenantWrite(
                f"a session of tenant {tenant!r} cannot run {str(prefix).upper()} on {what}: "
                "it deletes every row it conflicts with, whoever's it is; use an upsert "
                "(insert(...).on_conflict_do_update(...)) instead",
                tenant_id=tenant,
            )
    param_sets = list(_param_sets(parameters))
    values: list[Any] = []
    own = getattr(statement, "_values", None) or {}
    values.extend(v for k, v in own.items() if _key(k) == _TENANT_COLUMN)
    position = _position(table)
    for rows in getattr(statement, "_multi_values", ()) or ():
        for row in rows:
            if isinstance(row, Mapping):
                values.extend(v for k, v in row.items() if _key(k) == _TENANT_COLUMN)
            elif position is not None and len(row) > position:
                values.append(row[position])
    for params in param_sets:
        if _TENANT_COLUMN in params:
            values.append(params[_TENANT_COLUMN])
    conflict = getattr(
        getattr(statement, "_post_values_clause", None), "update_values_to_set", None
    )
    if isinstance(conflict, Mapping):  # INSERT ... ON CONFLICT DO UPDATE SET
        values.extend(v for k, v in conflict.items() if _key(k) == _TENANT_COLUMN)
    for value in values:
        _check_value(value, param_sets, tenant, what)
    if isinstance(statement, Insert) and statement.select is not None:
        names = [_key(name) for name in getattr(statement, "_select_names", None) or ()]
        if _TENANT_COLUMN in names:
            index = names.index(_TENANT_COLUMN)
            for column in _source_columns(statement.select, index, tenant, what):
                _check_value(column, param_sets, tenant, what)
    if isinstance(statement, Update | Delete):
        for criterion in statement._where_criteria:
            for bind in _tenant_binds(criterion):
                given = [params[bind.key] for params in param_sets if bind.key in params]
                for value in given or [bind.effective_value]:
                    if value != tenant:
                        raise _cross(tenant, value, what)


def _check_value(value: Any, param_sets: list[Mapping[str, Any]], tenant: str, what: str) -> None:
    """Refuse a tenant value written that is not *tenant* (or cannot be verified)."""
    while isinstance(value, Label):
        value = value.element
    if isinstance(value, BindParameter):
        given = [params[value.key] for params in param_sets if value.key in params]
        for item in given or [value.effective_value]:
            if item != tenant:
                raise _cross(tenant, item, what)
    elif isinstance(value, ClauseElement):
        if isinstance(value, ColumnClause) and value.name == _TENANT_COLUMN:
            source = value.table
            if source is not None and _tenant_column(source) is not None:
                return  # the tenant column of a tenant table: scoped to the tenant
        raise _refused(tenant, what, f"a SQL expression as their tenant ({value})")
    elif value != tenant:
        raise _cross(tenant, value, what)


def _source_columns(source: Any, index: int, tenant: str, what: str) -> Iterator[Any]:
    """The tenant column of each SELECT of an INSERT's FROM SELECT source."""
    if isinstance(source, CompoundSelect):
        for select in source.selects:
            yield from _source_columns(select, index, tenant, what)
    elif isinstance(source, Select):
        columns = list(source.selected_columns)
        if index >= len(columns):
            raise _refused(tenant, what, "a FROM SELECT with fewer columns than names")
        yield columns[index]
    else:
        kind = "text()" if isinstance(source, TextualSelect) else type(source).__name__
        raise _refused(tenant, what, f"a {kind} FROM SELECT source")


def _position(table: Any) -> int | None:
    """The index of the tenant column among *table*'s columns (positional VALUES rows)."""
    for index, column in enumerate(getattr(table, "c", ())):
        if column.name == _TENANT_COLUMN:
            return index
    return None


def _tenant_binds(criterion: Any) -> Iterator[BindParameter[Any]]:
    """The parameters compared with ``=`` to the tenant column in AND-ed criteria."""
    if isinstance(criterion, BooleanClauseList) and criterion.operator is operators.and_:
        for clause in criterion.clauses:
            yield from _tenant_binds(clause)
    elif isinstance(criterion, BinaryExpression) and criterion.operator is operators.eq:
        for column, other in (
            (criterion.left, criterion.right),
            (criterion.right, criterion.left),
        ):
            if getattr(column, "name", None) == _TENANT_COLUMN and isinstance(other, BindParameter):
                yield other


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(getattr(key, "key", key))


def _param_sets(parameters: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(parameters, Mapping):
        return [parameters]
    if isinstance(parameters, list | tuple):
        return [p for p in parameters if isinstance(p, Mapping)]
    return []


# -- Core statements: the tenant criteria, added when a routed statement is compiled ----

#: (schema, name) of every Table defined with a tenant column in this process, so that
#: a look-alike (``table("chargers", column("name"))``) is scoped as a tenant table too.
_TENANT_TABLES: set[tuple[str | None, str]] = set()

#: The tenant in compiled statements: one parameter for every tenant (caching works),
#: required (a statement without a value fails, never widens).
_TENANT_BIND: BindParameter[str] = bindparam(_TENANT_PARAM, type_=String())


@event.listens_for(Column, "after_parent_attach")
def _register_tenant_table(column: Column[Any], table: Any) -> None:
    if column.name == _TENANT_COLUMN and isinstance(table, TableClause):
        _TENANT_TABLES.add((table.schema, table.name))


def _tenant_column(from_: Any) -> ColumnElement[Any] | None:
    """The tenant column of a tenant table or of an alias of one; None for other FROMs."""
    if isinstance(from_, TableClause):
        known = (from_.schema, from_.name) in _TENANT_TABLES
    elif isinstance(from_, AliasedReturnsRows) and _tenant_column(from_.element) is not None:
        known = True  # an alias, lateral or sample of a tenant table
    else:
        return None  # subqueries and CTEs are scoped inside; joins by _scope_from
    for column in from_.c:
        if column.name == _TENANT_COLUMN:
            found: ColumnElement[Any] = column
            return found
    # A tenant table declared without its tenant column: name the column anyway.
    return column_clause(_TENANT_COLUMN, String(), _selectable=from_) if known else None


def _criterion(column: ColumnElement[Any], outer: bool) -> ColumnElement[bool]:
    """``tenant_id = :tenant``, or NULL too where a FULL join may NULL-extend the row."""
    if outer:
        return or_(column == _TENANT_BIND, column.is_(None))
    return column == _TENANT_BIND


def _identity(from_: Any) -> Any:
    deannotate = getattr(from_, "_deannotate", None)
    return deannotate() if deannotate is not None else from_


def _scoped_already(criteria: Iterable[Any]) -> set[Any]:
    """The FROMs that AND-ed *criteria* already limit to ``tenant_id = :tenant``.

    The ORM's criteria are of this form, so ORM statements get no second copy. Only the
    router's own parameter counts: its value is always the tenant of the connection.
    """
    found: set[Any] = set()
    stack = list(criteria)
    while stack:
        criterion = stack.pop()
        if isinstance(criterion, BooleanClauseList) and criterion.operator is operators.and_:
            stack.extend(criterion.clauses)
        elif isinstance(criterion, Grouping):
            stack.append(criterion.element)
        elif isinstance(criterion, BinaryExpression) and criterion.operator is operators.eq:
            for column, other in (
                (criterion.left, criterion.right),
                (criterion.right, criterion.left),
            ):
                if (
                    isinstance(other, BindParameter)
                    and other.key == _TENANT_PARAM
                    and not other.expanding
                    and isinstance(other.type, String | NullType)
                    and isinstance(column, ColumnClause)
                    and column.name == _TENANT_COLUMN
                    and column.table is not None
                ):
                    found.add(_identity(column.table))
    return found


#: (a tenant FROM, its tenant column, whether an enclosing FULL join may NULL-extend it)
_Exposed = list[tuple[Any, ColumnElement[Any], bool]]


def _scope_from(from_: Any) -> tuple[Any, _Exposed]:
    """*from_* with criteria in the ON clause of each join, and the criteria left over.

    A tenant table joined to the right of a join is limited in that join's ON clause
    (as ``with_loader_criteria`` does for joined entities), so a LEFT OUTER JOIN still
    keeps its left rows; the leftmost tables' criteria are returned for the enclosing
    WHERE (or ON) clause. A FULL join limits both sides in its ON clause and returns
    both sides' criteria with ``OR tenant_id IS NULL`` (rows it NULL-extends).
    """
    if isinstance(from_, FromGrouping):
        inner, exposed = _scope_from(from_.element)
        return (from_ if inner is from_.element else FromGrouping(inner)), exposed
    if isinstance(from_, Join):
        left, left_exposed = _scope_from(from_.left)
        right, right_exposed = _scope_from(from_.right)
        present = _scoped_already([from_.onclause])
        if from_.full:
            joined = [*left_exposed, *right_exposed]
            exposed = [(source, column, True) for source, column, _ in joined]
        else:
            joined, exposed = right_exposed, left_exposed
        adds = [
            _criterion(column, outer)
            for source, column, outer in joined
            if outer or _identity(source) not in present
        ]
        if not adds and left is from_.left and right is from_.right:
            return from_, exposed
        onclause = and_(from_.onclause, *adds) if from_.onclause is not None else and_(*adds)
        return Join(left, right, onclause, isouter=from_.isouter, full=from_.full), exposed
    column = _tenant_column(from_)
    return from_, ([] if column is None else [(from_, column, False)])


def _scope_where(froms: Iterable[Any], where: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """The FROMs with their joins scoped, and the criteria to add to the WHERE clause."""
    present = _scoped_already(where)
    scoped: list[Any] = []
    adds: list[Any] = []
    for from_ in froms:
        new, exposed = _scope_from(from_)
        scoped.append(new)
        adds.extend(
            _criterion(column, outer)
            for source, column, outer in exposed
            if outer or _identity(source) not in present
        )
    return scoped, adds


def _scope_dml(statement: Any) -> Any:
    """An UPDATE or DELETE limited to the tenant: its target and its other FROMs."""
    froms = dict.fromkeys(
        (statement.table, *_from_objects(*statement._where_criteria)),
    )
    _joins, adds = _scope_where(froms, statement._where_criteria)
    return statement.where(*adds) if adds else statement


class _ScopingCompiler(SQLCompiler):
    """The statement compiler of a router's engines: tenant criteria for routed statements.

    A routed connection passes the tenant as the parameter ``tenantry_scope_tenant``
    with every statement (``before_execute``), so the parameter's name is among the
    compiled statement's ``column_keys``, which are part of SQLAlchemy's compiled-cache
    key: routed statements are compiled (once) with the criteria, statements on the
    same engine without a tenant (``router.engine_for(t)``) without them, and a cached
    statement never crosses over. Compiling is the only extra work; a cache hit costs
    nothing more than before.
    """

    _tenantry_scoped = False

    def __init__(
        self,
        dialect: Any,
        statement: Any,
        cache_key: Any = None,
        column_keys: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if column_keys and _TENANT_PARAM in column_keys:
            self._tenantry_scoped = True
            # Not a column: an INSERT or UPDATE must not try to write it.
            column_keys = [key for key in column_keys if key != _TENANT_PARAM]
        super().__init__(dialect, statement, cache_key, column_keys, *args, **kwargs)

    def _compose_select_body(
        self,
        text: Any,
        select: Any,
        compile_state: Any,
        inner_columns: Any,
        froms: Any,
        byfrom: Any,
        toplevel: Any,
        kwargs: Any,
    ) -> Any:
        # *froms* are the FROMs this SELECT renders: correlated ones are left out, joins
        # are built (ON clauses inferred), ORM entities are resolved to their tables.
        if self._tenantry_scoped and froms:
            froms, adds = _scope_where(froms, select._where_criteria)
            if adds:
                select = select._generate()
                select._where_criteria = (*select._where_criteria, *adds)
        body: Any = super()._compose_select_body
        return body(text, select, compile_state, inner_columns, froms, byfrom, toplevel, kwargs)

    def visit_on_conflict_do_update(self, on_conflict: Any, **kw: Any) -> str:
        # The row an upsert updates is the one it conflicts with, whoever's it is when a
        # unique key does not begin with the tenant: update it only if it is the tenant's.
        if self._tenantry_scoped:
            insert: Any = self.stack[-1]["selectable"]
            table = insert.table
            column = _tenant_column(table)
            where = on_conflict.update_whereclause
            present = _scoped_already([] if where is None else [where])
            if column is not None and _identity(table) not in present:
                criterion = column == _TENANT_BIND
                on_conflict = on_conflict._clone()
                on_conflict.update_whereclause = (
                    criterion if where is None else and_(where, criterion)
                )
        visit: Any = getattr(super(), "visit_on_conflict_do_update")  # noqa: B009
        result: str = visit(on_conflict, **kw)
        return result

    def visit_update(self, update_stmt: Any, visiting_cte: Any = None, **kw: Any) -> str:
        if self._tenantry_scoped:
            update_stmt = _scope_dml(update_stmt)
        return super().visit_update(update_stmt, visiting_cte=visiting_cte, **kw)

    def visit_delete(self, delete_stmt: Any, visiting_cte: Any = None, **kw: Any) -> str:
        if self._tenantry_scoped:
            delete_stmt = _scope_dml(delete_stmt)
        visit: Any = super().visit_delete
        result: str = visit(delete_stmt, visiting_cte=visiting_cte, **kw)
        return result


_COMPILERS: dict[type[SQLCompiler], type[SQLCompiler]] = {}


def _scoping_compiler(base: type[SQLCompiler]) -> type[SQLCompiler]:
    """The dialect's statement compiler with :class:`_ScopingCompiler` mixed in."""
    if issubclass(base, _ScopingCompiler):
        return base
    compiler = _COMPILERS.get(base)
    if compiler is None:
        compiler = _COMPILERS[base] = type(
            f"TenantScoped{base.__name__}", (_ScopingCompiler, base), {}
        )
    return compiler


def _with_tenant(params: Mapping[str, Any], tenant: str) -> Mapping[str, Any]:
    """*params* with the tenant parameter, which no statement may set otherwise."""
    given = params.get(_TENANT_PARAM, tenant)
    if given != tenant:
        raise CrossTenantWrite(
            f"a connection of tenant {tenant!r} cannot set the parameter "
            f"{_TENANT_PARAM!r} (to {given!r}): tenantry sets it to the routed tenant",
            tenant_id=tenant,
        )
    return params if _TENANT_PARAM in params else {**params, _TENANT_PARAM: tenant}


def _values_only(statement: Any) -> bool:
    """An INSERT of plain values: nothing in it reads a table, so only the first row of
    an executemany needs the tenant parameter (the one that picks the compilation)."""
    if not isinstance(statement, Insert) or statement.select is not None:
        return False
    rows: list[Any] = [getattr(statement, "_values", None) or {}]
    for many in getattr(statement, "_multi_values", ()) or ():
        rows.extend(many)
    for row in rows:
        items = row.values() if isinstance(row, Mapping) else row
        for value in items:
            if isinstance(value, ClauseElement) and not isinstance(value, BindParameter):
                return False
    return True


def scope_parameters(statement: Any, multiparams: Any, params: Any, tenant: str) -> tuple[Any, Any]:
    """Check a routed Core statement and add the tenant to its parameters.

    ``(multiparams, params)`` as ``before_execute`` takes them back.
    """
    if statement.is_dml:  # lambda statements say what they resolve to
        check_statement(statement, [*multiparams, params], tenant)
    if not multiparams:
        if not params:
            return multiparams, {_TENANT_PARAM: tenant}
        return multiparams, _with_tenant(params, tenant)
    rows = list(multiparams)
    if _values_only(statement):
        rows[0] = _with_tenant(rows[0], tenant)
        for row in rows[1:]:
            if row.get(_TENANT_PARAM, tenant) != tenant:
                _with_tenant(row, tenant)  # raises
    else:
        rows = [_with_tenant(row, tenant) for row in rows]
    return rows, params


def configure_engine(engine: Engine) -> None:
    """Install tenantry's per-connection events on an engine the router made."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            reset_connection(dbapi_connection, record.info)

    dialect = engine.dialect
    dialect.statement_compiler = _scoping_compiler(dialect.statement_compiler)

    @event.listens_for(engine, "before_execute", retval=True)
    def _scope_core(
        conn: Any, clauseelement: Any, multiparams: Any, params: Any, _options: Any
    ) -> tuple[Any, Any, Any]:
        tenant = conn.info.get(TENANT_KEY)
        if (
            tenant is not None
            and isinstance(clauseelement, ClauseElement)
            and not isinstance(clauseelement, ExecutableDDLElement)
        ):
            multiparams, params = scope_parameters(clauseelement, multiparams, params, tenant)
        return clauseelement, multiparams, params

    @event.listens_for(engine, "handle_error")
    def _frozen(context: Any) -> None:
        conn = context.connection
        if conn is None:
            return
        orig = context.original_exception
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate == "25006" and str(orig).startswith("tenantry: tenant"):
            # The shard's policies refused a write to a tenant not active there (a raw
            # COMMIT ended the fenced transaction, or a move froze it meanwhile).
            raise frozen_error(conn.info.get(TENANT_KEY, "?"), None) from orig
        if not conn.info.get(FROZEN_KEY):
            return
        if sqlstate == "25006" or "readonly database" in str(orig):
            tenant = conn.info.get(TENANT_KEY, "?")
            raise frozen_error(tenant, None) from orig
