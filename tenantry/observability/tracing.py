"""OpenTelemetry's tracer for tenantry's spans (the API only: a no-op without an SDK).

Imported only when the ``traces`` setting is on. The application sets up the SDK and
its exporters as usual; tenantry makes spans through ``opentelemetry.trace`` under the
instrumentation name ``tenantry``.
"""

from __future__ import annotations

from typing import Any

from tenantry.errors import ConfigurationError

__all__ = ["get_tracer", "span_failed"]


def get_tracer() -> Any:
    """The ``tenantry`` tracer; a clear error when opentelemetry-api is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigurationError(
            "traces are on (TENANTRY_TRACES) but opentelemetry-api is not installed: "
            "pip install 'tenantry[observability]', or turn traces off",
            field="traces",
        ) from None
    return trace.get_tracer("tenantry")


def span_failed(span: Any, exc: BaseException) -> None:
    """Mark *span* as failed by *exc* (recorded as an event, status ERROR)."""
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
