"""Core tables of the catalog and of tenantry's per-shard residency.

The Alembic scripts in ``tenantry/shardmap/alembic_catalog`` and ``.../alembic_shard``
create them; these declarations are how the code reads and writes them. A table's
columns as first created come from :mod:`tenantry.shardmap.columns`, which its creating
script uses too; columns that later revisions added are declared here.
"""

from __future__ import annotations

import sqlalchemy as sa

from tenantry.shardmap.columns import (
    fence_key_columns,
    move_columns,
    residency_columns,
    shard_columns,
    shard_identity_columns,
    tenant_columns,
    tenant_size_columns,
)

__all__ = [
    "catalog_metadata",
    "fence_keys",
    "map_changes",
    "map_table",
    "moves",
    "residency",
    "shard_identity",
    "shard_metadata",
    "shards",
    "tenant_sizes",
    "tenants",
]

catalog_metadata = sa.MetaData()

map_table = sa.Table(
    "tenantry_map",
    catalog_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    #: The oldest version from which map_changes is complete.
    sa.Column("changes_since", sa.BigInteger, nullable=False),
    #: Names this fleet's replication objects (c0007); NULL only before that revision.
    sa.Column("fleet_id", sa.String(16), nullable=True),
)

#: Which tenants each map version changed (routers refresh by it).
map_changes = sa.Table(
    "tenantry_map_changes",
    catalog_metadata,
    sa.Column("version", sa.BigInteger, nullable=False, index=True),
    sa.Column("tenant_id", sa.String(63), nullable=False),
)

shards = sa.Table(
    "tenantry_shards",
    catalog_metadata,
    *shard_columns(),
    #: The shard database's identity (``shard_identity.database_id``); NULL until known.
    sa.Column("database_id", sa.String(64), nullable=True),
    sa.Index("tenantry_shards_database_id", "database_id", unique=True),
    #: Whether ``url`` goes through a pooler in transaction mode (catalog revision c0008).
    sa.Column("pooled", sa.Boolean, nullable=False, server_default=sa.false()),
)

#: Each shard's current fence key (tenantry.shardmap.keys); never printed.
fence_keys = sa.Table("tenantry_fence_keys", catalog_metadata, *fence_key_columns())

tenants = sa.Table("tenantry_tenants", catalog_metadata, *tenant_columns())

moves = sa.Table("tenantry_moves", catalog_metadata, *move_columns())

tenant_sizes = sa.Table("tenantry_tenant_sizes", catalog_metadata, *tenant_size_columns())

shard_metadata = sa.MetaData()

residency = sa.Table("tenantry_residency", shard_metadata, *residency_columns())

#: One row: which database this is (see tenantry.shardmap.identity).
shard_identity = sa.Table("tenantry_shard_identity", shard_metadata, *shard_identity_columns())
