"""Serving the metrics: a ``/metrics`` ASGI app, or the exposition text for any server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tenantry.observability.hooks import resolve_metrics
from tenantry.settings import load_settings

if TYPE_CHECKING:
    from tenantry.observability.metrics import Metrics

__all__ = ["METRICS_CONTENT_TYPE", "metrics_app", "metrics_text"]

#: The content type of :func:`metrics_text` (Prometheus' text format 0.0.4).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _registry(metrics: Metrics | None) -> Any:
    if metrics is None:
        metrics = resolve_metrics(load_settings(), True)
    assert metrics is not None
    return metrics.registry


def metrics_text(metrics: Metrics | None = None) -> str:
    """The metrics in Prometheus' text format (serve it as :data:`METRICS_CONTENT_TYPE`):
    *metrics*' registry, or the default one (every collector in it, tenantry's too)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(metrics)).decode()


def metrics_app(metrics: Metrics | None = None) -> Any:
    """An ASGI app that serves the metrics (``prometheus_client``'s, with OpenMetrics
    negotiation and gzip): ``app.mount("/metrics", metrics_app())``."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=_registry(metrics))
