"""The evcharge API keeps charger groups apart: over HTTP, a group never sees or
changes another group's chargers, sessions or commands, even in the same shared
database with the same ids; another group's ids are 404s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from evfleet import EvFleet, build_fleet, group, serve
from starlette.testclient import TestClient

from tenantry import Tier
from tenantry.testing import DatabaseFactory

VOLT = "voltpark"  # shared, 1 charger
CITY = "chargecity"  # shared, same database as voltpark, 3 chargers
UTILITY = "nordgrid-utility"  # dedicated


@pytest.fixture
def fleet(make_pg_database: DatabaseFactory) -> Iterator[EvFleet]:
    built = build_fleet(
        make_pg_database(0),
        [
            ("shared-1", make_pg_database(0), Tier.SHARED),
            ("utility-db", make_pg_database(1), Tier.DEDICATED),
        ],
        {VOLT: "shared-1", CITY: "shared-1", UTILITY: "utility-db"},
    )
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def client(fleet: EvFleet) -> Iterator[TestClient]:
    with serve(fleet) as client:
        yield client


def _ok(response: httpx2.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def _populate(client: TestClient, tenant: str, chargers: int) -> None:
    """A driver, *chargers* chargers, a session on the last one, a command to each."""
    h = group(tenant)
    _ok(client.post("/users", headers=h, json={"email": f"d@{tenant}.example", "name": "D"}), 201)
    for i in range(1, chargers + 1):
        made = _ok(
            client.post(
                "/chargers",
                headers=h,
                json={"name": f"{tenant} charger {i}", "location": "Bay", "power_kw": "50"},
            ),
            201,
        )
        assert made["id"] == i  # every group's ids count from 1
        _ok(client.post(f"/chargers/{i}/commands", headers=h, json={"command": "reboot"}), 201)
    _ok(client.post(f"/chargers/{chargers}/sessions", headers=h, json={"user_id": 1}), 201)


def test_groups_see_and_change_only_their_own_rows(fleet: EvFleet, client: TestClient) -> None:
    for tenant, chargers in ((VOLT, 1), (CITY, 3), (UTILITY, 2)):
        _populate(client, tenant, chargers)
    volt, city = group(VOLT), group(CITY)

    # Listings: only the group's own rows, by the names each group gave them.
    for tenant, chargers in ((VOLT, 1), (CITY, 3), (UTILITY, 2)):
        h = group(tenant)
        names = [c["name"] for c in client.get("/chargers", headers=h).json()]
        assert names == [f"{tenant} charger {i}" for i in range(1, chargers + 1)]
        assert len(client.get("/commands", headers=h).json()) == chargers
        sessions = client.get("/sessions", headers=h).json()
        assert [(s["charger_id"], s["active"]) for s in sessions] == [(chargers, True)]
        stats = _ok(client.get("/stats", headers=h))
        assert stats["group"] == tenant
        idle = {"available": chargers - 1} if chargers > 1 else {}
        assert stats["chargers"] == {"charging": 1, **idle}
        assert stats["commands"] == {"pending": chargers}
        assert stats["users"] == 1
    assert _ok(client.get("/stats", headers=group(UTILITY)))["home"] == {
        "shard": "utility-db",
        "tier": "dedicated",
    }

    # chargecity's ids 2 and 3 do not exist for voltpark: reads and writes are 404s.
    for path in ("/chargers/2", "/chargers/3", "/commands/2", "/commands/3"):
        missing = client.get(path, headers=volt)
        assert missing.status_code == 404, path
        assert missing.json()["error"].endswith("not found")
    assert client.get("/sessions/1", headers=volt).status_code == 200  # its own session 1
    assert client.patch("/commands/3", headers=volt, json={"status": "accepted"}).status_code == 404
    assert (
        client.post("/chargers/3/commands", headers=volt, json={"command": "stop"}).status_code
        == 404
    )
    assert client.post("/chargers/2/sessions", headers=volt, json={"user_id": 1}).status_code == 404

    # The same id in both groups: voltpark's changes reach only its own rows.
    stopped = _ok(client.post("/sessions/1/stop", headers=volt, json={"energy_kwh": "12.5"}))
    assert stopped["active"] is False
    _ok(client.patch("/commands/1", headers=volt, json={"status": "accepted"}))
    city_session = _ok(client.get("/sessions/1", headers=city))
    assert city_session["active"] is True and city_session["charger_id"] == 3
    assert _ok(client.get("/commands/1", headers=city))["status"] == "pending"
    assert _ok(client.get("/chargers/3", headers=city))["status"] == "charging"
    # voltpark stopped its session 1 again: 409, and chargecity's session 1 stays open.
    assert (
        client.post("/sessions/1/stop", headers=volt, json={"energy_kwh": "1"}).status_code == 409
    )
    assert _ok(client.get("/sessions/1", headers=city))["active"] is True

    # A tenant_id in a body is not the client's to choose: the row is voltpark's.
    made = _ok(
        client.post(
            "/chargers",
            headers=volt,
            json={"name": "sneaky", "location": "x", "power_kw": "7", "tenant_id": CITY},
        ),
        201,
    )
    assert made["id"] == 2
    assert "sneaky" not in [c["name"] for c in client.get("/chargers", headers=city).json()]

    # In the database: each group's rows carry its own tenant_id, as the API reported.
    assert [r[2] for r in fleet.rows("shared-1", "chargers", VOLT)] == [
        "voltpark charger 1",
        "sneaky",
    ]
    assert [r[2] for r in fleet.rows("shared-1", "chargers", CITY)] == [
        f"chargecity charger {i}" for i in (1, 2, 3)
    ]
    assert [r[4] for r in fleet.rows("shared-1", "charger_commands", VOLT)] == ["accepted"]
    assert [r[4] for r in fleet.rows("shared-1", "charger_commands", CITY)] == ["pending"] * 3
    assert fleet.rows("shared-1", "chargers", UTILITY) == []
    assert len(fleet.rows("utility-db", "chargers", UTILITY)) == 2


def test_the_group_comes_from_the_subdomain_or_the_header(client: TestClient) -> None:
    _populate(client, VOLT, 1)
    _populate(client, CITY, 3)
    by_host = client.get("/chargers", headers=group(CITY, subdomain=True)).json()
    assert [c["name"] for c in by_host] == [f"chargecity charger {i}" for i in (1, 2, 3)]
    # The port does not matter; the same group twice is one group.
    both = {"host": f"{VOLT}.evcharge.example:8000", "x-tenant": VOLT}
    same = client.get("/chargers", headers=both)
    assert same.status_code == 200 and [c["name"] for c in same.json()] == ["voltpark charger 1"]

    two = client.get("/chargers", headers={"host": f"{VOLT}.evcharge.example", "x-tenant": CITY})
    assert two.status_code == 400 and "invalid tenant id" in two.json()["error"]
    none = client.get("/chargers")
    assert none.status_code == 400 and "x-tenant" in none.json()["error"]
    unknown = client.get("/chargers", headers=group("nobody"))
    assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]
    bad = client.get("/chargers", headers=group("Volt Park"))
    assert bad.status_code == 400
    assert client.get("/healthz").status_code == 200  # exempt: no group needed
