"""The catalog: the SQL store of the shard map (SQLite or PostgreSQL, same code).

:class:`Catalog` is assembled from one part per job, each a module of its own:
``store`` (engine, schema revision, transactions that bump and announce the map
version), ``reads`` (snapshots and changes for routers), ``shards``
(shard registration, fence keys), ``tenants`` (the tenant directory) and ``listing``
(targeted reads for listings and look-ups of one tenant or shard).
"""

from __future__ import annotations

from tenantry.shardmap.catalog.listing import MapListing
from tenantry.shardmap.catalog.reads import MapReads
from tenantry.shardmap.catalog.shards import ShardRegistry, prepare_shard
from tenantry.shardmap.catalog.store import NOTIFY_CHANNEL
from tenantry.shardmap.catalog.tenants import TenantDirectory, set_residency

__all__ = ["NOTIFY_CHANNEL", "Catalog", "catalog_of", "prepare_shard", "set_residency"]


class Catalog(MapReads, MapListing, ShardRegistry, TenantDirectory):
    """The shard map's store.

    ``Catalog()`` opens the catalog named by the settings (``TENANTRY_CATALOG_URL``,
    by default a SQLite file under ``./.tenantry/``). Run :meth:`init` once to create
    or upgrade its schema.
    """


def catalog_of(target: object) -> Catalog:
    """*target* when it is a :class:`Catalog`, else its ``catalog`` (a router's); what
    the fleet migrations, provisioning and moves accept as "a catalog or a router"."""
    if isinstance(target, Catalog):
        return target
    catalog = getattr(target, "catalog", None)
    if isinstance(catalog, Catalog):
        return catalog
    raise TypeError(f"expected a Catalog or a Router, got {type(target).__name__}")
