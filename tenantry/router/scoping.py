"""Tenant scoping of sessions and connections: fail closed, three layers deep.

1. ORM criteria: every ORM SELECT, UPDATE and DELETE of a :class:`TenantScoped`
   model (relationship loads, joins, ``Session.get`` included) gets
   ``tenant_id = <session tenant>`` through ``with_loader_criteria``.
2. Writes: at flush, new objects are stamped with the session's tenant and an object
   carrying another tenant's id raises :class:`CrossTenantWrite`; ``insert()``,
   ``update()`` and ``delete()`` statements naming another tenant's id raise it too.
3. PostgreSQL shared shards: row-level security on ``tenantry.tenant_id``, set by the
   fence of every transaction, stops raw ``text()`` SQL as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, String, bindparam, event
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
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    Label,
)

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
            state.parameters = {**(params or {}), _TENANT_PARAM: tenant}
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


def _has_tenant_column(statement: Any) -> bool:
    table = getattr(statement, "table", None)
    columns = getattr(table, "c", None)
    return columns is not None and _TENANT_COLUMN in columns


def check_statement(statement: Any, parameters: Any, tenant: str) -> None:
    """Raise CrossTenantWrite if an INSERT, UPDATE or DELETE names another tenant's id.

    Looked at: the values written, an INSERT's FROM SELECT, and ``tenant_id = ...``
    in an UPDATE's or DELETE's WHERE (how executemany by primary key names rows).
    """
    if not isinstance(statement, Insert | Update | Delete) or not _has_tenant_column(statement):
        return
    param_sets = list(_param_sets(parameters))
    values: list[Any] = []
    own = getattr(statement, "_values", None) or {}
    values.extend(v for k, v in own.items() if _key(k) == _TENANT_COLUMN)
    for rows in getattr(statement, "_multi_values", ()) or ():
        for row in rows:
            if isinstance(row, Mapping):
                values.extend(v for k, v in row.items() if _key(k) == _TENANT_COLUMN)
    for params in param_sets:
        if _TENANT_COLUMN in params:
            values.append(params[_TENANT_COLUMN])
    source = statement.select if isinstance(statement, Insert) else None
    if source is not None:
        names = [_key(name) for name in getattr(statement, "_select_names", None) or ()]
        if _TENANT_COLUMN in names:
            column = list(source.selected_columns)[names.index(_TENANT_COLUMN)]
            values.append(column.element if isinstance(column, Label) else column)
    if isinstance(statement, Update | Delete):
        for criterion in statement._where_criteria:
            for bind in _tenant_binds(criterion):
                given = [params[bind.key] for params in param_sets if bind.key in params]
                values.extend(given or [bind])
    for value in values:
        if isinstance(value, BindParameter):
            value = value.effective_value
        elif isinstance(value, ClauseElement):
            continue  # a SQL expression: row-level security checks it on PostgreSQL
        if value != tenant:
            raise _cross(tenant, value, str(getattr(statement.table, "name", "")))


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


def configure_engine(engine: Engine) -> None:
    """Install tenantry's per-connection events on an engine the router made."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            reset_connection(dbapi_connection, record.info)

    @event.listens_for(engine, "before_execute")
    def _check_core(
        conn: Any, clauseelement: Any, multiparams: Any, params: Any, _options: Any
    ) -> None:
        tenant = conn.info.get(TENANT_KEY)
        if tenant is not None and isinstance(clauseelement, Insert | Update | Delete):
            check_statement(clauseelement, [*multiparams, params], tenant)

    @event.listens_for(engine, "handle_error")
    def _frozen(context: Any) -> None:
        conn = context.connection
        if conn is None or not conn.info.get(FROZEN_KEY):
            return
        orig = context.original_exception
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate == "25006" or "readonly database" in str(orig):
            tenant = conn.info.get(TENANT_KEY, "?")
            raise frozen_error(tenant, None) from orig
