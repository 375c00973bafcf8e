"""Seeing the fleet: Prometheus metrics, OpenTelemetry traces, statements that name
their tenant. All optional (the ``observability`` extra) and off by default; nothing
here imports ``prometheus_client`` or OpenTelemetry until a setting turns them on.

- :mod:`~tenantry.observability.metrics`: every metric, in one :class:`Metrics` per
  registry; :func:`metrics_app` and :func:`metrics_text` serve them;
- :mod:`~tenantry.observability.topn`: the busiest tenants in bounded memory
  (:class:`TopTenants`, Space-Saving with decayed counts);
- :mod:`~tenantry.observability.routing`: the routers' observer and transaction
  wrappers; :mod:`~tenantry.observability.moves`: movers' and migrations';
- :mod:`~tenantry.observability.comments`: sqlcommenter comments
  (:func:`statement_route` names the application's route);
- :mod:`~tenantry.observability.hooks`: where the library turns them on.
"""

from tenantry.observability.comments import current_route, sqlcomment, statement_route
from tenantry.observability.exposition import METRICS_CONTENT_TYPE, metrics_app, metrics_text
from tenantry.observability.topn import TenantLoad, TopTenants

__all__ = [
    "METRICS_CONTENT_TYPE",
    "TenantLoad",
    "TopTenants",
    "current_route",
    "metrics_app",
    "metrics_text",
    "sqlcomment",
    "statement_route",
]
