"""A shard's PostgreSQL server restarts (``pg_ctl restart -m fast``) while clients call
the API: requests during the restart get the documented retryable 503 or succeed,
requests after it succeed, and every acknowledged command is in the database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from evfleet import RETRYABLE, EvFleet, Writers, build_fleet, group, serve

from tenantry import Tier
from tenantry.testing import DatabaseFactory, NoPostgresAvailable, TempPostgres

GROUPS = ("voltpark", "chargecity")


@pytest.fixture
def shard_server() -> Iterator[TempPostgres]:
    """A PostgreSQL server of this test's own: restarting one of the suite's servers
    would break every other test's pooled connections."""
    try:
        server = TempPostgres.start(name="tenantry-evcharge")
    except NoPostgresAvailable as exc:
        pytest.fail(
            f"this test restarts a PostgreSQL server of its own and needs the server "
            f"binaries (initdb, pg_ctl): {exc}",
            pytrace=False,
        )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(make_pg_database: DatabaseFactory, shard_server: TempPostgres) -> Iterator[EvFleet]:
    with DatabaseFactory([shard_server.url]) as on_shard_server:
        built = build_fleet(
            make_pg_database(0),  # the catalog stays up: it is on the suite's server
            [("shared-1", on_shard_server(0), Tier.SHARED)],
            {tenant: "shared-1" for tenant in GROUPS},
        )
        try:
            yield built
        finally:
            built.close()


def _restart(server: TempPostgres) -> None:
    # As TempPostgres runs pg_ctl (as the postgres user when run as root); -w waits
    # until the server accepts connections again.
    server._pg_ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", str(server.log_file))


def test_shard_restart_under_traffic(fleet: EvFleet, shard_server: TempPostgres) -> None:
    with serve(fleet) as client:
        for tenant in GROUPS:
            made = client.post(
                "/chargers",
                headers=group(tenant),
                json={"name": f"{tenant} hub", "location": "Depot", "power_kw": "50"},
            )
            assert made.status_code == 201, made.text
        writers = [Writers(client, tenant, charger_id=1, threads=2) for tenant in GROUPS]
        for w in writers:
            w.start()
        try:
            for w in writers:
                w.wait_for(10)
            _restart(shard_server)
            for w in writers:
                w.wait_for(len(w.acked) + 10)  # writes go on after the restart
        finally:
            for w in writers:
                w.stop()

        for w in writers:
            assert w.failures == [], w.failures[:5]
            assert {status for _path, status, _body in w.retried} <= {RETRYABLE}

        # After the restart every request succeeds at the first attempt.
        for tenant in GROUPS:
            for i in range(5):
                sent = client.post(
                    "/chargers/1/commands",
                    headers={**group(tenant), "idempotency-key": f"after-{i}"},
                    json={"command": "stop"},
                )
                assert sent.status_code == 201, sent.text
                assert client.get("/stats", headers=group(tenant)).status_code == 200

    # Every acknowledged command is in the database, once, with its reported id.
    for w in writers:
        stored = {row[5]: row[1] for row in fleet.rows("shared-1", "charger_commands", w.tenant)}
        assert {k: v for k, v in stored.items() if not k.startswith("after-")} == w.acked
        assert sum(k.startswith("after-") for k in stored) == 5
    retried = [r for w in writers for r in w.retried]
    print(f"{sum(len(w.acked) for w in writers)} commands acknowledged, {len(retried)} 503s")
    for reason in sorted({body[:100] for _path, _status, body in retried}):
        print("  503:", reason)
