"""A sample application used by ``tenantry demo``: EV-charger operator groups."""

from tenantry.demo.story import (
    DEDICATED_TENANT,
    GROWING_TENANT,
    MIGRATIONS,
    OVERPROVISIONED_TENANT,
    SHARED_TENANTS,
    Census,
    DemoFleet,
    StoryReport,
    build_fleet,
    census,
    seed,
    tell_story,
)

__all__ = [
    "DEDICATED_TENANT",
    "GROWING_TENANT",
    "MIGRATIONS",
    "OVERPROVISIONED_TENANT",
    "SHARED_TENANTS",
    "Census",
    "DemoFleet",
    "StoryReport",
    "build_fleet",
    "census",
    "seed",
    "tell_story",
]
