"""Tenant scoping of sessions and connections: fail closed, three layers deep.

1. Criteria: every ORM SELECT, UPDATE and DELETE of a :class:`TenantScoped` model
   (relationship loads, joins, ``Session.get`` included) gets
   ``tenant_id = <session tenant>`` through ``with_loader_criteria``; and every Core
   statement on a tenant table (a table with the tenant column, ``tenant_column`` in
   the settings) sent through a routed session or connection gets the same criteria
   when it is compiled (:mod:`tenantry.router.compiler`). Not scoped here: raw SQL
   (``text()``, ``exec_driver_sql``), and statements run on ``router.engine_for(t)``
   directly, which are not routed.
2. Writes: at flush, new objects are stamped with the session's tenant and an object
   carrying another tenant's id raises :class:`CrossTenantWrite`; an INSERT or
   UPDATE whose tenant value is not the session's tenant as a bound value, or that
   names another tenant's id in its WHERE clause, raises it too
   (:mod:`tenantry.router.writes`).
3. PostgreSQL shards: row-level security admits only the tenant the fence of the
   transaction signed (``tenantry.tenant()``), whatever SQL the application sends,
   raw ``text()`` included, and refuses writes unless the tenant is active there.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Column, Connection, Engine, Select, String, Table, bindparam, event
from sqlalchemy.orm import (
    LoaderCriteriaOption,
    Mapped,
    ORMExecuteState,
    Session,
    UOWTransaction,
    mapped_column,
    with_loader_criteria,
)

from tenantry.router.compiler import (
    scope_parameters,
    scopes_by,
    scoping_compiler,
    with_tenant,
)
from tenantry.router.fence import FROZEN_KEY, TENANT_KEY, frozen_error, reset_connection, run_fence
from tenantry.router.writes import DEFAULT_COLUMN, check_statement, cross_tenant

__all__ = [
    "SESSION_SCOPE",
    "SESSION_SHARD",
    "TenantScope",
    "TenantScoped",
    "TenantSession",
    "configure_engine",
    "tenant_criteria",
]

#: Keys in a routed ``Session.info``, besides :data:`~tenantry.router.fence.TENANT_KEY`
#: (its tenant) and ``FROZEN_KEY``: the shard's name, and the router's TenantScope.
SESSION_SHARD = "tenantry.shard"
SESSION_SCOPE = "tenantry.scope"


class TenantScoped:
    """Declarative mixin for tenant tables: a ``tenant_id`` column leading the primary key.

    ::

        class Charger(TenantScoped, Base):
            __tablename__ = "chargers"
            id: Mapped[int] = mapped_column(primary_key=True)

    With another ``tenant_column`` setting, keep the attribute and name the column:
    ``tenant_id: Mapped[str] = mapped_column("org_id", String(63), primary_key=True)``.
    """

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True, sort_order=-1000)


class TenantSession(Session):
    """A Session bound to one tenant; made by the router, scoped by its events."""

    @property
    def tenant_id(self) -> str:
        """The tenant this session serves."""
        tenant: str = self.info[TENANT_KEY]
        return tenant

    @property
    def frozen(self) -> bool:
        """Whether the tenant was frozen (read-only) when the transaction began."""
        return bool(self.info.get(FROZEN_KEY))


def tenant_criteria(tenant_id: str) -> LoaderCriteriaOption:
    """The ORM option that limits every TenantScoped entity to *tenant_id*.

    Immutable, so routers build it once per tenant and reuse it (:class:`TenantScope`).
    """
    return with_loader_criteria(
        TenantScoped, lambda cls: cls.tenant_id == tenant_id, include_aliases=True
    )


class TenantScope:
    """How one router scopes its sessions and connections: the tenant column, and each
    tenant's ORM criteria, built when a statement first needs them and kept (at most
    *size* tenants', the oldest dropped first).

    Most statements use one criteria object for every tenant (the tenant a bound
    parameter); only INSERT ... SELECT and executemany, whose parameters are the rows,
    need a tenant's own. Building one costs as much as a query: tenants repeat.
    """

    __slots__ = ("_criteria", "_lock", "_size", "column")

    def __init__(self, column: str = DEFAULT_COLUMN, *, size: int = 4096) -> None:
        self.column = column
        self._size = size
        self._criteria: OrderedDict[str, LoaderCriteriaOption] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TenantScope(column={self.column!r})"

    def criteria(self, tenant_id: str) -> LoaderCriteriaOption:
        """The ORM criteria of *tenant_id* (see :func:`tenant_criteria`)."""
        found = self._criteria.get(tenant_id)
        if found is None:
            found = tenant_criteria(tenant_id)
            with self._lock:
                self._criteria[tenant_id] = found
                while len(self._criteria) > self._size:
                    self._criteria.popitem(last=False)
        return found


_SHARED_CRITERIA = with_loader_criteria(
    TenantScoped,
    # A literal name (compiler.TENANT_PARAM): lambda tracking would wrap a global.
    lambda cls: cls.tenant_id == bindparam("tenantry_scope_tenant"),
    include_aliases=True,
)


#: Each ORM statement with :data:`_SHARED_CRITERIA` added, by the statement it was made
#: from (weak keys: an entry lives as long as the application's statement). Adding the
#: option makes a new statement, whose cache key SQLAlchemy computes again (it memoizes
#: the key per statement object): a statement the application executes again (a module
#: constant, say) reuses its scoped copy, key included.
#:
#: Why this can never let another tenant's criteria through: the value depends on the
#: original statement alone. :data:`_SHARED_CRITERIA` is one object for every tenant,
#: with no tenant in it: the tenant is the bound parameter ``tenantry_scope_tenant``,
#: which each execution passes with its own parameters (``with_tenant``, and the
#: router's Connection, ``_RoutedConnection``). Statements are immutable (every change makes a new
#: one), and keys are compared by identity only (the types below do not overload
#: ``==``). The per-tenant criteria (INSERT ... SELECT, executemany) are never cached.
_SCOPED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_IDENTITY_EQ: Any = object.__eq__


def _with_shared_criteria(statement: Any) -> Any:
    """*statement* with the shared criteria, made once per statement object."""
    if type(statement).__eq__ is not _IDENTITY_EQ:
        return statement.options(_SHARED_CRITERIA)
    scoped = _SCOPED.get(statement)
    if scoped is None:
        scoped = statement.options(_SHARED_CRITERIA)
        with contextlib.suppress(TypeError):  # not weakly referenceable: not cached
            _SCOPED[statement] = scoped
    return scoped


def _compiler_scopes(state: ORMExecuteState, column: str, options: Any) -> bool:
    """Whether the engine's statement compiler alone scopes this ORM statement as the
    shared criteria would, so that it need not be copied with them (that copy, its cache
    key and SQLAlchemy's second pass over it cost about as much as the rest of the
    statement's Python work).

    Only the plainest statement: a top-level ``select(Model)`` of one
    :class:`TenantScoped` model (not an alias, no joins, no extra FROMs, no loader
    options, not a relationship load) whose mapper is one plain table with the tenant
    column named as the router's setting and no eager relationships (:func:`_plain`),
    on an engine whose compiler is the router's, scoping that column. Its SQL is
    ``SELECT ... FROM <table> WHERE ...``; the compiler adds ``<table>.<tenant column> =
    :tenantry_scope_tenant`` to that WHERE clause, as the criteria would, and to every
    SELECT nested in it (subqueries of other tables too). The tenant is the same bound
    parameter either way, passed with every execution; anything else gets the criteria.
    """
    statement = state.statement
    if (
        type(statement) is not Select
        or statement._with_options
        or statement._setup_joins
        or statement._from_obj
        or len(statement._raw_columns) != 1
        or state.is_relationship_load
    ):
        return False
    mapper = state.bind_mapper
    if mapper is None or statement._raw_columns[0]._annotations.get("parententity") is not mapper:
        return False  # an alias, a column, a function: the criteria
    if not _plain(mapper, column):
        return False
    return scopes_by(state.session.get_bind(mapper=mapper).dialect.statement_compiler, column)


#: mapper -> (its properties and subclasses when checked, column, whether plain). A plain
#: dict: a weakly keyed one makes a weak reference at every lookup; mappers live as long
#: as the application's models.
_PLAIN: dict[Any, tuple[int, int, str, bool]] = {}
_EAGER_SAFE = frozenset(
    {"select", True, "raise", "raise_on_sql", "noload", "write_only", "dynamic"}
)


def _plain(mapper: Any, column: str) -> bool:
    """A TenantScoped mapper of one table, no inheritance, every attribute a column of
    that table, the tenant attribute the column *column*, no relationship loaded eagerly
    (which would join or load other tables as part of the statement)."""
    shape = (len(mapper._props), len(mapper._inheriting_mappers))
    known = _PLAIN.get(mapper)
    if known is not None and known[:3] == (*shape, column):
        return known[3]
    table = mapper.local_table
    plain = (
        issubclass(mapper.class_, TenantScoped)
        and isinstance(table, Table)
        and mapper.inherits is None
        and not mapper._inheriting_mappers
        and mapper.polymorphic_on is None
        and mapper.columns["tenant_id"].name == column
        and mapper.columns["tenant_id"].table is table
        and all(
            isinstance(c, Column) and c.table is table
            for prop in mapper.column_attrs
            for c in prop.columns
        )
        and all(rel.lazy in _EAGER_SAFE for rel in mapper.relationships)
    )
    _PLAIN[mapper] = (*shape, column, plain)
    return plain


def _scope_of(session: Session) -> TenantScope:
    scope: TenantScope | None = session.info.get(SESSION_SCOPE)
    if scope is None:  # a TenantSession not made by a router: the default column
        scope = session.info[SESSION_SCOPE] = TenantScope()
    return scope


@event.listens_for(TenantSession, "after_begin")
def _fence(session: Session, _transaction: Any, connection: Any) -> None:
    # Every transaction of the session, the first (begun by the router) and any after
    # a commit or rollback, begins with the fence.
    tenant = session.info.get(TENANT_KEY)
    if tenant is None:
        return
    state = run_fence(connection, tenant, session.info.get(SESSION_SHARD, "?"))
    session.info[FROZEN_KEY] = state.value == "frozen"


@event.listens_for(TenantSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    session = state.session
    tenant = session.info.get(TENANT_KEY)
    if tenant is None:
        return
    statement = state.statement
    # What ORMExecuteState's is_insert, is_update, is_delete, is_select say, each read
    # once (every property reads the statement again).
    if statement.is_dml:
        is_insert, is_update, is_delete = (
            statement.is_insert,
            statement.is_update,
            statement.is_delete,
        )
    elif not statement.is_select:
        return  # text(), a function...: nothing to scope here (the shard's policies do)
    else:
        is_insert = is_update = is_delete = False
    # An ORM SELECT's compile options (None otherwise): is_column_load and
    # is_relationship_load read them, each up to twice.
    options = state._orm_compile_options()
    scope = _scope_of(session)
    if is_insert or is_update or is_delete:
        check_statement(statement, state.parameters, tenant, scope.column)
    from_select = is_insert and getattr(statement, "select", None) is not None
    if statement.is_select or is_update or is_delete or from_select:
        # Propagates to lazy and eager relationship loads of the objects loaded here.
        params = state.parameters
        if not is_insert and (params is None or isinstance(params, Mapping)):
            # One criteria object for every tenant, the tenant a bound parameter: far
            # less work per statement than a criteria per tenant. A load that misses the
            # parameter fails ("a value is required"), never widens.
            state.parameters = with_tenant(params or {}, tenant)
            if not _compiler_scopes(state, scope.column, options):
                state.statement = _with_shared_criteria(statement)
        else:  # INSERT, executemany: the parameters are the rows, leave them alone
            state.statement = statement.options(scope.criteria(tenant))
    if options is not None and options._for_refresh_state:  # is_column_load
        # SQLAlchemy leaves loader criteria out of refreshes and expired-attribute loads:
        # an object with another tenant's key, attached to this session, must not load.
        mapper = state.bind_mapper
        if mapper is not None and issubclass(mapper.class_, TenantScoped):
            refresh: Any = state.statement  # a Select of the mapper
            # By attribute: TenantScoped.tenant_id, whatever its column's name.
            state.statement = refresh.where(mapper.columns["tenant_id"] == tenant)


@event.listens_for(TenantSession, "before_flush")
def _stamp(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    tenant = session.info.get(TENANT_KEY)
    if tenant is None:
        return
    if session.info.get(FROZEN_KEY) and (session.new or session.dirty or session.deleted):
        raise frozen_error(tenant, session.info.get(SESSION_SHARD))
    for obj in session.new:
        if isinstance(obj, TenantScoped):
            if obj.tenant_id is None:
                obj.tenant_id = tenant
            elif obj.tenant_id != tenant:
                raise cross_tenant(tenant, obj.tenant_id, type(obj).__name__)
    for obj in (*session.dirty, *session.deleted):
        if isinstance(obj, TenantScoped) and obj.tenant_id != tenant:
            raise cross_tenant(tenant, obj.tenant_id, type(obj).__name__)


class _RoutedConnection(Connection):
    """The Connection of a router's engines: every ClauseElement a routed transaction
    executes (ORM statements too) gets the tenant as the parameter
    ``tenantry_scope_tenant``, and an INSERT, UPDATE or DELETE is checked first
    (:func:`~tenantry.router.compiler.scope_parameters`).

    A ``before_execute`` listener would do the same, but any listener of the engine's
    connection events makes SQLAlchemy dispatch every such event of every transaction
    (engine_connect, begin, before and after execute, before and after cursor execute,
    commit, rollback) through a dispatcher joined per connection: about 50 Python calls
    per one-statement transaction, for one listener. This overrides
    ``Connection._execute_clauseelement``, where SQLAlchemy 2.1 invokes
    ``before_execute`` for a ClauseElement (DDL and ``exec_driver_sql`` never get the
    tenant; compiled objects neither, as before): ``tests/router/test_core_scoping.py``
    is the check to run after upgrading SQLAlchemy.
    """

    #: The tenant column's name (the router's ``settings.tenant_column``).
    tenant_column = DEFAULT_COLUMN

    def _execute_clauseelement(
        self, elem: Any, distilled_parameters: Any, execution_options: Any
    ) -> Any:
        tenant = self.info.get(TENANT_KEY)
        if tenant is not None:
            if len(distilled_parameters) == 1:
                multiparams, params = [], distilled_parameters[0]
            else:
                multiparams, params = distilled_parameters, {}
            multiparams, params = scope_parameters(
                elem, multiparams, params, tenant, self.tenant_column
            )
            distilled_parameters = list(multiparams) if multiparams else [params]
        return super()._execute_clauseelement(elem, distilled_parameters, execution_options)


_CONNECTIONS: dict[str, type[_RoutedConnection]] = {DEFAULT_COLUMN: _RoutedConnection}


def _routed_connection(column: str) -> type[_RoutedConnection]:
    """:class:`_RoutedConnection` scoping by the tenant column *column*."""
    found = _CONNECTIONS.get(column)
    if found is None:
        found = _CONNECTIONS[column] = type(
            "_RoutedConnection", (_RoutedConnection,), {"tenant_column": column}
        )
    return found


def configure_engine(engine: Engine, column: str = DEFAULT_COLUMN) -> None:
    """Install tenantry's per-connection events on an engine the router made, scoping
    Core statements by the tenant column *column*."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            reset_connection(dbapi_connection, record.info)

    dialect = engine.dialect
    dialect.statement_compiler = scoping_compiler(dialect.statement_compiler, column)
    # Not a before_execute listener: see _RoutedConnection. (handle_error is a dialect
    # event: it costs nothing until a statement fails.)
    engine._connection_cls = _routed_connection(column)
    event.listen(engine, "handle_error", _frozen)


def _frozen(context: Any) -> None:
    """A write refused because the tenant is frozen (or not active) as TenantFrozen."""
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
