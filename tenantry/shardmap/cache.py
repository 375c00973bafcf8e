"""A versioned, in-process snapshot of the shard map, kept fresh in the background.

Routers read :attr:`MapCache.snapshot` on every request: one attribute read, no lock.
A background thread replaces the snapshot when the catalog's map version changes,
woken by ``LISTEN tenantry_map`` on PostgreSQL, and by polling the version every
``poll_interval`` seconds everywhere (the only way on SQLite, and the fallback when a
notification is missed). The new snapshot is the old one with the tenants changed
since (the catalog keeps a change log), or the whole map when it is too far behind.
A lost catalog connection is retried with backoff; routing goes on from the last
snapshot meanwhile.

Behind a connection pooler in transaction mode ``LISTEN`` never delivers: the listener
connects to ``catalog_listen_url`` when set (the catalog server's own URL), else to the
catalog URL, and a listener that turns out to go through a pooler is closed for good:
the cache polls. Which of the two it does is logged once, in one line, when the
background thread starts (:attr:`MapCache.mode`).

A lookup that misses (a tenant added a moment ago, or an id made up by a client)
calls :meth:`MapCache.refresh_after_miss`: while notifications arrive, the catalog is
read at most once per ``miss_interval`` for all misses together (a refresh in flight,
say for a notification, is waited for instead); without them, every miss reads the
catalog's version, as the only way to see a new tenant before the next poll.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import psycopg

from tenantry.errors import CatalogError
from tenantry.shardmap.catalog import NOTIFY_CHANNEL, Catalog
from tenantry.shardmap.model import MapSnapshot
from tenantry.shardmap.poolers import through_pooler
from tenantry.urls import libpq_conninfo, mask_url

__all__ = ["MISS_INTERVAL", "MapCache"]

logger = logging.getLogger("tenantry.cache")

_MAX_BACKOFF = 5.0
_WAKE = 0.2
#: While notifications arrive, misses read the catalog at most this often (seconds).
MISS_INTERVAL = 0.25


class MapCache:
    """The latest :class:`MapSnapshot` of *catalog*, refreshed in the background."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        poll_interval: float = 2.0,
        listen: bool = True,
        background: bool = True,
        on_change: Callable[[MapSnapshot], None] | None = None,
        miss_interval: float = MISS_INTERVAL,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if miss_interval < 0:
            raise ValueError(f"miss_interval must be >= 0, got {miss_interval!r}")
        self._miss_interval = miss_interval
        self._catalog = catalog
        self._poll_interval = poll_interval
        self._listen = listen and catalog.dialect == "postgresql"
        self._listen_url = catalog.settings.catalog_listen_url or catalog.url
        self._announced = False
        self._on_change = on_change
        #: Called with the seconds each refresh took (the routers' metrics set it).
        self.on_refresh: Callable[[float], None] | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: psycopg.Connection[tuple[object, ...]] | None = None
        # Notified when the snapshot changes and when the LISTEN connection opens or
        # closes (wait_for_version, wait_listening).
        self._changed = threading.Condition()
        checked = time.monotonic()
        self.snapshot: MapSnapshot = catalog.snapshot()
        self._checked = checked  # when the catalog was last read (monotonic)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name="tenantry-map-cache", daemon=True
            )
            self._thread.start()

    @property
    def version(self) -> int:
        """The map version of the snapshot in use."""
        return self.snapshot.version

    @property
    def mode(self) -> str:
        """How changes reach this cache: ``notify`` (LISTEN, with a poll as the
        fallback) or ``poll``."""
        return "notify" if self._listen else "poll"

    def wait_mode(self, timeout: float | None = None) -> str | None:
        """Wait until the background thread knows how changes reach this cache (the
        line it logs); return :attr:`mode`, or None on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._announced, timeout):
                return None
        return self.mode

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is open now."""
        return self._listener is not None

    @property
    def notified(self) -> bool:
        """Whether changes reach this cache by notification now: a LISTEN connection
        is open and the background thread that reads it runs."""
        thread = self._thread
        return (
            self._listener is not None
            and thread is not None
            and thread.is_alive()
            and not self._stop.is_set()
        )

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Wait until the snapshot is at *version* or later (brought by a notification,
        a poll or any refresh); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.snapshot.version >= version, timeout)

    def wait_listening(self, timeout: float | None = None, *, listening: bool = True) -> bool:
        """Wait until notifications reach this cache (:attr:`notified`), or with
        ``listening=False`` until the cache knows they do not; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.notified is listening, timeout)

    def refresh_after_miss(self) -> MapSnapshot:
        """The snapshot to look a missing tenant up in again, after a lookup missed.

        While notifications arrive, a tenant added a moment ago shows up with its
        notification, so the catalog is read at most once per ``miss_interval`` for
        all misses together: ids made up by clients cannot turn into catalog queries.
        A refresh in flight (a notification being applied) is waited for. Without
        notifications, :meth:`refresh`.
        """
        if not self.notified:
            return self.refresh()
        with self._refresh_lock:  # waits for a refresh in flight
            if time.monotonic() - self._checked < self._miss_interval:
                return self.snapshot
            return self._refresh_locked()

    def refresh(self, *, min_version: int | None = None) -> MapSnapshot:
        """Bring the snapshot up to the catalog's version, if it moved.

        One statement, whether anything changed or not: the version and the tenants
        changed since this snapshot's (the catalog's change log), applied at a cost in
        proportion to the change; or the whole map when the log does not reach back
        that far. *min_version* (a version the caller knows exists) changes nothing: the
        catalog is read either way; it stays for callers that pass it.
        """
        with self._refresh_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> MapSnapshot:
        on_refresh = self.on_refresh
        if on_refresh is None:
            return self._read_changes()
        started = time.perf_counter()
        try:
            return self._read_changes()
        finally:
            on_refresh(time.perf_counter() - started)

    def _read_changes(self) -> MapSnapshot:
        current = self.snapshot
        checked = time.monotonic()
        # One statement: the version and the tenants changed since ours (nothing when
        # the map did not move), or None when the change log does not reach back.
        delta = self._catalog.map_delta(current.version)
        self._checked = checked
        if delta is not None and delta.version == current.version:
            return current
        fresh = current.apply(delta) if delta is not None else self._catalog.snapshot()
        if fresh.version > current.version:
            with self._changed:
                self.snapshot = fresh
                self._changed.notify_all()
            logger.debug("map version %d -> %d", current.version, fresh.version)
            if self._on_change is not None:
                self._on_change(fresh)
        return self.snapshot

    def close(self) -> None:
        """Stop the background thread and close the LISTEN connection."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._close_listener()

    # -- background ---------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if self._listen:
                    self._listen_once()
                else:
                    self._announce()
                    self._stop.wait(self._poll_interval)
                    if not self._stop.is_set():
                        self.refresh()
                backoff = 0.1
            except Exception as exc:  # the thread must outlive any failure
                self._close_listener()
                if self._stop.is_set():
                    break
                logger.warning(
                    "map refresh failed (%s); routing from map version %d, retrying in %.1fs",
                    _one_line(exc),
                    self.snapshot.version,
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _announce(self, why: str = "") -> None:
        """Say once, in one line, how map changes reach this process."""
        if self._announced:
            return
        if self._listen:
            logger.info("map changes: notified (LISTEN on %s)", mask_url(self._listen_url))
        else:
            logger.info("map changes: polled every %gs%s", self._poll_interval, why)
        with self._changed:
            self._announced = True
            self._changed.notify_all()

    def _listen_once(self) -> None:
        if self._listener is None:
            listener = self._connect_listener()
            if through_pooler(listener):
                with contextlib.suppress(psycopg.Error):
                    listener.close()
                self._listen = False
                self._announce(
                    f" ({mask_url(self._listen_url)} goes through a connection pooler, where "
                    "LISTEN delivers nothing: set TENANTRY_CATALOG_LISTEN_URL to the catalog "
                    "server's own URL to be notified)"
                )
                return
            self._announce()
            try:
                # Anything committed while we were not listening: catch up now, before
                # misses start relying on notifications.
                self.refresh()
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    listener.close()
                raise
            with self._changed:
                self._listener = listener
                self._changed.notify_all()
        deadline = time.monotonic() + self._poll_interval
        while not self._stop.is_set():
            # Short waits, so that close() is prompt without cancelling from outside.
            wait = min(_WAKE, deadline - time.monotonic())
            if wait <= 0:
                break
            for _notify in self._listener.notifies(timeout=wait, stop_after=1):
                self.refresh()
                return
        if not self._stop.is_set():
            self.refresh()  # the poll: a missed notification costs at most one interval

    def _connect_listener(self) -> psycopg.Connection[tuple[object, ...]]:
        conninfo = libpq_conninfo(
            self._listen_url,
            connect_timeout=max(1, round(self._catalog.settings.connect_timeout)),
            application_name="tenantry-map-listener",
        )
        conn = psycopg.connect(conninfo, autocommit=True)
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    def _close_listener(self) -> None:
        with self._changed:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(psycopg.Error):
                listener.close()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CatalogError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
