"""Fleets whose shards are routed through PgBouncer in transaction mode."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tenantry.testing.pgbouncer import TempPgBouncer
from tests.router.conftest import (  # noqa: F401 (fixtures)
    APP_ROLE,
    _pg_seeded,
    app_role,
    pg_fleet_builder,
)


@pytest.fixture(scope="session")
def pgbouncer_1(pg_servers: list[str]) -> Iterator[TempPgBouncer]:
    """Like the suite's ``pgbouncer`` fixture, in front of server 1 (whose databases a
    fleet's second shard lives in): transaction mode, two server connections."""
    bouncer = TempPgBouncer.start(pg_servers[1], users=("postgres", APP_ROLE))
    try:
        yield bouncer
    finally:
        bouncer.stop()


def pgbouncer_stats(bouncer: TempPgBouncer) -> dict[str, int]:
    """Transactions PgBouncer has passed on, per database (its ``SHOW STATS``; the admin
    console speaks the simple query protocol only)."""
    conninfo = f"host=127.0.0.1 port={bouncer.port} dbname=pgbouncer user=postgres"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        result = conn.pgconn.exec_(b"SHOW STATS")
        names = [result.fname(i).decode() for i in range(result.nfields)]
        found = {}
        for row in range(result.ntuples):
            cells = (result.get_value(row, i) for i in range(result.nfields))
            values = dict(zip(names, cells, strict=True))
            found[(values["database"] or b"").decode()] = int(values["total_xact_count"] or 0)
        return found
