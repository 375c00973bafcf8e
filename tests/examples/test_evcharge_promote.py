"""Promoting a charger group to a dedicated database while clients keep calling the
API: every request is answered or gets the documented retryable 503, and every
acknowledged command is at the group's new home afterwards, once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from evfleet import RETRYABLE, EvFleet, Writers, build_fleet, group, serve

from tenantry import Catalog, Tier
from tenantry.moves import promote
from tenantry.testing import DatabaseFactory

GROWING = "voltpark"
NEIGHBOUR = "chargecity"  # stays in the shared database


@pytest.fixture
def fleet(make_pg_database: DatabaseFactory) -> Iterator[EvFleet]:
    built = build_fleet(
        make_pg_database(0),
        [
            ("shared-1", make_pg_database(0), Tier.SHARED),
            ("voltpark-db", make_pg_database(1), Tier.DEDICATED),  # empty until promoted
        ],
        {GROWING: "shared-1", NEIGHBOUR: "shared-1"},
    )
    try:
        yield built
    finally:
        built.close()


def test_promote_under_traffic_loses_no_acknowledged_write(fleet: EvFleet) -> None:
    with serve(fleet) as client:
        for tenant in (GROWING, NEIGHBOUR):
            made = client.post(
                "/chargers",
                headers=group(tenant),
                json={"name": f"{tenant} hub", "location": "Depot", "power_kw": "150"},
            )
            assert made.status_code == 201, made.text
        neighbour = Writers(client, NEIGHBOUR, charger_id=1, threads=1)
        writers = Writers(client, GROWING, charger_id=1, threads=3)
        writers.start()
        neighbour.start()
        try:
            writers.wait_for(15)
            # The operator's own catalog, as `tenantry promote` would open it.
            with Catalog(settings=fleet.settings) as operator:
                started = time.monotonic()
                move = promote(operator, GROWING, to="voltpark-db")
                took = time.monotonic() - started
            before = len(writers.acked)
            writers.wait_for(before + 15)  # and the group goes on at its new home
            neighbour.wait_for(5)
        finally:
            writers.stop()
            neighbour.stop()

        assert writers.failures == [], writers.failures[:5]
        assert neighbour.failures == [], neighbour.failures[:5]
        assert {status for _path, status, _body in writers.retried} <= {RETRYABLE}
        assert move.state.value in ("switched", "cleaned"), move
        assert fleet.catalog.get_tenant(GROWING).shard == "voltpark-db"
        stats = client.get("/stats", headers=group(GROWING)).json()
        assert stats["home"] == {"shard": "voltpark-db", "tier": "dedicated"}
        assert stats["commands"] == {"pending": len(writers.acked)}

    # At the new home, read directly: every acknowledged command, with the id the API
    # reported, and nothing else; none left in the shared database.
    home = {row[5]: row[1] for row in fleet.rows("voltpark-db", "charger_commands", GROWING)}
    assert home == writers.acked
    assert fleet.rows("shared-1", "charger_commands", GROWING) == []
    assert fleet.rows("shared-1", "chargers", GROWING) == []
    stayed = {row[5]: row[1] for row in fleet.rows("shared-1", "charger_commands", NEIGHBOUR)}
    assert stayed == neighbour.acked
    assert fleet.rows("voltpark-db", "charger_commands", NEIGHBOUR) == []
    print(
        f"promote took {took:.2f}s ({move.mode.value}); {len(writers.acked)} commands "
        f"acknowledged, {len(writers.retried)} retried 503s"
    )
    for reason in sorted({body[:90] for _path, _status, body in writers.retried}):
        print("  503:", reason)
