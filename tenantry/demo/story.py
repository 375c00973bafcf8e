"""The seed story: EV-charger operator groups sharing a fleet.

Most operator groups are small and share two databases; one, a municipal utility
bound by its regulator to keep its data apart, has a database of its own.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from tenantry.errors import AlreadyExists
from tenantry.settings import load_settings
from tenantry.shardmap import Catalog, MapSnapshot, Tier

__all__ = ["DEDICATED_TENANT", "SHARED_TENANTS", "DemoFleet", "build_fleet"]

#: Operator groups that share the pool.
SHARED_TENANTS = (
    "voltpark",
    "chargecity",
    "greenmile",
    "fjord-ev",
    "sunfleet",
    "metro-charge",
    "amp-alley",
)
#: The regulated municipal utility, on a database of its own.
DEDICATED_TENANT = "nordgrid-utility"


@dataclass(frozen=True)
class DemoFleet:
    """Where the demo fleet lives, and its map once built."""

    directory: Path
    catalog_url: str
    snapshot: MapSnapshot


def build_fleet(directory: Path | str = ".tenantry-demo") -> DemoFleet:
    """Create (or reuse) the demo fleet in *directory*: safe to run again."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    catalog_url = f"sqlite:///{directory / 'catalog.db'}"
    with Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url)) as catalog:
        catalog.init()
        for name, tier in (
            ("shared-1", Tier.SHARED),
            ("shared-2", Tier.SHARED),
            ("nordgrid", Tier.DEDICATED),
        ):
            _ignore_existing(
                lambda n=name, t=tier: catalog.add_shard(
                    n, f"sqlite:///{directory / (n + '.db')}", tier=t
                )
            )
        for tenant in SHARED_TENANTS:
            _ignore_existing(lambda t=tenant: catalog.add_tenant(t))
        _ignore_existing(
            lambda: catalog.add_tenant(DEDICATED_TENANT, tier=Tier.DEDICATED, shard="nordgrid")
        )
        return DemoFleet(directory, catalog_url, catalog.snapshot())


def _ignore_existing(action: object) -> None:
    assert callable(action)
    with suppress(AlreadyExists):
        action()
