"""A sample application used by ``tenantry demo``: EV-charger operator groups."""

from tenantry.demo.story import DEDICATED_TENANT, SHARED_TENANTS, DemoFleet, build_fleet

__all__ = ["DEDICATED_TENANT", "SHARED_TENANTS", "DemoFleet", "build_fleet"]
