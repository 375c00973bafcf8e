"""evcharge: an EV-charger operator's API on tenantry (FastAPI).

Charger groups (operator groups) are the tenants. Each group's drivers, chargers,
charging sessions and charger commands live wherever tenantry's shard map puts the
group: a shared database of the pool, or a dedicated one (the regulated utility).
See ``examples/evcharge/README.md``.
"""

from pathlib import Path as _Path

#: The example's Alembic configuration: the demo app's revisions plus its own.
ALEMBIC_CONFIG = _Path(__file__).resolve().parent / "migrations" / "alembic.ini"
