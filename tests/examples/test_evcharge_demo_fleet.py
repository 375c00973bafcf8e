"""`python -m examples.evcharge` with no catalog: the SQLite demo fleet is built when
missing (migrated with the example's revision, seeded) and reused when present."""

from __future__ import annotations

from pathlib import Path

from evfleet import group
from starlette.testclient import TestClient

from examples.evcharge.__main__ import demo_fleet
from examples.evcharge.app import create_app
from tenantry import Router, load_settings


def test_demo_fleet_is_built_once_and_served(tmp_path: Path) -> None:
    directory = tmp_path / "fleet"
    catalog_url = demo_fleet(directory)
    assert (directory / ".gitignore").read_text() == "*\n"
    settings = load_settings(catalog_url=catalog_url)
    with Router(settings=settings) as router, TestClient(create_app(router)) as client:
        chargers = client.get("/chargers", headers=group("voltpark")).json()
        assert [c["name"] for c in chargers] == [f"voltpark charger {i}" for i in (1, 2, 3)]
        utility = client.get("/stats", headers=group("nordgrid-utility")).json()
        assert utility["home"] == {"shard": "nordgrid", "tier": "dedicated"}
        assert utility["sessions"] > 0
        sent = client.post(
            "/chargers/1/commands",
            headers={**group("voltpark", subdomain=True), "idempotency-key": "k1"},
            json={"command": "unlock"},
        )
        assert sent.status_code == 201, sent.text  # charger_commands exists: e0001 ran

    # Run again: the same fleet, with the command made above; --reset builds it anew.
    assert demo_fleet(directory) == catalog_url
    with Router(settings=settings) as router, TestClient(create_app(router)) as client:
        commands = client.get("/commands", headers=group("voltpark")).json()
        assert [c["client_ref"] for c in commands] == ["k1"]
    demo_fleet(directory, reset=True)
    with Router(settings=settings) as router, TestClient(create_app(router)) as client:
        assert client.get("/commands", headers=group("voltpark")).json() == []
