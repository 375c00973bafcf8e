"""Core tables of the catalog and of tenantry's per-shard residency.

The Alembic scripts in ``tenantry/shardmap/catalog_scripts`` and ``.../shard_scripts``
create them; these declarations are how the code reads and writes them.
"""

from __future__ import annotations

import sqlalchemy as sa

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
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("admin_url", sa.Text, nullable=True),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("weight", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    #: The shard database's identity (``shard_identity.database_id``); NULL until known.
    sa.Column("database_id", sa.String(64), nullable=True),
    sa.Index("tenantry_shards_database_id", "database_id", unique=True),
)

#: Each shard's current fence key (tenantry.shardmap.keys); never printed.
fence_keys = sa.Table(
    "tenantry_fence_keys",
    catalog_metadata,
    sa.Column("shard", sa.String(63), primary_key=True),
    sa.Column("key_id", sa.Integer, nullable=False),
    sa.Column("secret", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

tenants = sa.Table(
    "tenantry_tenants",
    catalog_metadata,
    sa.Column("id", sa.String(63), primary_key=True),
    sa.Column("shard", sa.String(63), sa.ForeignKey("tenantry_shards.name"), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("pinned", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

moves = sa.Table(
    "tenantry_moves",
    catalog_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(63), nullable=False),
    sa.Column("source", sa.String(63), nullable=False),
    sa.Column("target", sa.String(63), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("stats", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
)

tenant_sizes = sa.Table(
    "tenantry_tenant_sizes",
    catalog_metadata,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("shard", sa.String(63), nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
)

shard_metadata = sa.MetaData()

residency = sa.Table(
    "tenantry_residency",
    shard_metadata,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("map_version", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

#: One row: which database this is (see tenantry.shardmap.identity).
shard_identity = sa.Table(
    "tenantry_shard_identity",
    shard_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("database_id", sa.String(64), nullable=False),
    sa.Column("system_identifier", sa.String(32), nullable=True),
    sa.Column("database_oid", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
