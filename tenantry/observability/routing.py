"""What a router reports about its transactions: the observer its hooks call.

A router made with metrics, traces or statement comments on gets a
:class:`RouterObserver`; without any, none (its hooks then cost one ``is None`` test
per transaction, or nothing). The observer wraps each transaction's context manager
(``router.session(t)``, ``router.connection(t)``, sync and asyncio) in an
:class:`ObservedTransaction`, which times it from the router's call to the end of the
block, names its outcome, counts it, records its tenant's load and makes its span. The
router calls :meth:`RouterObserver.attempt_failed` for each attempt whose beginning
failed (a stale route refused at the fence, a dead connection, a frozen write,
...), retried or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from tenantry.errors import (
    CrossTenantWrite,
    LookupFailed,
    ShardUnavailable,
    StaleRoute,
    TenantFrozen,
)
from tenantry.observability.comments import install_comments
from tenantry.shardmap.model import Shard

if TYPE_CHECKING:
    from tenantry.observability.metrics import Metrics

__all__ = ["ObservedAsyncTransaction", "ObservedTransaction", "RouterObserver", "outcome_of"]

#: SQLSTATE insufficient_privilege: how row-level security refuses another tenant's row.
_REFUSED = "42501"


def outcome_of(exc: BaseException | None) -> str:
    """The outcome label of a routed transaction (or attempt) that ended with *exc*."""
    if exc is None:
        return "ok"
    if isinstance(exc, TenantFrozen):
        return "frozen"
    if isinstance(exc, CrossTenantWrite):
        return "cross_tenant_refused"
    if isinstance(exc, StaleRoute):
        return "stale_route_retry"
    if isinstance(exc, ShardUnavailable):
        return "shard_unavailable"
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == _REFUSED and "row-level security" in str(orig):
        return "cross_tenant_refused"  # the shard's policies refused it
    return "error"


class RouterObserver:
    """The metrics, tracer and comment settings of one router (see the module)."""

    def __init__(
        self,
        *,
        metrics: Metrics | None,
        tracer: Any,
        comments: bool,
        tenant_key: str,
        shard_for: Callable[[str], Shard],
        map_version: Callable[[], int],
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.comments = comments
        self.tenant_key = tenant_key
        self.shard_for = shard_for
        self.map_version = map_version
        self.otel_context: Any = None
        self.otel_trace: Any = None
        if tracer is not None:
            from opentelemetry import context, trace

            self.otel_context, self.otel_trace = context, trace

    def attempt_failed(self, shard: Shard, exc: BaseException) -> None:
        """An attempt to begin a transaction on *shard* raised *exc* (the router retries
        it or not): counted with its outcome."""
        if self.metrics is not None:
            self.metrics.counted(shard.name, outcome_of(exc))

    def configure_engine(self, engine: Engine) -> None:
        """A routed engine was made: comment its statements if asked to."""
        if self.comments:
            install_comments(engine, self.tenant_key)

    def wrap(self, transaction: Any, tenant_id: str | None) -> ObservedTransaction:
        """*transaction* (a sync routed session or connection) observed."""
        return ObservedTransaction(self, transaction, tenant_id)

    def wrap_async(self, transaction: Any, tenant_id: str | None) -> ObservedAsyncTransaction:
        """*transaction* (an asyncio routed session or connection) observed."""
        return ObservedAsyncTransaction(self, transaction, tenant_id)


class _Observed:
    """What the sync and asyncio wrappers share: start, began, failed, ended."""

    __slots__ = ("_inner", "_observer", "_shard", "_span", "_started", "_tenant", "_token")

    def __init__(self, observer: RouterObserver, inner: Any, tenant_id: str | None) -> None:
        self._observer = observer
        self._inner = inner
        self._tenant = tenant_id
        self._shard: Shard | None = None
        self._span: Any = None
        self._token: Any = None

    def _start(self) -> None:
        observer = self._observer
        tracer = observer.tracer
        if tracer is not None:
            self._span = span = tracer.start_span("tenantry.transaction")
            self._token = observer.otel_context.attach(
                observer.otel_trace.set_span_in_context(span)
            )
        self._started = time.perf_counter()

    def _began(self, entered: Any) -> None:
        """The transaction began (its fence passed): which tenant, which shard."""
        observer = self._observer
        tenant: str | None = entered.info.get(observer.tenant_key, self._tenant)
        self._tenant = tenant
        if tenant is not None:
            try:
                self._shard = observer.shard_for(tenant)
            except LookupFailed:  # removed meanwhile
                self._shard = None
        span = self._span
        if span is not None:
            shard = self._shard
            span.set_attribute("tenantry.tenant", tenant or "")
            if shard is not None:
                span.set_attribute("tenantry.shard", shard.name)
                span.set_attribute("tenantry.tier", shard.tier.value)
            span.set_attribute("tenantry.map_version", observer.map_version())

    def _ended(self, exc: BaseException | None, began: bool) -> None:
        """The transaction ended with *exc* (None: its block succeeded); *began* False
        when it never began (the router counted each failed attempt already)."""
        seconds = time.perf_counter() - self._started
        outcome = outcome_of(exc)
        metrics = self._observer.metrics
        shard = self._shard
        if began and metrics is not None and shard is not None and self._tenant is not None:
            metrics.finished(self._tenant, shard.name, outcome, seconds)
        span = self._span
        if span is not None:
            if self._tenant is not None and not began:
                span.set_attribute("tenantry.tenant", self._tenant)
            span.set_attribute("tenantry.outcome", outcome)
            if exc is not None:
                from tenantry.observability.tracing import span_failed

                span_failed(span, exc)
            span.end()
            self._observer.otel_context.detach(self._token)
            self._span = self._token = None


class ObservedTransaction(_Observed):
    """``with router.session(t) as s`` (or ``connection``), observed."""

    __slots__ = ()

    def __enter__(self) -> Any:
        self._start()
        try:
            entered = self._inner.__enter__()
        except BaseException as exc:
            self._ended(exc, began=False)
            raise
        self._began(entered)
        return entered

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> Any:
        try:
            suppress = self._inner.__exit__(exc_type, exc, traceback)
        except BaseException as raised:
            self._ended(raised, began=True)
            raise
        self._ended(None if suppress else exc, began=True)
        return suppress


class ObservedAsyncTransaction(_Observed):
    """``async with router.session(t) as s`` (or ``connection``), observed."""

    __slots__ = ()

    async def __aenter__(self) -> Any:
        self._start()
        try:
            entered = await self._inner.__aenter__()
        except BaseException as exc:
            self._ended(exc, began=False)
            raise
        self._began(entered)
        return entered

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> Any:
        try:
            suppress = await self._inner.__aexit__(exc_type, exc, traceback)
        except BaseException as raised:
            self._ended(raised, began=True)
            raise
        self._ended(None if suppress else exc, began=True)
        return suppress
