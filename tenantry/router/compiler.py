"""Tenant criteria in routed Core statements, added when they are compiled.

A routed connection passes the tenant as one bound parameter (:data:`TENANT_PARAM`)
with every statement (:func:`scope_parameters`, from the router's Connection); the compiler
of a router's engines (:func:`scoping_compiler`) then limits every tenant table to it:
in the WHERE clause for each tenant table (or alias of one) in a FROM list, in the ON
clause for one joined to the right of a join (so outer joins keep their meaning), in
subqueries, CTEs, unions and EXISTS alike, and for an UPDATE's or DELETE's target. One
parameter for every tenant, so a compiled statement serves them all from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import String, and_, bindparam, or_
from sqlalchemy.sql import Insert, operators
from sqlalchemy.sql.base import _from_objects
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnClause,
    ColumnElement,
    Grouping,
)
from sqlalchemy.sql.selectable import FromGrouping, Join
from sqlalchemy.sql.sqltypes import NullType

from tenantry.errors import CrossTenantWrite
from tenantry.router.writes import DEFAULT_COLUMN, check_statement, tenant_column

__all__ = ["TENANT_PARAM", "scope_parameters", "scopes_by", "scoping_compiler", "with_tenant"]

#: The tenant's parameter in routed statements; no statement may set it otherwise.
TENANT_PARAM = "tenantry_scope_tenant"

#: The tenant in compiled statements: one parameter for every tenant (caching works),
#: required (a statement without a value fails, never widens).
_TENANT_BIND: BindParameter[str] = bindparam(TENANT_PARAM, type_=String())


def _criterion(column: ColumnElement[Any], outer: bool) -> ColumnElement[bool]:
    """``tenant_id = :tenant``, or NULL too where a FULL join may NULL-extend the row."""
    if outer:
        return or_(column == _TENANT_BIND, column.is_(None))
    return column == _TENANT_BIND


def _identity(from_: Any) -> Any:
    deannotate = getattr(from_, "_deannotate", None)
    return deannotate() if deannotate is not None else from_


def _scoped_already(criteria: Iterable[Any], column_name: str) -> set[Any]:
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
                    and other.key == TENANT_PARAM
                    and not other.expanding
                    and isinstance(other.type, String | NullType)
                    and isinstance(column, ColumnClause)
                    and column.name == column_name
                    and column.table is not None
                ):
                    found.add(_identity(column.table))
    return found


#: (a tenant FROM, its tenant column, whether an enclosing FULL join may NULL-extend it)
_Exposed = list[tuple[Any, ColumnElement[Any], bool]]


def _scope_from(from_: Any, name: str) -> tuple[Any, _Exposed]:
    """*from_* with criteria in the ON clause of each join, and the criteria left over.

    A tenant table joined to the right of a join is limited in that join's ON clause
    (as ``with_loader_criteria`` does for joined entities), so a LEFT OUTER JOIN still
    keeps its left rows; the leftmost tables' criteria are returned for the enclosing
    WHERE (or ON) clause. A FULL join limits both sides in its ON clause and returns
    both sides' criteria with ``OR tenant_id IS NULL`` (rows it NULL-extends).
    """
    if isinstance(from_, FromGrouping):
        inner, exposed = _scope_from(from_.element, name)
        return (from_ if inner is from_.element else FromGrouping(inner)), exposed
    if isinstance(from_, Join):
        left, left_exposed = _scope_from(from_.left, name)
        right, right_exposed = _scope_from(from_.right, name)
        present = _scoped_already([from_.onclause], name)
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
    column = tenant_column(from_, name)
    return from_, ([] if column is None else [(from_, column, False)])


def _scope_where(
    froms: Iterable[Any], where: Iterable[Any], name: str
) -> tuple[list[Any], list[Any]]:
    """The FROMs with their joins scoped, and the criteria to add to the WHERE clause."""
    present = _scoped_already(where, name)
    scoped: list[Any] = []
    adds: list[Any] = []
    for from_ in froms:
        new, exposed = _scope_from(from_, name)
        scoped.append(new)
        adds.extend(
            _criterion(column, outer)
            for source, column, outer in exposed
            if outer or _identity(source) not in present
        )
    return scoped, adds


def _scope_dml(statement: Any, name: str) -> Any:
    """An UPDATE or DELETE limited to the tenant: its target and its other FROMs."""
    froms = dict.fromkeys(
        (statement.table, *_from_objects(*statement._where_criteria)),
    )
    _joins, adds = _scope_where(froms, statement._where_criteria, name)
    return statement.where(*adds) if adds else statement


class _ScopingCompiler(SQLCompiler):
    """The statement compiler of a router's engines: tenant criteria for routed statements.

    A routed connection passes the tenant as the parameter :data:`TENANT_PARAM`
    with every statement (``scoping._RoutedConnection``), so the parameter's name is among the
    compiled statement's ``column_keys``, which are part of SQLAlchemy's compiled-cache
    key: routed statements are compiled (once) with the criteria, statements on the
    same engine without a tenant (``router.engine_for(t)``) without them, and a cached
    statement never crosses over. Compiling is the only extra work; a cache hit costs
    nothing more than before.
    """

    _tenantry_scoped = False
    #: The tenant column's name (the router's ``settings.tenant_column``).
    tenant_column = DEFAULT_COLUMN

    def __init__(
        self,
        dialect: Any,
        statement: Any,
        cache_key: Any = None,
        column_keys: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if column_keys and TENANT_PARAM in column_keys:
            self._tenantry_scoped = True
            # Not a column: an INSERT or UPDATE must not try to write it.
            column_keys = [key for key in column_keys if key != TENANT_PARAM]
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
            froms, adds = _scope_where(froms, select._where_criteria, self.tenant_column)
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
            column = tenant_column(table, self.tenant_column)
            where = on_conflict.update_whereclause
            present = _scoped_already([] if where is None else [where], self.tenant_column)
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
            update_stmt = _scope_dml(update_stmt, self.tenant_column)
        return super().visit_update(update_stmt, visiting_cte=visiting_cte, **kw)

    def visit_delete(self, delete_stmt: Any, visiting_cte: Any = None, **kw: Any) -> str:
        if self._tenantry_scoped:
            delete_stmt = _scope_dml(delete_stmt, self.tenant_column)
        visit: Any = super().visit_delete
        result: str = visit(delete_stmt, visiting_cte=visiting_cte, **kw)
        return result


_COMPILERS: dict[tuple[type[SQLCompiler], str], type[SQLCompiler]] = {}


def scoping_compiler(base: type[SQLCompiler], column: str = DEFAULT_COLUMN) -> type[SQLCompiler]:
    """The dialect's statement compiler *base* with :class:`_ScopingCompiler` mixed in,
    scoping by the tenant column *column*."""
    if issubclass(base, _ScopingCompiler):
        if base.tenant_column == column:
            return base
        base = base.__mro__[2]  # the dialect's own compiler, under _ScopingCompiler
    compiler = _COMPILERS.get((base, column))
    if compiler is None:
        name = f"TenantScoped{base.__name__}"
        attributes = {"tenant_column": column}
        compiler = _COMPILERS[base, column] = type(name, (_ScopingCompiler, base), attributes)
    return compiler


def scopes_by(compiler: type[Any], column: str) -> bool:
    """Whether the statement compiler *compiler* scopes routed statements by *column*."""
    return issubclass(compiler, _ScopingCompiler) and compiler.tenant_column == column


def with_tenant(params: Mapping[str, Any], tenant: str) -> Mapping[str, Any]:
    """*params* with the tenant parameter, which no statement may set otherwise."""
    given = params.get(TENANT_PARAM, tenant)
    if given != tenant:
        raise CrossTenantWrite(
            f"a connection of tenant {tenant!r} cannot set the parameter "
            f"{TENANT_PARAM!r} (to {given!r}): tenantry sets it to the routed tenant",
            tenant_id=tenant,
        )
    return params if TENANT_PARAM in params else {**params, TENANT_PARAM: tenant}


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


def scope_parameters(
    statement: Any, multiparams: Any, params: Any, tenant: str, column: str = DEFAULT_COLUMN
) -> tuple[Any, Any]:
    """Check a routed Core statement and add the tenant to its parameters.

    ``(multiparams, params)`` as SQLAlchemy's ``before_execute`` event takes them back.
    """
    if statement.is_dml:  # lambda statements say what they resolve to
        check_statement(statement, [*multiparams, params], tenant, column)
    if not multiparams:
        if not params:
            return multiparams, {TENANT_PARAM: tenant}
        return multiparams, with_tenant(params, tenant)
    rows = list(multiparams)
    if _values_only(statement):
        rows[0] = with_tenant(rows[0], tenant)
        for row in rows[1:]:
            if row.get(TENANT_PARAM, tenant) != tenant:
                with_tenant(row, tenant)  # raises
    else:
        rows = [with_tenant(row, tenant) for row in rows]
    return rows, params
