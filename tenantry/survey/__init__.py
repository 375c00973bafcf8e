"""Surveying the fleet: its status (``tenantry status``) and its busiest tenants
(``tenantry top``).

- :mod:`~tenantry.survey.status` — every shard checked at once: reachability, schema
  revisions, tenants, bytes, connections, replication slots; live moves' progress;
- :mod:`~tenantry.survey.top` — load per tenant and shard, sampled from the servers'
  ``pg_stat_activity`` and ``pg_stat_database`` and, optionally, read from the routers'
  Prometheus counters (:mod:`~tenantry.survey.scrape`); a shared shard's statements
  are attributed by the sqlcommenter comment routers write
  (:mod:`tenantry.observability.comments`, which reads it back too).
"""

from __future__ import annotations

from tenantry.survey.status import FleetStatus, fleet_status
from tenantry.survey.top import Top, TopReport

__all__ = ["FleetStatus", "Top", "TopReport", "fleet_status"]
