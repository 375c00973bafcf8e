"""Router: a SQLAlchemy session or connection on the right engine, per tenant.

``router.session("acme")`` looks the tenant up in the cached map snapshot (a dict),
leases the engine of its shard, and begins a transaction whose first statement is
the residency fence. A tenant that is not resident where the map says (a router with
an old map) makes the router refresh its map and retry once on the new home; a pooled
connection found dead by the fence (a restarted server, a terminated backend) makes it
begin the transaction again, once, on a fresh connection (:class:`Attempts`: the one
rule, for the sync and async routers, for sessions and connections).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from sqlalchemy import Connection, Engine, RootTransaction, event
from sqlalchemy.exc import DBAPIError

from tenantry.errors import (
    FenceRejected,
    InvalidName,
    LookupFailed,
    NoTenantInContext,
    ShardUnavailable,
    StaleRoute,
)
from tenantry.observability.hooks import detach_router, observe_router
from tenantry.router.context import current_tenant_or_none
from tenantry.router.engines import EngineRegistry, EngineStats
from tenantry.router.fence import (
    TENANT_KEY,
    ConnectionLost,
    register_keys,
    rollback_keeping_prepared,
    rollback_keeping_prepared_async,
    run_fence,
)
from tenantry.router.scoping import (
    SESSION_SCOPE,
    SESSION_SHARD,
    TenantScope,
    TenantSession,
    configure_engine,
)
from tenantry.settings import TenantrySettings, load_settings
from tenantry.shardmap.cache import MapCache
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.drivers import describe_error, make_engine
from tenantry.shardmap.keys import FenceKey
from tenantry.shardmap.model import MapSnapshot, Shard, mask_url, validate_tenant_id
from tenantry.shardmap.operations import shard_errors

if TYPE_CHECKING:
    from tenantry.observability.metrics import Metrics

__all__ = ["Attempts", "Router", "RouterBase", "lost_midway", "raise_if_lost"]

logger = logging.getLogger("tenantry.router")

T = TypeVar("T")


class RouterBase:
    """What the sync and async routers share: the map cache, the engines, the lookup."""

    #: Makes an engine for a shard URL (sync or asyncio).
    engine_factory: Callable[..., Any] = staticmethod(make_engine)

    def __init__(
        self,
        catalog_url: str | None = None,
        *,
        settings: TenantrySettings | None = None,
        catalog: Catalog | None = None,
        listen: bool = True,
        background: bool = True,
        metrics: bool | Metrics | None = None,
        traces: bool | None = None,
        statement_comments: bool | None = None,
    ) -> None:
        if catalog is not None and catalog_url is not None:
            raise ValueError("pass catalog_url or catalog, not both")
        if settings is None:
            settings = catalog.settings if catalog is not None else load_settings()
        self.settings = settings
        self._owns_catalog = catalog is None
        self.catalog = catalog if catalog is not None else Catalog(catalog_url, settings=settings)
        self._cache = MapCache(
            self.catalog,
            poll_interval=settings.poll_interval,
            listen=listen,
            background=background,
        )
        self._scope = TenantScope(settings.tenant_column)
        self._fence_keys: dict[str, FenceKey] = {}
        self._keys_lock = threading.Lock()
        self._fence_keys_read = False  # whether every key of the catalog was read once
        try:
            self._engines = EngineRegistry(
                settings,
                configure=self._configure_engine,
                factory=type(self).engine_factory,
                catalog_url=self.catalog.url,
            )
            # Metrics, traces, statement comments (README, "Observing the fleet"): None
            # when all are off. The settings' unless given here; metrics= may be a Metrics.
            self._observer = observe_router(
                self, self._cache, self._engines, settings, tenant_key=TENANT_KEY,
                metrics=metrics, traces=traces, statement_comments=statement_comments,
            )  # fmt: skip
        except BaseException:
            self._close_cache()  # else its thread and LISTEN connection outlive us
            raise

    def _configure_engine(self, engine: Engine, shard: Shard) -> None:
        configure_engine(engine, self.settings.tenant_column)
        if self._observer is not None:
            self._observer.configure_engine(engine)
        if shard.backend == "postgresql":
            name = shard.name
            register_keys(
                engine,
                name,
                lambda reload: self._fence_key(name, reload),
                with_begin=self.settings.fence_with_begin,
                pooled=shard.pooled,
            )
            allow = self.settings.allow_unsafe_routing_role
            event.listen(engine, "connect", partial(_stamp_connection, allow_temporary=allow))
            if not shard.pooled and engine.dialect.driver == "psycopg":
                # A rollback keeps psycopg's prepared statements, as a commit does (why
                # that is safe: rollback_keeping_prepared). Behind a pooler nothing is
                # prepared. An instance attribute: this engine's dialect only.
                dialect: Any = engine.dialect
                dialect.do_rollback = (
                    rollback_keeping_prepared_async
                    if dialect.is_async
                    else rollback_keeping_prepared
                )
            if self.settings.reset_connections and shard.pooled:
                # The reset would run on whichever server connection the pooler hands
                # out next: the pooled fence closes WITH HOLD cursors instead.
                logger.warning(
                    "shard %s is routed through a pooler: TENANTRY_RESET_CONNECTIONS "
                    "cannot reach its server connections and is not applied there",
                    shard.name,
                )
            elif self.settings.reset_connections:
                event.listen(engine, "checkin", _discard_session_state)

    def _fence_key(self, shard: str, reload: bool = False) -> FenceKey:
        """The key this router signs *shard*'s fences with (read once from the catalog)."""
        key = self._fence_keys.get(shard)
        if key is not None and not reload:
            return key
        with self._keys_lock:
            if not reload and not self._fence_keys_read:
                # the first shard met: every key the catalog has, in one query
                for name, found in self.catalog.fence_keys().items():
                    self._fence_keys.setdefault(name, found)
                self._fence_keys_read = True
            key = self._fence_keys.get(shard)
            if key is not None and not reload:
                return key
            fresh = self.catalog.fence_key(shard)
            if reload and key is not None and fresh.key_id == key.key_id:
                # The catalog has the key the shard just refused: learn it from the shard.
                fresh = self.catalog.fence_key(shard, resync=True)
            self._fence_keys[shard] = fresh
            return fresh

    # -- the map -----------------------------------------------------------------

    @property
    def snapshot(self) -> MapSnapshot:
        """The map snapshot this router routes by now."""
        return self._cache.snapshot

    def refresh(self) -> MapSnapshot:
        """Reload the map now if the catalog has a newer version."""
        return self._cache.refresh()

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Wait until this router's map is at *version* or later (say, the version a
        catalog change made, once its notification arrived); False on timeout.

        A router made with ``background=False`` only moves on by :meth:`refresh`.
        """
        return self._cache.wait_for_version(version, timeout)

    def has_tenant(self, tenant_id: str) -> bool:
        """Whether *tenant_id* is in the map (see :meth:`shard_for` on refreshes).

        An unknown or invalid id is False; a catalog that cannot be read raises.
        """
        try:
            self._lookup(tenant_id)
        except (LookupFailed, InvalidName):
            return False
        return True

    def shard_for(self, tenant_id: str | None = None) -> Shard:
        """The shard the tenant lives on, by the current map.

        A tenant not in the map makes the router read the catalog's map version (it may
        have been added a moment ago) — at most once per ``miss_interval`` while change
        notifications arrive, so unknown ids cannot hammer the catalog; every miss when
        they do not (no listener: polling only, or SQLite).
        """
        return self._lookup(self._tenant(tenant_id))

    def _tenant(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            tenant_id = current_tenant_or_none()
            if tenant_id is None:
                raise NoTenantInContext()
        return tenant_id

    def _lookup(self, tenant_id: str) -> Shard:
        snapshot = self._cache.snapshot
        tenant = snapshot.tenants.get(tenant_id)
        if tenant is None:
            validate_tenant_id(tenant_id)
            # Perhaps added a moment ago and the notification is still on its way; but
            # ids from the internet must not make every miss a catalog query.
            snapshot = self._cache.refresh_after_miss()
            tenant = snapshot.tenant(tenant_id)
        return snapshot.shards[tenant.shard]

    def engine_stats(self) -> EngineStats:
        """Open engines and their connection capacity."""
        return self._engines.stats()

    def _session_info(self, tenant: str, shard: Shard) -> dict[str, Any]:
        """A routed session's ``info``: its tenant, its shard, this router's scope."""
        return {TENANT_KEY: tenant, SESSION_SHARD: shard.name, SESSION_SCOPE: self._scope}

    def _rerouted(self, tenant_id: str, stale: Shard, error: StaleRoute) -> Shard:
        """After a StaleRoute on *stale*: the tenant's new home, or raise *error*."""
        snapshot = self._cache.refresh(min_version=self._cache.version + 1)
        shard = snapshot.shards[snapshot.tenant(tenant_id).shard]
        if shard.url == stale.url:
            raise error
        logger.info(
            "tenant %s: map was stale, rerouting %s -> %s", tenant_id, stale.name, shard.name
        )
        return shard

    def _close_cache(self) -> None:
        detach_router(self, getattr(self, "_observer", None))
        self._cache.close()
        if self._owns_catalog:
            self.catalog.close()


class Router(RouterBase):
    """Routes each tenant's sessions and connections to its shard's engine.

    ``Router()`` uses the settings' catalog; ``Router(url)`` names one. Close it (or
    use it as a context manager) to stop its map listener and dispose its engines.
    ``metrics=`` (True, or a ``Metrics`` of your own registry), ``traces=`` and
    ``statement_comments=`` override the settings of the same names (README,
    "Observing the fleet").
    """

    def engine_for(self, tenant_id: str | None = None) -> Engine:
        """The engine of the tenant's shard (shared by all its tenants; not scoped)."""
        return self._engines.get(self.shard_for(tenant_id))

    def session(self, tenant_id: str | None = None, **kwargs: Any) -> _RoutedSession:
        """A Session scoped to the tenant (the current one if not given).

        The application commits, as with any Session; leaving the block closes it.
        """
        return _RoutedSession(self, tenant_id, kwargs)

    @contextmanager
    def connection(self, tenant_id: str | None = None) -> Iterator[Connection]:
        """A Core connection in a transaction scoped to the tenant.

        Committed when the block succeeds, rolled back when it raises, like
        ``engine.begin()``.
        """
        (conn, transaction), shard, lease = self._begin(tenant_id, _open_connection, None)
        try:
            with transaction:  # the COMMIT too
                yield conn
        except DBAPIError as exc:
            raise_if_lost(exc, shard)
            raise
        finally:
            conn.close()
            self._engines.release(lease)

    def _begin(
        self, tenant_id: str | None, begin: Callable[[Engine, str, Shard, Any], T], options: Any
    ) -> tuple[T, Shard, Any]:
        """``begin(engine, tenant, shard, options)`` on the tenant's shard, again as
        :class:`Attempts` allows: what it returned, the shard, and the lease on the
        shard's engine, for the caller to release when the transaction is over."""
        tenant = self._tenant(tenant_id)
        attempts = Attempts(self._lookup(tenant))
        while True:
            lease, evicted = self._engines.acquire(attempts.shard)
            try:
                for engine in evicted:
                    engine.dispose()
                try:
                    begun = begin(lease.handle, tenant, attempts.shard, options)
                except Exception:
                    # shard_errors's translation, entered only when there is one to make
                    with shard_errors(attempts.shard):
                        raise
                return begun, attempts.shard, lease
            except BaseException as exc:
                self._engines.release(lease)
                if self._observer is not None:  # only when a beginning failed
                    self._observer.attempt_failed(attempts.shard, exc)
                if attempts.stale(exc):
                    attempts.shard = self._rerouted(tenant, attempts.shard, exc)

    def _open_session(
        self, engine: Engine, tenant: str, shard: Shard, kwargs: dict[str, Any]
    ) -> TenantSession:
        session = TenantSession(bind=engine, info=self._session_info(tenant, shard), **kwargs)
        try:
            session.connection()  # begins the transaction: the fence runs now
        except BaseException:
            session.close()
            raise
        return session

    def close(self) -> None:
        """Stop the map listener and dispose every engine."""
        self._close_cache()
        self._engines.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Router({mask_url(self.catalog.url)!r}, map_version={self.snapshot.version})"


class _RoutedSession:
    """``with router.session(t) as session``: the transaction begins on entry (the
    fence, with :class:`Attempts`'s retries); leaving closes the session, names a lost
    connection (:func:`lost_midway`'s rule) and releases the engine's lease.

    A plain context manager, not a generator one: a layer less on every transaction.
    """

    __slots__ = ("_kwargs", "_lease", "_router", "_session", "_shard", "_tenant")

    def __init__(self, router: Router, tenant_id: str | None, kwargs: dict[str, Any]) -> None:
        self._router, self._tenant, self._kwargs = router, tenant_id, kwargs

    def __enter__(self) -> TenantSession:
        router = self._router
        session, self._shard, self._lease = router._begin(
            self._tenant, router._open_session, self._kwargs
        )
        self._session = session
        return session

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        try:
            try:
                self._session.__exit__(exc_type, exc, traceback)  # closes it
            except DBAPIError as error:
                raise_if_lost(error, self._shard)
                raise
            if isinstance(exc, DBAPIError):
                raise_if_lost(exc, self._shard)
        finally:
            self._router._engines.release(self._lease)


def _open_connection(
    engine: Engine, tenant: str, shard: Shard, _options: None
) -> tuple[Connection, RootTransaction]:
    """A connection of *engine* in a transaction begun with the fence."""
    conn = engine.connect()
    try:
        transaction = conn.begin()
        run_fence(conn, tenant, shard.name)
    except BaseException:
        conn.close()  # rolls the transaction back
        raise
    return conn, transaction


def _stamp_connection(dbapi_connection: Any, _record: Any, allow_temporary: bool = False) -> None:
    """Give a new routed connection its stamp (``tenantry.open_session()``), committed;
    none in a dedicated database whose tenant is a constant (s0007: :data:`OPEN_SESSION`).

    The fence sets the stamp in every transaction; making it is DDL, done once here
    rather than in a transaction that most often ends in a rollback. The shard refuses a
    routing role that may create temporary objects, unless *allow_temporary* (the
    ``allow_unsafe_routing_role`` override).

    One statement in autocommit, so one round trip (BEGIN, the call and COMMIT were
    three): the server commits it by itself, as it would the explicit transaction.
    """
    previous = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # no round trip: the new connection is idle
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(OPEN_SESSION[allow_temporary])
        finally:
            cursor.close()
    except BaseException:
        with contextlib.suppress(Exception):  # a broken connection: it is dropped anyway
            dbapi_connection.autocommit = previous
        raise
    dbapi_connection.autocommit = previous


#: What a new routed connection runs (see :func:`_stamp_connection`): in a dedicated
#: database whose tenant is a constant (shard revision s0007) ``tenantry.tenant()`` is
#: that tenant and nothing more runs (``open_session`` would only check the role, at
#: the cost of a few milliseconds of a new server session's catalog reads); elsewhere it
#: is NULL, and ``open_session`` makes the stamp.
OPEN_SESSION = {
    allow: "SELECT CASE WHEN tenantry.tenant() IS NULL"
    f" THEN tenantry.open_session({str(allow).lower()}) IS NULL END"
    for allow in (False, True)
}


#: What ``reset_connections`` runs: DISCARD ALL but for temporary objects and sequence
#: state, so the connection keeps the fence's stamp. psycopg forgets its own prepared
#: statements when it sees DEALLOCATE ALL.
_RESET = "CLOSE ALL; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DEALLOCATE ALL"


def _discard_session_state(dbapi_connection: Any, record: Any) -> None:
    """Reset a connection back in the pool (``reset_connections``).

    A routed transaction may leave session state behind (a setting made with
    ``is_local => false``, a ``WITH HOLD`` cursor, a prepared statement) that the next
    transaction on the connection, another tenant's, could read.
    """
    if dbapi_connection is None:
        return
    previous = dbapi_connection.autocommit
    try:
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_RESET)
        finally:
            cursor.close()
        dbapi_connection.autocommit = previous
    except Exception as exc:  # a broken connection: the pool replaces it
        logger.warning("could not reset a pooled connection, replacing it: %s", exc)
        record.invalidate(exc)


class Attempts:
    """Where a routed transaction begins, and whether it may begin again after its fence
    raised: the one rule of the sync and async routers, for sessions and connections.

    Nothing of the transaction ran before its fence. A dead pooled connection
    (ConnectionLost) is retried once on a fresh connection; a stale route (the caller
    refreshes the map and moves :attr:`shard` to the new home) or a rotated fence key
    (read again) once between them.
    """

    __slots__ = ("_retried", "shard")

    _CONNECTION, _ROUTE = 1, 2

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._retried = 0

    def stale(self, exc: BaseException) -> TypeGuard[StaleRoute]:
        """After *exc* (raised while a transaction began): raise it unless the transaction
        may begin again; True when it may on the tenant's new home (refresh the map)."""
        if not self.again(exc):
            raise exc
        return isinstance(exc, StaleRoute)

    def again(self, exc: BaseException) -> bool:
        """Whether the transaction whose fence raised *exc* may begin again; records it."""
        if isinstance(exc, ConnectionLost):
            reason = self._CONNECTION
        elif isinstance(exc, StaleRoute | FenceRejected):
            reason = self._ROUTE
        else:
            return False
        if self._retried & reason:
            return False
        self._retried |= reason
        if reason == self._CONNECTION:
            logger.info("%s; beginning the transaction again on a fresh connection", exc)
        return True


@contextmanager
def lost_midway(shard: Shard) -> Iterator[None]:
    """A connection lost while the application's block ran (its own statements, past
    the fence: nothing to begin again) leaves it as ShardUnavailable naming the shard,
    not as a raw driver error. The connection is invalidated already (SQLAlchemy saw
    the disconnect), so the rollback on the way out does not raise again."""
    try:
        yield
    except DBAPIError as exc:
        raise_if_lost(exc, shard)
        raise


def raise_if_lost(exc: DBAPIError, shard: Shard) -> None:
    """Raise ShardUnavailable if *exc* lost the connection (see :func:`lost_midway`)."""
    if exc.connection_invalidated:
        raise ShardUnavailable(
            f"shard {shard.name!r}: the connection was lost during the transaction "
            f"({describe_error(exc)}); it did not commit, unless it was lost during COMMIT",
            shard=shard.name,
        ) from exc
