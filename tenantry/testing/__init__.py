"""Real PostgreSQL for tenantry's tests and benchmarks: servers and throwaway databases."""

from __future__ import annotations

from tenantry.testing.databases import DatabaseFactory, create_database, drop_database
from tenantry.testing.postgres import PostgresServers, docker_available
from tenantry.testing.server import (
    DEFAULT_SETTINGS,
    DOCKER_IMAGE,
    URLS_ENV,
    NoPostgresAvailable,
    TempPostgres,
    TempPostgresError,
    find_pg_bindir,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "DOCKER_IMAGE",
    "URLS_ENV",
    "DatabaseFactory",
    "NoPostgresAvailable",
    "PostgresServers",
    "TempPostgres",
    "TempPostgresError",
    "create_database",
    "docker_available",
    "drop_database",
    "find_pg_bindir",
]
