"""The catalog's fleet id (revision c0007): generated once, kept, its own per catalog."""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa

from tenantry import Catalog, load_settings
from tenantry.shardmap.scripts import CATALOG


def test_a_catalog_upgraded_from_c0006_gets_a_fleet_id_once(db_url: str, tmp_path: Path) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        CATALOG.upgrade(conn, "c0006")
        conn.execute(sa.text("UPDATE tenantry_map SET version = 7"))
    engine.dispose()
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as catalog:
        assert catalog.init() == CATALOG.head == "c0008"
        fleet_id = catalog.fleet_id()
        assert re.fullmatch(r"[0-9a-f]{8}", fleet_id)
        assert catalog.map_version() == 7  # the map is kept
        catalog.init()  # again: nothing changes
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as again:
        assert again.fleet_id() == fleet_id
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    with Catalog(other_url, settings=load_settings(catalog_url=other_url)) as other:
        other.init()
        assert re.fullmatch(r"[0-9a-f]{8}", other.fleet_id()) and other.fleet_id() != fleet_id
