"""The residency fence: the first statement of every routed transaction.

On PostgreSQL one statement, ``SELECT tenantry.fence(tenant, signature)``, hands the
shard the tenant with the router's signature of (tenant, this server connection's
backend pid), under the shard's fence key. The shard's fence function verifies it,
sets the tenant for row-level security, reads the tenant's residency row, and — when
the tenant is frozen by a move — makes the transaction read-only. The policies admit a
row only while that signature verifies, so no other statement of the transaction can
change which tenant it acts for
(``tenantry/shardmap/alembic_shard/versions/0004_fence.py``; its body now
``0006_fence_cost.py``'s). In a dedicated database holding one tenant the shard's
tenant is a constant instead (``0007_dedicated_constant.py``): the same call, and the
fence there only refuses another tenant (a stale route) and reads the residency.
No row lock: the mover waits out older transactions instead (DESIGN.md, "hot-path
facts").

On SQLite the fence reads the residency row and sets ``PRAGMA query_only`` for a
frozen tenant; SQLite has no row-level security.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq, sql
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import await_only

from tenantry.errors import (
    ConfigurationError,
    FenceRejected,
    ShardUnavailable,
    StaleRoute,
    TenantFrozen,
)
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.keys import FenceKey
from tenantry.shardmap.residency import Residency

__all__ = [
    "FROZEN_KEY",
    "PG_FENCE",
    "SQLITE_FENCE",
    "TENANT_KEY",
    "ConnectionLost",
    "frozen_error",
    "register_keys",
    "reset_connection",
    "rollback_keeping_prepared",
    "rollback_keeping_prepared_async",
    "run_fence",
]

#: Keys in ``Connection.info`` (the DBAPI connection's): the tenant of the current
#: routed transaction, and whether it is frozen. Cleared when the connection is
#: returned to the pool. The same keys hold a routed Session's tenant and state in
#: ``Session.info``, and the tenant in a WSGI environ. (The shard's fence function sets
#: the PostgreSQL setting of the same name, ``tenantry.tenant_id``: shard revision s0004.)
TENANT_KEY = "tenantry.tenant_id"
FROZEN_KEY = "tenantry.frozen"
_QUERY_ONLY_KEY = "tenantry.sqlite_query_only"
_SIGNATURE_KEY = "tenantry.signature"

#: The shard's fence function (schema-qualified: the routing role's search_path
#: cannot put another function of that name in its way).
PG_FENCE = "SELECT tenantry.fence(%(t)s, %(s)s)"
SQLITE_FENCE = "SELECT state FROM tenantry_residency WHERE tenant_id = ?"

#: SQLSTATE of a signature the shard does not accept (invalid_authorization_specification).
_REJECTED = "28000"
_UNDEFINED_FUNCTION = "42883"
#: SQLSTATE of a connection without a stamp in a read-only transaction (shard revision
#: s0007): opened while its dedicated database's tenant was a constant.
_NO_STAMP = "TY001"

#: For each routed engine: a function giving the shard's fence key (``reload=True``
#: reads it again from the catalog, after a rotation).
KeySource = Callable[[bool], FenceKey]
#: For each routed engine: its shard, its key source, whether a sync psycopg
#: connection sends BEGIN and the fence in one pipeline (``fence_with_begin``), and
#: whether the shard is reached through a pooler (the fence signed per transaction).
_KEYS: weakref.WeakKeyDictionary[Engine, tuple[str, KeySource, bool, bool]] = (
    weakref.WeakKeyDictionary()
)


class ConnectionLost(ShardUnavailable):
    """The pooled connection a routed transaction began on was dead at its fence.

    The server restarted, the backend was terminated, a failover or an idle timeout cut
    it. The fence is the transaction's first statement, so nothing of the transaction
    ran. The connection is invalidated, and so is every connection of its pool made
    before it (replaced, without a round trip, when next checked out): the router begins
    the transaction again, once, on a fresh connection. Raised to the caller only when
    that one fails the same way.
    """


def register_keys(
    engine: Engine, shard: str, keys: KeySource, *, with_begin: bool = False, pooled: bool = False
) -> None:
    """Say where the fence of *engine* (a shard's routed engine) gets its key, whether
    it goes in one pipeline with BEGIN (see :func:`_fence_with_begin`), and whether the
    shard is routed through a pooler (see :func:`_fence_pooled`)."""
    _KEYS[engine] = (shard, keys, with_begin, pooled)


def run_fence(conn: Connection, tenant_id: str, shard: str) -> Residency:
    """Run the fence for *tenant_id* as the transaction's first statement.

    Return the residency state (``active`` or ``frozen``); raise StaleRoute when the
    tenant does not live on this shard (no row, ``moved`` or ``incoming``), and
    FenceRejected when the shard does not accept the signature (its key was rotated:
    the key is read again, and the caller retries in a new transaction).
    """
    info = conn.info
    if conn.dialect.name == "postgresql":
        value = _fence_postgresql(conn, tenant_id, shard)
    else:
        value = _fence_sqlite(conn, tenant_id)
    # A dict, not Residency(value): the enum's lookup costs a microsecond per transaction.
    state = (_STATES.get(value) or Residency(value)) if value is not None else None
    if state is None or state in _NOT_HERE:
        info.pop(TENANT_KEY, None)
        raise StaleRoute(
            f"tenant {tenant_id!r} does not live on shard {shard!r} "
            f"(residency: {state.value if state else 'none'}); the map was out of date",
            tenant_id=tenant_id,
            shard=shard,
        )
    info[TENANT_KEY] = tenant_id
    info[FROZEN_KEY] = state is Residency.FROZEN
    return state


_STATES = {state.value: state for state in Residency}
_NOT_HERE = (Residency.MOVED, Residency.INCOMING)


def _fence_postgresql(conn: Connection, tenant_id: str, shard: str) -> str | None:
    registered = _KEYS.get(conn.engine)
    if registered is None:
        raise ConfigurationError(
            f"shard {shard!r}: this engine was not made by a router, so it has no fence key"
        )
    _name, keys, with_begin, pooled = registered
    driver: Any = conn.connection.driver_connection
    if pooled:
        try:
            return _fence_pooled(conn, driver, tenant_id, keys(False))
        except Exception as exc:
            _fence_failed(conn, exc, driver, tenant_id, shard, keys)
    info = conn.info
    # The signature depends only on the tenant and the server connection: keep the
    # last one per pooled connection (one HMAC saved on most transactions), with the
    # fence's parameters it makes (encoded once).
    cached = info.get(_SIGNATURE_KEY)
    key = keys(False)
    if cached is None or cached[0] != tenant_id or cached[1] != key.key_id:
        signature = key.sign(tenant_id, _backend_pid(driver))
        cached = info[_SIGNATURE_KEY] = (tenant_id, key.key_id, signature, None)
    try:
        if with_begin and _idle(driver):
            if conn.dialect.is_async:
                return _fence_with_begin_async(driver, info, cached)
            return _fence_with_begin(driver, info, cached)
        # Straight to psycopg: none of SQLAlchemy's per-statement work. Never prepared
        # (prepare=False: an unnamed statement each time): SQL on the connection could
        # put a statement of its own under a prepared statement's name and be handed
        # the signature (see _fence_with_begin).
        params = {"t": tenant_id, "s": cached[2]}
        if conn.dialect.is_async:
            cursor = await_only(driver.execute(PG_FENCE, params, prepare=False))
            row = await_only(cursor.fetchone())
        else:
            row = driver.execute(PG_FENCE, params, prepare=False).fetchone()
    except Exception as exc:
        _fence_failed(conn, exc, driver, tenant_id, shard, keys)
    value: str | None = row[0] if row is not None else None
    return value


def _fence_failed(
    conn: Connection, exc: Exception, driver: Any, tenant_id: str, shard: str, keys: KeySource
) -> NoReturn:
    """Raise what a failed fence means: ConnectionLost (dead connection, or one without
    a stamp in a read-only transaction), FenceRejected
    (a signature the shard does not accept), or *exc* itself."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if _connection_dead(exc, driver):
        _invalidate(conn, orig if orig is not None else exc)
        raise ConnectionLost(
            f"shard {shard!r}: the pooled connection was lost before the transaction "
            f"began ({describe_error(exc)}); nothing of it ran: retry",
            shard=shard,
        ) from None
    state = getattr(orig, "sqlstate", None)
    if state == _NO_STAMP:
        # Its dedicated database's tenant is no longer a constant (a second tenant, a
        # demote): every connection opened before has no stamp, and a read-only
        # transaction cannot make one. A fresh connection makes it when it opens.
        _invalidate(conn, orig if orig is not None else exc)
        raise ConnectionLost(
            f"shard {shard!r}: the pooled connection has no fence stamp (the shard's "
            "tenant was a constant when it opened); nothing of the transaction ran: retry",
            shard=shard,
        ) from None
    if state == _UNDEFINED_FUNCTION and "fence_pooled" in str(orig):
        raise ConfigurationError(
            f"shard {shard!r} is routed through a pooler, but its database predates the "
            "pooled fence (shard revision s0005): run `tenantry migrate upgrade`"
        ) from None
    if state != _REJECTED:
        raise exc
    conn.info.pop(_SIGNATURE_KEY, None)
    keys(True)
    raise FenceRejected(
        f"shard {shard!r} did not accept the fence signature for tenant {tenant_id!r} "
        "(its fence key was rotated?); the key was read again from the catalog: retry",
        tenant_id=tenant_id,
        shard=shard,
    ) from None


_IDLE = pq.TransactionStatus.IDLE
_INERROR = pq.TransactionStatus.INERROR
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK


def _idle(driver: Any) -> bool:
    """Whether psycopg would send BEGIN before the next statement on *driver*."""
    return bool(driver.pgconn.transaction_status == _IDLE and not driver.autocommit)


#: BEGIN as psycopg sends it (``_get_tx_start_command``), by (isolation level, read
#: only, deferrable): a handful of values.
_BEGINS: dict[tuple[Any, Any, Any], bytes] = {}


def _begin_command(driver: Any) -> bytes:
    """The BEGIN psycopg would send to start a transaction on *driver*."""
    options = (driver.isolation_level, driver.read_only, driver.deferrable)
    command = _BEGINS.get(options)
    if command is None:
        isolation, read_only, deferrable = options
        parts = [b"BEGIN"]
        if isolation is not None:
            level = psycopg.IsolationLevel(isolation).name.replace("_", " ")
            parts += [b"ISOLATION LEVEL", level.encode()]
        if read_only is not None:
            parts.append(b"READ ONLY" if read_only else b"READ WRITE")
        if deferrable is not None:
            parts.append(b"DEFERRABLE" if deferrable else b"NOT DEFERRABLE")
        command = _BEGINS[options] = b" ".join(parts)
    return command


#: The fence as one extended-protocol statement: its tenant and signature travel as
#: bound parameters, never in the SQL text (see :func:`_fence_with_begin`).
_FENCE_SQL = b"SELECT tenantry.fence($1, $2)"
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_PIPELINE_OFF = pq.PipelineStatus.OFF


def _fence_with_begin(driver: Any, info: dict[str, Any], cached: tuple[Any, ...]) -> str | None:
    """BEGIN and the fence in one round trip, the fence's values as bound parameters.

    psycopg would send its BEGIN in a message of its own before the fence. Here both
    go in one pipeline (libpq's pipeline mode, one sync): the same BEGIN (the
    connection's isolation level, read only, deferrable), then the fence as an unnamed
    statement whose tenant and signature are bound parameters. Never as SQL text: the
    routing role sees the query text of its other sessions in ``pg_stat_activity``
    (a transaction idle after its fence shows the fence), and a signature read there
    (a tenant, this server connection) would admit that tenant to whatever SQL later
    runs on this pooled connection. Never a named statement either: SQL on the
    connection could put a statement of its own under that name and be handed the
    signature. An error comes back as the psycopg exception its SQLSTATE names; the
    transaction is then failed (or the connection dead), and the caller's rollback
    ends it.
    """
    return _fence_in_pipeline(driver, info, cached, _as_is)


def _fence_with_begin_async(
    driver: Any, info: dict[str, Any], cached: tuple[Any, ...]
) -> str | None:
    """:func:`_fence_with_begin` on an asyncio psycopg connection (inside SQLAlchemy's
    ``run_sync`` greenlet): the same pipeline, sent without blocking the event loop.

    psycopg's own machinery does the waiting, as on a sync connection: its ``send``
    and ``fetch_many`` generators under the connection's ``wait``, here awaited from
    the greenlet as SQLAlchemy awaits its driver (``await_only``).
    """
    return _fence_in_pipeline(driver, info, cached, await_only)


def _as_is(value: Any) -> Any:
    return value


def _fence_in_pipeline(
    driver: Any, info: dict[str, Any], cached: tuple[Any, ...], finish: Callable[[Any], Any]
) -> str | None:
    """The fence with BEGIN, sync or asyncio: what psycopg's ``wait`` returns is the
    results on a sync connection, and an awaitable (*finish*: ``await_only``) on an
    asyncio one. psycopg's wait, not libpq's blocking calls: ``PQgetResult`` would wait
    for the server holding the GIL, stalling every other thread of the process."""
    pgconn = driver.pgconn
    _send_fence(driver, pgconn, info, cached)
    try:
        begin, value = finish(driver.wait(_pipeline_results(pgconn)))
    finally:
        _leave_pipeline(pgconn)
    return _fence_results(driver, begin, value)


def _send_fence(driver: Any, pgconn: Any, info: dict[str, Any], cached: tuple[Any, ...]) -> None:
    """Queue BEGIN, the fence and a sync in pipeline mode."""
    params = cached[3]
    if params is None:  # encoded once per pooled connection and tenant
        tenant_id, key_id, signature, _ = cached
        encoding = driver.info.encoding
        params = [tenant_id.encode(encoding), signature.encode(encoding)]
        info[_SIGNATURE_KEY] = (tenant_id, key_id, signature, params)
    pgconn.enter_pipeline_mode()
    try:
        pgconn.send_query_params(_begin_command(driver), None)
        pgconn.send_query_params(_FENCE_SQL, params)
        pgconn.pipeline_sync()
    except BaseException:
        _leave_pipeline(pgconn)
        raise


def _pipeline_results(pgconn: Any) -> Any:
    """psycopg generator: flush the pipeline, then BEGIN's and the fence's results
    (the sync's read too)."""
    yield from generators.send(pgconn)
    begin = yield from generators.fetch_many(pgconn)
    value = yield from generators.fetch_many(pgconn)
    sync = yield from generators.fetch_many(pgconn)
    if not begin or not value or not sync or sync[0].status != _PIPELINE_SYNC:
        raise psycopg.OperationalError("the server sent no result for the fence")
    return begin[0], value[0]


def _leave_pipeline(pgconn: Any) -> None:
    """Leave pipeline mode. A connection that cannot (it broke, or results of the
    pipeline are left unread after an error) is closed: the caller sees a dead
    connection, invalidates it and begins the transaction again on a fresh one, as
    after any connection lost at the fence."""
    if pgconn.pipeline_status == _PIPELINE_OFF:
        return
    try:
        pgconn.exit_pipeline_mode()
    except Exception:
        pgconn.finish()


def _fence_results(driver: Any, begin: Any, value: Any) -> str | None:
    """The residency the fence answered, or raise the first error (a failed BEGIN
    leaves the fence's result aborted, so BEGIN's error is the one)."""
    if begin.status != _COMMAND_OK:
        raise _result_error(driver, begin)
    return _fence_value(driver, value)


def _fence_value(driver: Any, result: Any) -> str | None:
    """The residency the fence's result holds, or raise its error."""
    if result.status != _TUPLES_OK:
        raise _result_error(driver, result)
    value = result.get_value(0, 0) if result.ntuples else None
    return value.decode() if value is not None else None


_NONCE = b"SELECT tenantry.fence_nonce()"
_POOLED_CALL = b"SELECT tenantry.fence_pooled("


def _fence_pooled(conn: Connection, driver: Any, tenant_id: str, key: FenceKey) -> str | None:
    """The fence on a shard routed through a pooler in transaction mode.

    The server connection is the pooler's choice for this one transaction, and the pid
    psycopg was told at connect is the pooler's: so first ask the server for its pid and
    the transaction's start (``tenantry.fence_nonce()``, with BEGIN in the same message
    on sync psycopg), then send the fence signed for exactly that transaction
    (``tenantry.fence_pooled``, shard revision s0005). Two round trips; nothing is
    cached, and nothing is prepared on the server.
    """
    if conn.dialect.is_async:
        nonce = conn.exec_driver_sql(_NONCE.decode()).scalar()
    else:
        begin = _begin_command(driver) + b"; " if _idle(driver) else b""
        result = driver.pgconn.exec_(begin + _NONCE)
        if result.status != _TUPLES_OK:
            raise _result_error(driver, result)
        nonce = result.get_value(0, 0).decode()
    pid, micros = str(nonce).split(":")
    signature = key.sign_pooled(tenant_id, int(pid), int(micros))
    if conn.dialect.is_async:
        params = {"t": tenant_id, "s": signature}
        row = conn.exec_driver_sql(_POOLED_CALL.decode() + "%(t)s, %(s)s)", params).first()
        return row[0] if row is not None else None
    statement = b"".join(
        (
            _POOLED_CALL,
            sql.Literal(tenant_id).as_bytes(driver),
            b", ",
            sql.Literal(signature).as_bytes(driver),
            b")",
        )
    )
    result = driver.pgconn.exec_(statement)
    if result.status != _TUPLES_OK:
        raise _result_error(driver, result)
    value = result.get_value(0, 0) if result.ntuples else None
    return value.decode() if value is not None else None


def _result_error(driver: Any, result: Any) -> Exception:
    """The psycopg exception of a failed result, as psycopg itself would raise it."""
    encoding = driver.info.encoding
    message = result.get_error_message(encoding) or "the fence returned no row"
    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    try:
        error_class = pg_errors.lookup(state.decode()) if state else None
    except KeyError:
        error_class = None
    if error_class is None:
        dead = driver.broken or driver.closed
        error_class = psycopg.OperationalError if dead else psycopg.DatabaseError
    error: Exception = error_class(message, info=result, encoding=encoding)
    return error


_ROLLBACK = b"ROLLBACK"


def rollback_keeping_prepared(dbapi_connection: Any) -> None:
    """``ROLLBACK`` on a routed psycopg connection (sync), keeping psycopg's prepared
    statements: a routed engine's ``dialect.do_rollback``.

    psycopg forgets every statement it prepared at each ``rollback()`` (and sends
    ``DEALLOCATE ALL`` when it had any), and its count of executions towards
    ``prepare_threshold`` starts again: so on a connection whose transactions end in a
    rollback, which is how read-only sessions end, nothing is ever prepared, and each
    statement is parsed and planned again in every transaction (under row-level
    security, its policy's sub-select too). After a ``COMMIT`` psycopg keeps them. This
    sends the ``ROLLBACK`` itself, as psycopg would, so that a rollback keeps them as a
    commit does. Why that is safe: a prepared statement holds a query and its plan, no
    tenant: the tenant is a bound parameter of each execution, and the policies call
    ``tenantry.tenant()`` when the statement runs; the server re-plans a prepared
    statement whose tables changed. (psycopg's own reason to forget them, DDL undone
    by the rollback, would at worst make a later statement fail with "cached plan must
    not change result type"; psycopg still forgets them when it runs a ``DROP``, an
    ``ALTER`` or a ``DEALLOCATE ALL``.) Anything unusual (two-phase, pipeline, an idle,
    closed or broken connection) goes to psycopg's own ``rollback()``.
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if _unusual(driver):
        dbapi_connection.rollback()
        return
    result = driver.pgconn.exec_(_ROLLBACK)
    if result.status != _COMMAND_OK:
        raise _result_error(driver, result)


def rollback_keeping_prepared_async(dbapi_connection: Any) -> None:
    """:func:`rollback_keeping_prepared` on an asyncio psycopg connection, inside
    SQLAlchemy's greenlet (as the fence: ``send_query``, psycopg's ``execute``
    generator under the connection's ``wait``, awaited with ``await_only``)."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if _unusual(driver):
        dbapi_connection.rollback()
        return
    pgconn = driver.pgconn
    pgconn.send_query(_ROLLBACK)
    results = await_only(driver.wait(generators.execute(pgconn)))
    if results[-1].status != _COMMAND_OK:
        raise _result_error(driver, results[-1])


def _unusual(driver: Any) -> bool:
    """Whether psycopg's own rollback() must end *driver*'s transaction: no transaction,
    a failed one (a statement's error may be a prepared plan gone stale, "cached plan
    must not change result type" after a migration altered a column: psycopg's
    rollback forgets the prepared statements, so the next transaction plans afresh
    instead of failing the same way on this connection for ever), a closed or broken
    connection, two-phase, pipeline mode, a psycopg ``transaction()`` block (which
    refuses a rollback)."""
    return bool(
        driver.pgconn.transaction_status in (_IDLE, _INERROR)
        or driver.closed
        or driver.broken
        or getattr(driver, "_tpc", None)
        or getattr(driver, "_pipeline", None)
        or getattr(driver, "_num_transactions", 0)
    )


def _connection_dead(exc: Exception, driver: Any) -> bool:
    """Whether *exc* left the connection unusable (what SQLAlchemy's psycopg dialect
    calls a disconnect), rather than the statement failing on a live connection."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True  # SQLAlchemy saw it first (the asyncio path goes through it)
    return bool(getattr(driver, "closed", False) or getattr(driver, "broken", False))


def _invalidate(conn: Connection, exc: BaseException) -> None:
    """Invalidate a dead connection and, as SQLAlchemy does on a disconnect, every
    connection of its pool made before it: a restarted server or a failover killed them
    all, and each is replaced when next checked out (no ping, no round trip). A rollback
    of the transaction then skips the dead connection instead of raising again."""
    if conn.invalidated:
        return  # SQLAlchemy did both already
    pool = conn.engine.pool
    pool._invalidate(conn.connection, exc, _checkin=False)
    conn.invalidate(exc)


def _backend_pid(driver: Any) -> int:
    """The server process of a psycopg connection (sync or async), without a round trip."""
    pid: int = driver.info.backend_pid
    return pid


def _fence_sqlite(conn: Connection, tenant_id: str) -> str | None:
    info = conn.info
    found = conn.exec_driver_sql(SQLITE_FENCE, (tenant_id,)).first()
    value: str | None = found[0] if found else None
    frozen = value == Residency.FROZEN.value
    if frozen != bool(info.get(_QUERY_ONLY_KEY)):
        # SQLite has no read-only transactions; query_only refuses every write.
        conn.exec_driver_sql(f"PRAGMA query_only = {int(frozen)}")
        info[_QUERY_ONLY_KEY] = frozen
    return value


def reset_connection(dbapi_connection: Any, info: dict[str, Any]) -> None:
    """Forget the routed tenant when a connection goes back to the pool."""
    info.pop(TENANT_KEY, None)
    info.pop(FROZEN_KEY, None)
    if info.pop(_QUERY_ONLY_KEY, False):
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA query_only = 0")
        finally:
            cursor.close()


def frozen_error(tenant_id: str, shard: str | None, retry_after: float = 1.0) -> TenantFrozen:
    """The error a write to a frozen tenant raises."""
    return TenantFrozen(
        f"tenant {tenant_id!r} is frozen while a move copies it: reads work, retry the "
        f"write in about {retry_after:g}s",
        tenant_id=tenant_id,
        shard=shard,
        retry_after=retry_after,
    )
