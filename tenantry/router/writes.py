"""Tenant tables, and the write check: does an INSERT, UPDATE or DELETE write only
the routed tenant's rows?

A tenant table is a table with the tenant column (``settings.tenant_column``,
``tenant_id`` by default), or an alias of one. Every ``Table`` defined in the process
is remembered by its columns (:func:`tenant_column`), so a look-alike
(``table("chargers", column("name"))``) is known as a tenant table too.

:func:`check_statement` looks at the tenant values a statement writes and at the tenant
its WHERE clause names; a value it cannot verify (a SQL expression, a ``text()`` FROM
SELECT source) is refused rather than trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

from sqlalchemy import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    Column,
    ColumnClause,
    ColumnElement,
    Label,
    String,
    event,
)
from sqlalchemy import column as column_clause
from sqlalchemy.sql import Delete, Insert, Update, operators
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.sql.selectable import (
    AliasedReturnsRows,
    CompoundSelect,
    Select,
    TableClause,
    TextualSelect,
)

from tenantry.errors import CrossTenantWrite

__all__ = ["DEFAULT_COLUMN", "check_statement", "cross_tenant", "tenant_column"]

#: The tenant column's name unless the settings say otherwise (``tenant_column``).
DEFAULT_COLUMN = "tenant_id"

#: (schema, table, column) of every column of every Table defined in this process.
_TABLE_COLUMNS: set[tuple[str | None, str, str]] = set()


@event.listens_for(Column, "after_parent_attach")
def _register_column(column: Column[Any], table: Any) -> None:
    if isinstance(table, TableClause):
        _TABLE_COLUMNS.add((table.schema, table.name, column.name))


def tenant_column(from_: Any, column: str = DEFAULT_COLUMN) -> ColumnElement[Any] | None:
    """The tenant column of a tenant table or of an alias of one; None for other FROMs."""
    if isinstance(from_, TableClause):
        known = (from_.schema, from_.name, column) in _TABLE_COLUMNS
    elif isinstance(from_, AliasedReturnsRows) and tenant_column(from_.element, column) is not None:
        known = True  # an alias, lateral or sample of a tenant table
    else:
        return None  # subqueries and CTEs are scoped inside; joins by their ON clauses
    for found in from_.c:
        if found.name == column:
            tenant: ColumnElement[Any] = found
            return tenant
    # A tenant table declared without its tenant column: name the column anyway.
    return column_clause(column, String(), _selectable=from_) if known else None


def cross_tenant(tenant: str, other: object, what: str) -> CrossTenantWrite:
    """The error of a write of *what* rows of tenant *other* by a session of *tenant*."""
    return CrossTenantWrite(
        f"a session of tenant {tenant!r} cannot write {what} rows of tenant {other!r}: "
        "open a session for that tenant instead",
        tenant_id=tenant,
    )


def _refused(tenant: str, what: str, why: str, column: str) -> CrossTenantWrite:
    return CrossTenantWrite(
        f"a session of tenant {tenant!r} cannot write {what} rows with {why}, which "
        f"cannot be verified: write the tenant as a bound value ({column}={tenant!r}; in "
        f"a FROM SELECT, a select() of literal({tenant!r}) or of a tenant table's "
        f"{column})",
        tenant_id=tenant,
    )


def check_statement(
    statement: Any, parameters: Any, tenant: str, column: str = DEFAULT_COLUMN
) -> None:
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
    found = tenant_column(table, column)
    if found is None:
        return
    check = _Check(tenant, str(getattr(table, "name", "")), column, list(_param_sets(parameters)))
    _refuse_replace(statement, check)
    for value in _written(statement, check, _key(found)):
        check.value(value)
    if isinstance(statement, Insert) and statement.select is not None:
        names = [_key(name) for name in getattr(statement, "_select_names", None) or ()]
        if column in names:
            for value in _source_columns(statement.select, names.index(column), check):
                check.value(value)
    if isinstance(statement, Update | Delete):
        for criterion in statement._where_criteria:
            for bind in _tenant_binds(criterion, column):
                check.bound(bind)


class _Check:
    """One statement's check: the tenant, the table's name, the rows' parameters."""

    __slots__ = ("column", "param_sets", "tenant", "what")

    def __init__(
        self, tenant: str, what: str, column: str, param_sets: list[Mapping[str, Any]]
    ) -> None:
        self.tenant, self.what, self.column, self.param_sets = tenant, what, column, param_sets

    def bound(self, bind: BindParameter[Any]) -> None:
        """Refuse a parameter whose value (in any row) is not the tenant."""
        given = [params[bind.key] for params in self.param_sets if bind.key in params]
        for item in given or [bind.effective_value]:
            if item != self.tenant:
                raise cross_tenant(self.tenant, item, self.what)

    def value(self, value: Any) -> None:
        """Refuse a tenant value written that is not the tenant (or cannot be verified)."""
        while isinstance(value, Label):
            value = value.element
        if isinstance(value, BindParameter):
            self.bound(value)
        elif isinstance(value, ClauseElement):
            if isinstance(value, ColumnClause) and value.name == self.column:
                source = value.table
                if source is not None and tenant_column(source, self.column) is not None:
                    return  # the tenant column of a tenant table: scoped to the tenant
            self.refuse(f"a SQL expression as their tenant ({value})")
        elif value != self.tenant:
            raise cross_tenant(self.tenant, value, self.what)

    def refuse(self, why: str) -> NoReturn:
        """Refuse a write whose tenant cannot be verified."""
        raise _refused(self.tenant, self.what, why, self.column)


def _refuse_replace(statement: Any, check: _Check) -> None:
    for prefix, _dialect in getattr(statement, "_prefixes", ()) or ():
        if "replace" in str(prefix).lower():
            raise CrossTenantWrite(
                f"a session of tenant {check.tenant!r} cannot run {str(prefix).upper()} on "
                f"{check.what}: it deletes every row it conflicts with, whoever's it is; use "
                "an upsert (insert(...).on_conflict_do_update(...)) instead",
                tenant_id=check.tenant,
            )


def _written(statement: Any, check: _Check, key: str) -> Iterator[Any]:
    """The tenant values (*key* is the tenant column's key) a statement writes."""
    own = getattr(statement, "_values", None) or {}
    yield from (v for k, v in own.items() if _key(k) == key)
    position = _position(statement.table, check.column)
    for rows in getattr(statement, "_multi_values", ()) or ():
        for row in rows:
            if isinstance(row, Mapping):
                yield from (v for k, v in row.items() if _key(k) == key)
            elif position is not None and len(row) > position:
                yield row[position]
    for params in check.param_sets:
        if key in params:
            yield params[key]
    conflict = getattr(
        getattr(statement, "_post_values_clause", None), "update_values_to_set", None
    )
    if isinstance(conflict, Mapping):  # INSERT ... ON CONFLICT DO UPDATE SET
        yield from (v for k, v in conflict.items() if _key(k) == key)


def _source_columns(source: Any, index: int, check: _Check) -> Iterator[Any]:
    """The tenant column of each SELECT of an INSERT's FROM SELECT source."""
    if isinstance(source, CompoundSelect):
        for select in source.selects:
            yield from _source_columns(select, index, check)
    elif isinstance(source, Select):
        columns = list(source.selected_columns)
        if index >= len(columns):
            check.refuse("a FROM SELECT with fewer columns than names")
        yield columns[index]
    else:
        kind = "text()" if isinstance(source, TextualSelect) else type(source).__name__
        check.refuse(f"a {kind} FROM SELECT source")


def _position(table: Any, column: str) -> int | None:
    """The index of the tenant column among *table*'s columns (positional VALUES rows)."""
    for index, found in enumerate(getattr(table, "c", ())):
        if found.name == column:
            return index
    return None


def _tenant_binds(criterion: Any, column: str) -> Iterator[BindParameter[Any]]:
    """The parameters compared with ``=`` to the tenant column in AND-ed criteria."""
    if isinstance(criterion, BooleanClauseList) and criterion.operator is operators.and_:
        for clause in criterion.clauses:
            yield from _tenant_binds(clause, column)
    elif isinstance(criterion, BinaryExpression) and criterion.operator is operators.eq:
        for left, other in (
            (criterion.left, criterion.right),
            (criterion.right, criterion.left),
        ):
            if getattr(left, "name", None) == column and isinstance(other, BindParameter):
                yield other


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(getattr(key, "key", key))


def _param_sets(parameters: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(parameters, Mapping):
        return [parameters]
    if isinstance(parameters, list | tuple):
        return [p for p in parameters if isinstance(p, Mapping)]
    return []
