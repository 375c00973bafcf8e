"""Fleets whose shards are routed through PgBouncer in transaction mode."""

from __future__ import annotations

from tests.router.conftest import (  # noqa: F401 (fixtures)
    _pg_seeded,
    app_role,
    pg_fleet_builder,
)
