"""Where routers, movers and fleet migrations turn observability on.

Each function returns None (or the object it was given) when nothing is on, without
importing ``prometheus_client`` or OpenTelemetry; the callers' hooks then cost one
``is None`` test, or nothing.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from tenantry.errors import ConfigurationError
from tenantry.settings import TenantrySettings

if TYPE_CHECKING:
    from tenantry.observability.metrics import Metrics
    from tenantry.observability.routing import RouterObserver

__all__ = ["detach_router", "observe_router", "resolve_metrics"]


def resolve_metrics(settings: TenantrySettings, metrics: Any = None) -> Metrics | None:
    """The Metrics to report to: *metrics* itself when it is a
    :class:`~tenantry.observability.metrics.Metrics` (of the caller's own registry), the
    process's default when *metrics* (or, when None, the ``metrics`` setting) is true,
    else None."""
    if metrics is None:
        metrics = settings.metrics
    if metrics is False:
        return None
    if metrics is not True:
        return metrics  # type: ignore[no-any-return]
    try:
        from tenantry.observability.metrics import default_metrics
    except ImportError:
        raise ConfigurationError(
            "metrics are on (TENANTRY_METRICS) but prometheus-client is not installed: "
            "pip install 'tenantry[observability]', or turn metrics off",
            field="metrics",
        ) from None
    return default_metrics(settings)


def observe_router(
    router: Any,
    cache: Any,
    engines: Any,
    settings: TenantrySettings,
    *,
    tenant_key: str,
    metrics: Any = None,
    traces: bool | None = None,
    statement_comments: bool | None = None,
) -> RouterObserver | None:
    """The observer of *router* (its map *cache* and its *engines*), or None when
    metrics, traces and statement comments are all off.

    With one on, the router's ``session`` and ``connection`` are wrapped (instance
    attributes over the methods: the methods themselves stay as they are), the map
    cache times its refreshes, and the router's gauges are read when scraped.
    """
    chosen = resolve_metrics(settings, metrics)
    tracing = settings.traces if traces is None else traces
    comments = settings.statement_comments if statement_comments is None else statement_comments
    if chosen is None and not tracing and not comments:
        return None
    from tenantry.observability.routing import RouterObserver

    tracer = None
    if tracing:
        from tenantry.observability.tracing import get_tracer

        tracer = get_tracer()
    observer = RouterObserver(
        metrics=chosen,
        tracer=tracer,
        comments=comments,
        tenant_key=tenant_key,
        shard_for=router.shard_for,
        map_version=lambda: cache.version,
    )
    if chosen is not None or tracer is not None:
        session, connection = router.session, router.connection
        wrap = observer.wrap_async if inspect.iscoroutinefunction(router.close) else observer.wrap

        def observed_session(tenant_id: str | None = None, **kwargs: Any) -> Any:
            return wrap(session(tenant_id, **kwargs), tenant_id)

        def observed_connection(tenant_id: str | None = None) -> Any:
            return wrap(connection(tenant_id), tenant_id)

        # Instance attributes over the methods: the unobserved router pays nothing.
        vars(router).update(session=observed_session, connection=observed_connection)
    if chosen is not None:
        cache.on_refresh = chosen.map_refresh_seconds.observe
        chosen.attach(router, _gauges(cache, engines))
    return observer


def detach_router(router: Any, observer: RouterObserver | None) -> None:
    """*router* closes: stop reading its gauges (its counters' totals stay)."""
    if observer is not None and observer.metrics is not None:
        observer.metrics.detach(router)


def _gauges(cache: Any, engines: Any) -> Any:
    from tenantry.observability.metrics import RouterGauges

    def read() -> RouterGauges:
        stats = engines.stats()
        opened, budgets, waits = engines.connections()
        return RouterGauges(
            map_version=cache.version,
            map_mode=cache.mode,
            engines_open=stats.engines,
            engines_evicted=stats.evicted,
            connections=opened,
            budgets=budgets,
            waits=waits,
        )

    return read
