"""A sample application used by ``tenantry demo``: EV-charger operator groups."""

from tenantry.demo.story import DEDICATED_TENANT, SHARED_TENANTS, DemoFleet, build_fleet

__all__ = ["DEDICATED_TENANT", "MIGRATIONS", "SHARED_TENANTS", "DemoFleet", "build_fleet"]

from pathlib import Path as _Path

#: The demo app's Alembic script directory (``--alembic-config`` accepts it).
MIGRATIONS = _Path(__file__).resolve().parent / "migrations"
