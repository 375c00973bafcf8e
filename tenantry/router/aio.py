"""AsyncRouter: the Router's shape over SQLAlchemy asyncio (psycopg async, aiosqlite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, AsyncTransaction
from sqlalchemy.util import greenlet_spawn

from tenantry.router.fence import run_fence
from tenantry.router.router import Attempts, RouterBase, lost_midway, raise_if_lost
from tenantry.router.scoping import TenantSession
from tenantry.shardmap.drivers import make_async_engine
from tenantry.shardmap.model import Shard, mask_url
from tenantry.shardmap.operations import shard_errors

__all__ = ["AsyncRouter"]

T = TypeVar("T")


class AsyncRouter(RouterBase):
    """Routes each tenant's ``AsyncSession`` and ``AsyncConnection`` to its shard.

    ``async with router.session("acme") as session: ...`` — the same scoping, fence,
    stale-route and dead-connection retries as :class:`~tenantry.Router`. Map refreshes
    happen in a worker thread, never on the event loop.
    """

    engine_factory = staticmethod(make_async_engine)

    async def has_tenant_async(self, tenant_id: str) -> bool:
        """:meth:`has_tenant` without blocking the event loop."""
        if tenant_id in self.snapshot.tenants:
            return True
        return await asyncio.to_thread(self.has_tenant, tenant_id)

    async def _shard(self, tenant_id: str) -> Shard:
        snapshot = self._cache.snapshot  # one snapshot for the tenant and its shard
        tenant = snapshot.tenants.get(tenant_id)
        if tenant is not None:
            shard = snapshot.shards[tenant.shard]
        else:
            shard = await asyncio.to_thread(self._lookup, tenant_id)
        if shard.name not in self._fence_keys and shard.backend == "postgresql":
            # Read the shard's fence key here, not inside the fence: no catalog query
            # blocks the event loop. (The key asked first: ``backend`` parses the URL.)
            await asyncio.to_thread(self._fence_key, shard.name)
        return shard

    @asynccontextmanager
    async def _lease(self, shard: Shard) -> AsyncIterator[AsyncEngine]:
        slot, evicted = self._engines.acquire(shard)
        try:
            for engine in evicted:
                await engine.dispose()
            yield slot.handle
        finally:
            self._engines.release(slot)

    async def engine_for(self, tenant_id: str | None = None) -> AsyncEngine:
        """The AsyncEngine of the tenant's shard (shared by its tenants; not scoped)."""
        shard = await self._shard(self._tenant(tenant_id))
        async with self._lease(shard) as engine:
            return engine

    def session(self, tenant_id: str | None = None, **kwargs: Any) -> _RoutedAsyncSession:
        """An AsyncSession scoped to the tenant; the application commits."""
        return _RoutedAsyncSession(self, tenant_id, kwargs)

    @asynccontextmanager
    async def connection(self, tenant_id: str | None = None) -> AsyncIterator[AsyncConnection]:
        """An AsyncConnection in a scoped transaction, committed unless the block raises."""
        (conn, transaction), shard, lease = await self._begin(tenant_id, _open_connection, None)
        try:
            with lost_midway(shard):  # the COMMIT too
                try:
                    yield conn
                except BaseException:
                    await transaction.rollback()
                    raise
                await transaction.commit()
        finally:
            await conn.close()
            self._engines.release(lease)

    async def _begin(
        self,
        tenant_id: str | None,
        begin: Callable[[AsyncEngine, str, Shard, Any], Awaitable[T]],
        options: Any,
    ) -> tuple[T, Shard, Any]:
        """The asyncio twin of :meth:`Router._begin`, under the same :class:`Attempts`."""
        tenant = self._tenant(tenant_id)
        attempts = Attempts(await self._shard(tenant))
        while True:
            lease, evicted = self._engines.acquire(attempts.shard)
            try:
                for engine in evicted:
                    await engine.dispose()
                try:
                    begun = await begin(lease.handle, tenant, attempts.shard, options)
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
                    stale = attempts.shard
                    attempts.shard = await asyncio.to_thread(self._rerouted, tenant, stale, exc)

    async def _open_session(
        self, engine: AsyncEngine, tenant: str, shard: Shard, kwargs: dict[str, Any]
    ) -> AsyncSession:
        info = self._session_info(tenant, shard)
        session = AsyncSession(bind=engine, sync_session_class=TenantSession, info=info, **kwargs)
        try:
            # Begins the transaction: the fence runs now. The sync session's connection()
            # in SQLAlchemy's greenlet, as AsyncSession.connection() does, without making
            # the AsyncConnection proxy it returns (a weakly registered object per
            # transaction, unused here).
            await greenlet_spawn(session.sync_session.connection)
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        """Stop the map listener and dispose every engine."""
        await asyncio.to_thread(self._close_cache)
        for engine in self._engines.close():
            await engine.dispose()

    async def __aenter__(self) -> AsyncRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncRouter({mask_url(self.catalog.url)!r}, map_version={self.snapshot.version})"


class _RoutedAsyncSession:
    """``async with router.session(t) as session``: the asyncio twin of the sync
    router's ``_RoutedSession`` (a plain async context manager: no generator layer)."""

    __slots__ = ("_kwargs", "_lease", "_router", "_session", "_shard", "_tenant")

    def __init__(self, router: AsyncRouter, tenant_id: str | None, kwargs: dict[str, Any]) -> None:
        self._router, self._tenant, self._kwargs = router, tenant_id, kwargs

    async def __aenter__(self) -> AsyncSession:
        router = self._router
        session, self._shard, self._lease = await router._begin(
            self._tenant, router._open_session, self._kwargs
        )
        self._session = session
        return session

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        try:
            try:
                await self._session.__aexit__(exc_type, exc, traceback)  # closes it
            except DBAPIError as error:
                raise_if_lost(error, self._shard)
                raise
            if isinstance(exc, DBAPIError):
                raise_if_lost(exc, self._shard)
        finally:
            self._router._engines.release(self._lease)


async def _open_connection(
    engine: AsyncEngine, tenant: str, shard: Shard, _options: None
) -> tuple[AsyncConnection, AsyncTransaction]:
    """A connection of *engine* in a transaction begun with the fence."""
    conn = await engine.connect()
    try:
        transaction = await conn.begin()
        await conn.run_sync(run_fence, tenant, shard.name)
    except BaseException:
        await conn.close()  # rolls the transaction back
        raise
    return conn, transaction
