"""One Engine per physical database, created lazily, LRU-bounded, within a budget.

All tenants of a shard share its engine (and so its pool). Dedicated shards can be
many, so at most ``max_engines`` engines stay open: to open another, the least recently
used *idle* engines (no lease, no connection checked out) are disposed first. An engine
costs nothing on the server until it connects; the connections themselves are counted
and bounded per router and per server (:mod:`tenantry.router.connections`), and a new
engine of a server takes the dialect set-up found by the first (no queries).

When the connection budget needs room, the idle connections of the engine *least
frequently* used lately are closed (not the least recently used): each lease adds a
weight that grows by 2^(1/``USES_HALF_LIFE``) per lease of the router (forward decay,
as :mod:`tenantry.observability.topn` does with time), so an engine's score is its
lease count decayed by the router's leases since. A new connection to a database
costs its server ~15 ms of CPU (DESIGN.md, "What a miss costs") against ~0.5 ms for a
transaction on a kept one, so which databases keep their connections matters: over
Zipf-skewed traffic the hot databases keep theirs while the rarely used ones take
turns.

The budget is a cache of *connections*, not of engines: one connection at a time
closes, and each is valued by how often it is needed. An engine's only connection is
worth its score; its n-th (n > 1) is worth the decayed count of the leases that found
n - 1 others of that engine in flight (``levels``), in the same units. A hot database
that once had a burst of transactions keeps the extra connections of the burst only as
long as bursts that large stay more frequent than the use of another database's only
connection (over 1,000 databases and Zipf traffic, ~70 of a server's 478 connections
were such extras before). The victim is the least valued among a random sample of the
engines that hold connections (``EVICTION_SAMPLE``; all of them when fewer) and every
engine holding more than one, as Redis approximates LFU: no scan of every engine under
the lock. The values decide only which *idle* connection closes: never a route, a
tenant, or a connection in use (an engine is a candidate only while it holds more
connections than it has leases), so they cannot let a stale route or another tenant's
data through.

A shared PostgreSQL shard's engine checks its routing role once, on its first
connection (one query, in the pool's connect event): a role that row-level security
would not bind is refused with :class:`~tenantry.errors.UnsafeRoutingRole`, unless the
``allow_unsafe_routing_role`` setting lets it through with a warning.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import queue as sqla_queue

from tenantry.errors import ConfigurationError, ConnectionBudgetExceeded
from tenantry.router.connections import ConnectionBudget, DialectStates, server_of
from tenantry.settings import TenantrySettings
from tenantry.shardmap import roles
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.model import Shard, Tier

__all__ = ["EVICTION_SAMPLE", "USES_HALF_LIFE", "EngineRegistry", "EngineStats"]

#: Leases of the router over which an engine's score halves (see the module's doc).
USES_HALF_LIFE = 10_000
#: Engines holding connections compared to choose the one whose connections close.
EVICTION_SAMPLE = 16
_GROWTH = 2.0 ** (1.0 / USES_HALF_LIFE)
_RESCALE_AT = 2.0**60


@dataclass(frozen=True, slots=True)
class EngineStats:
    """How many engines are open, how many connections their pools may hold at most
    (``capacity``), how many are open now (``connections``) and in use
    (``checked_out``), how many times a connection waited for room (``waits``), and
    how many engines were disposed to make room (``evicted``: for ``max_engines``, or
    their idle connections closed for the connection budget)."""

    engines: int
    capacity: int
    checked_out: int
    created: int
    disposed: int
    connections: int = 0
    waits: int = 0
    dialects_initialized: int = 0
    evicted: int = 0
    surplus: int = 0


class _Slot:
    __slots__ = (
        "capacity",
        "engine",
        "handle",
        "holding",
        "key",
        "leases",
        "levels",
        "noted",
        "score",
        "server",
    )

    def __init__(self, handle: Any, engine: Engine, capacity: int, key: str) -> None:
        self.handle = handle  # what callers use: an Engine, or an AsyncEngine
        self.engine = engine  # its sync Engine: pool statistics
        self.capacity = capacity
        self.key = key  # the shard's URL
        self.server = server_of(key)
        self.leases = 0
        self.score = 0.0  # leases, forward-decayed (see the module's doc)
        # levels[k]: the leases that found exactly k + 1 others in flight, decayed
        # alike; sum(levels[k:]) is how often a (k + 2)-th connection is needed at once
        self.levels: list[float] = []
        self.holding = -1  # its index in EngineRegistry._holding, or -1
        self.noted = False  # in EngineRegistry._connected_slots, not yet taken in


class EngineRegistry:
    """Engines keyed by database URL, shared by every tenant of that database."""

    def __init__(
        self,
        settings: TenantrySettings,
        *,
        configure: Callable[[Engine, Shard], None] | None = None,
        factory: Callable[..., Any] = make_engine,
        catalog_url: str | None = None,
    ) -> None:
        self._settings = settings
        self._configure = configure
        self._factory = factory
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        # engines that opened a connection since they were made or last emptied: the
        # candidates whose idle connections the budget may close
        self._holding: list[_Slot] = []
        self._connected_slots: deque[_Slot] = deque()  # to join _holding (or _surplus)
        # engines that held more than one connection when last seen: candidates too
        self._surplus: set[_Slot] = set()
        self._weight = 1.0  # what the next lease adds to its engine's score
        self._random = random.Random()
        self._cond = threading.Condition(threading.Lock())
        self._created = 0
        self._disposed = 0
        self._evicted = 0
        self._closed = False
        self._budget = ConnectionBudget(settings, self._dispose_idle, catalog_url=catalog_url)
        self._dialects = DialectStates()
        smallest = min(settings.pool_size_shared, settings.pool_size_dedicated)
        if smallest + settings.max_overflow > settings.connection_budget:
            raise ConfigurationError(
                f"connection_budget ({settings.connection_budget}) is smaller than one "
                f"engine's pool ({smallest} + {settings.max_overflow} overflow)",
                field="connection_budget",
            )

    def _capacity(self, shard: Shard) -> int:
        size = (
            self._settings.pool_size_dedicated
            if shard.tier is Tier.DEDICATED
            else self._settings.pool_size_shared
        )
        return size + self._settings.max_overflow

    def _new_engine(self, shard: Shard) -> tuple[Any, Engine]:
        options: dict[str, Any] = {}
        if shard.pooled and shard.backend == "postgresql":
            # No server-side prepared statements: a pooler in transaction mode runs the
            # next EXECUTE on another server connection, which never saw the PREPARE.
            options["connect_args"] = {"prepare_threshold": None}
        handle = self._factory(
            shard.url,
            connect_timeout=self._settings.connect_timeout,
            pool_size=self._capacity(shard) - self._settings.max_overflow,
            max_overflow=self._settings.max_overflow,
            pool_timeout=self._settings.pool_timeout,
            pool_recycle=self._settings.pool_recycle,
            **options,
        )
        engine: Engine = getattr(handle, "sync_engine", handle)
        if engine.dialect.name == "postgresql":
            self._dialects.share(engine, shard.url)
        self._budget.watch(engine, shard.url, shard.name, pooled=shard.pooled)
        if self._configure is not None:
            self._configure(engine, shard)
        if shard.tier is Tier.SHARED and engine.dialect.name == "postgresql":
            _guard_routing_role(engine, shard, self._settings)
        return handle, engine

    @contextmanager
    def lease(self, shard: Shard) -> Iterator[Engine]:
        """The shard's engine, kept open (not evicted) until the block ends."""
        slot, evicted = self.acquire(shard)
        for handle in evicted:
            handle.dispose()
        try:
            yield slot.handle
        finally:
            self.release(slot)

    def get(self, shard: Shard) -> Engine:
        """The shard's engine without a lease (it may be disposed once idle)."""
        with self.lease(shard) as engine:
            return engine

    def release(self, slot: _Slot) -> None:
        """End a lease taken by :meth:`acquire`."""
        with self._cond:
            slot.leases -= 1
            if slot.leases == 0:
                self._cond.notify_all()

    def acquire(self, shard: Shard) -> tuple[_Slot, list[Any]]:
        """Lease the shard's engine; also return the evicted engines, for the caller to
        dispose outside the lock (an AsyncEngine is disposed with ``await``)."""
        key = shard.url
        evicted: list[Any] = []
        with self._cond:
            slot = self._slots.get(key)
            if slot is not None:
                self._lease(slot)
                return slot, evicted
            if self._closed:
                raise ConfigurationError("the router is closed")
            capacity = self._capacity(shard)
            deadline = time.monotonic() + self._settings.pool_timeout
            while not self._make_room(evicted):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    raise ConnectionBudgetExceeded(
                        f"cannot open an engine for shard {shard.name!r}: all "
                        f"{len(self._slots)} open engines (TENANTRY_MAX_ENGINES) are in use; "
                        "raise TENANTRY_MAX_ENGINES, or retry",
                        shard=shard.name,
                    )
                slot = self._slots.get(key)
                if slot is not None:  # another thread opened it meanwhile
                    self._lease(slot)
                    return slot, evicted
            slot = _Slot(*self._new_engine(shard), capacity, key)
            event.listen(slot.engine, "connect", partial(self._connected, slot))
            self._slots[key] = slot
            self._lease(slot)
            self._created += 1
            return slot, evicted

    def _lease(self, slot: _Slot) -> None:
        """One more lease of *slot* (under the lock): the most recently used, its score
        up by the current weight, which then grows (scores rescaled when it gets large;
        *slot* is in ``_slots`` already, so it is rescaled with the others)."""
        self._slots.move_to_end(slot.key)
        slot.leases += 1
        weight = self._weight
        slot.score += weight
        if slot.leases > 1:  # this lease needs connections 2 .. leases at once
            levels = slot.levels
            if len(levels) < slot.leases - 1:
                levels.extend([0.0] * (slot.leases - 1 - len(levels)))
            levels[slot.leases - 2] += weight  # O(1) here; summed when room is made
        self._weight *= _GROWTH
        if self._weight > _RESCALE_AT:
            self._rescale()

    def _rescale(self) -> None:
        """Divide every score and the next weight by the weight (under the lock): the
        order of scores stays, the numbers stay finite."""
        weight = self._weight
        for slot in self._slots.values():
            slot.score /= weight
            slot.levels = [level / weight for level in slot.levels]
        self._weight = 1.0

    def _connected(self, slot: _Slot, _dbapi_connection: Any, _record: Any) -> None:
        """The pool's connect event: *slot*'s engine holds a connection now. Noted
        without the lock (a deque's append is atomic; in an asyncio router this runs in
        a connect's greenlet), and taken into the candidates when room is next made."""
        if not slot.noted:  # at most once until taken in (a race may add it twice)
            slot.noted = True
            self._connected_slots.append(slot)

    def _hold(self, slot: _Slot) -> None:
        if slot.holding < 0:
            slot.holding = len(self._holding)
            self._holding.append(slot)

    def _unhold(self, slot: _Slot) -> None:
        """Take *slot* out of the candidates (swap with the last: O(1)); under the lock."""
        self._surplus.discard(slot)
        index = slot.holding
        if index < 0:
            return
        last = self._holding.pop()
        if last is not slot:
            self._holding[index] = last
            last.holding = index
        slot.holding = -1

    def _make_room(self, evicted: list[Any]) -> bool:
        """Dispose idle engines, oldest first, until one more fits in ``max_engines``."""
        if len(self._slots) < self._settings.max_engines:
            return True
        for key in list(self._slots):
            slot = self._slots[key]
            if slot.leases == 0 and slot.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
                del self._slots[key]
                self._unhold(slot)
                evicted.append(slot.handle)
                self._disposed += 1
                self._evicted += 1
                if len(self._slots) < self._settings.max_engines:
                    return True
        return False

    def _dispose_idle(self, server: str | None) -> bool:
        """For the connection budget, to make room: close the idle connection valued
        least (see the module's doc) among a sample of the engines that hold some and
        every engine that holds more than one (on *server* only, when given); whether
        there was one. Chosen and closed under the registry's lock, so no lease can
        start on it meanwhile."""
        with self._cond:
            while self._connected_slots:
                slot = self._connected_slots.popleft()
                slot.noted = False
                if self._slots.get(slot.key) is slot:  # not disposed meanwhile
                    self._hold(slot)
                    if _held(slot.engine.pool) > 1:
                        self._surplus.add(slot)
            holding = self._holding
            surplus = list(self._surplus)
            if len(holding) > 2 * EVICTION_SAMPLE:
                sample = self._random.sample(holding, EVICTION_SAMPLE)
                victim = self._least_valued(sample + surplus, server)
                if victim is None:  # none in the sample could go: look at them all
                    victim = self._least_valued(list(holding), server)
            else:
                victim = self._least_valued(list(holding) + surplus, server)
            if victim is None:
                return False
            if not _close_one_idle(victim.engine.pool):
                victim.engine.dispose()  # a pool that cannot close one: all its idle ones
            held = _held(victim.engine.pool)
            if held < 2:
                self._surplus.discard(victim)
            if held == 0:
                self._unhold(victim)
            self._evicted += 1
            return True

    def _least_valued(self, candidates: list[_Slot], server: str | None) -> _Slot | None:
        """The engine of *candidates* whose idle connection that may close is valued
        least: the only connection of an engine no lease holds, by the engine's score;
        the n-th connection of an engine (n > 1) holding more than its leases, by how
        often n were needed at once (``levels``). Engines found holding no connection
        leave the candidates, and those found holding one leave ``_surplus`` (under the
        lock)."""
        best: _Slot | None = None
        best_value = 0.0
        for slot in candidates:
            if slot.holding < 0:  # left the list already (a duplicate)
                continue
            pool: Any = slot.engine.pool
            idle = pool.checkedin()
            held = idle + pool.checkedout()
            if held == 0:
                self._unhold(slot)  # its connections closed otherwise (invalidated)
                continue
            if held == 1:
                self._surplus.discard(slot)
            if idle == 0 or held <= slot.leases or (server is not None and slot.server != server):
                continue
            value = slot.score if held == 1 else sum(slot.levels[held - 2 :])
            if best is None or value < best_value:
                best, best_value = slot, value
        return best

    def stats(self) -> EngineStats:
        """Open engines, their total capacity and connections checked out now."""
        with self._cond:
            return EngineStats(
                engines=len(self._slots),
                capacity=sum(s.capacity for s in self._slots.values()),
                checked_out=sum(
                    s.engine.pool.checkedout()  # type: ignore[attr-defined]
                    for s in self._slots.values()
                ),
                created=self._created,
                disposed=self._disposed,
                connections=self._budget.open,
                waits=self._budget.waits,
                dialects_initialized=self._dialects.initialized,
                evicted=self._evicted,
                surplus=sum(max(0, _held(s.engine.pool) - 1) for s in self._slots.values()),
            )

    def connections(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Per server: connections open now, this router's share of the server (the
        connection budget where no share was read), and connections that waited."""
        budget = self._budget
        opened = budget.per_server()
        limits = budget.server_limits()
        shares = {s: limits.get(s, self._settings.connection_budget) for s in opened}
        shares.update(limits)
        return opened, shares, budget.server_waits()

    def dispose(self, url: str | None = None) -> list[Any]:
        """Forget one engine (by URL) or all of them; dispose sync engines, and return
        every handle removed (async engines are left for the caller to await)."""
        with self._cond:
            keys = [url] if url is not None else list(self._slots)
            slots = [slot for key in keys if (slot := self._slots.pop(key, None))]
            for slot in slots:
                self._unhold(slot)
            removed = [slot.handle for slot in slots]
            self._disposed += len(removed)
            self._cond.notify_all()
        for handle in removed:
            if isinstance(handle, Engine):
                handle.dispose()
        return removed

    def close(self) -> list[Any]:
        """Dispose every engine; no new ones are opened afterwards."""
        with self._cond:
            self._closed = True
        return self.dispose()


def _close_one_idle(pool: Any) -> bool:
    """Close one idle connection of *pool*, as a QueuePool closes a connection returned
    to it when it is full (its queue's non-blocking get; the pool's count of connections
    down by one); False for another kind of pool, or none idle."""
    if not isinstance(pool, QueuePool):
        return False
    try:
        record = pool._pool.get(False)
    except sqla_queue.Empty:
        return False
    try:
        record.close()
    finally:
        pool._dec_overflow()
    return True


def _held(pool: Any) -> int:
    """Connections *pool* holds: idle and in use (0 for a pool that does not say)."""
    if not hasattr(pool, "checkedin"):
        return 0
    return int(pool.checkedin()) + int(pool.checkedout())


def _guard_routing_role(engine: Engine, shard: Shard, settings: TenantrySettings) -> None:
    """Check the routing role on the engine's first connection, once per engine.

    Each new connection of an unchecked engine runs the check (so two opened at once
    both do, and neither is used before it passes); once one passes, the others skip it.
    """
    passed = False
    ops = roles.operations_role(shard)

    def check(dbapi_connection: Any, _record: Any) -> None:
        nonlocal passed
        if passed:
            return
        found = roles.check_dbapi_role(
            dbapi_connection, column=settings.tenant_column, operations_role=ops
        )
        roles.enforce_routing_role(
            shard.name,
            roles.shard_role_check(found, shard),
            allow=settings.allow_unsafe_routing_role,
        )
        passed = True

    # First among the connect listeners: before the router's (the fence's stamp).
    event.listen(engine, "connect", check, insert=True)
