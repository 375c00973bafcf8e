"""The test layer's PgBouncer: transaction mode, server connections shared by clients."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa

from tenantry.testing.pgbouncer import TempPgBouncer


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_clients_share_server_connections(pgbouncer: TempPgBouncer, pg_servers: list[str]) -> None:
    url = _conninfo(pgbouncer.url(pg_servers[0]))
    with psycopg.connect(url, autocommit=True) as a, psycopg.connect(url) as b:
        first = a.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
        # b holds a transaction open: a's next one cannot run on the connection b has
        held = b.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
        second = a.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
        b.rollback()
    assert first is not None and held is not None and second is not None
    # Transaction mode: two clients share one server connection, or one client's
    # transactions run on two.
    assert first[0] == held[0] or first[0] != second[0]
    # The server's port, not PgBouncer's: the server sits behind it.
    with psycopg.connect(url, autocommit=True) as conn:
        port = conn.execute("SELECT pg_catalog.inet_server_port()").fetchone()
    assert port is not None and port[0] == pgbouncer.server_port != pgbouncer.port


def test_added_users_are_admitted(pgbouncer: TempPgBouncer, pg_servers: list[str]) -> None:
    with psycopg.connect(_conninfo(pg_servers[0]), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS bouncer_probe")
        conn.execute("CREATE ROLE bouncer_probe LOGIN")
    url = sa.make_url(pgbouncer.url(pg_servers[0])).set(username="bouncer_probe")
    try:
        psycopg.connect(_conninfo(url.render_as_string(hide_password=False))).close()
    except psycopg.OperationalError as exc:
        assert "authentication failed" in str(exc)
    else:
        raise AssertionError("a user not in PgBouncer's list was admitted")
    pgbouncer.add_users("bouncer_probe")
    with psycopg.connect(_conninfo(url.render_as_string(hide_password=False))) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("bouncer_probe",)
