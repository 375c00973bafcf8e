"""A sample application used by ``tenantry demo``: EV-charger operator groups."""

from pathlib import Path as _Path

from tenantry.demo.story import (
    DEDICATED_TENANT,
    GROWING_TENANT,
    OVERPROVISIONED_TENANT,
    SHARED_TENANTS,
    Census,
    DemoFleet,
    build_fleet,
    census,
    seed,
)

#: The demo app's Alembic script directory (``--alembic-config`` accepts it).
MIGRATIONS = _Path(__file__).resolve().parent / "migrations"

__all__ = [
    "DEDICATED_TENANT",
    "GROWING_TENANT",
    "MIGRATIONS",
    "OVERPROVISIONED_TENANT",
    "SHARED_TENANTS",
    "Census",
    "DemoFleet",
    "build_fleet",
    "census",
    "seed",
]
