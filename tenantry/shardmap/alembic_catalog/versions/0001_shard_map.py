"""The shard map: map version, shards, tenants."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantry.shardmap.columns import shard_columns, tenant_columns

revision = "c0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenantry_map",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="tenantry_map_one_row"),
    )
    op.execute("INSERT INTO tenantry_map (id, version) VALUES (1, 1)")
    op.create_table(
        "tenantry_shards",
        *shard_columns(),
        sa.CheckConstraint("tier IN ('shared', 'dedicated')", name="tenantry_shards_tier"),
        sa.CheckConstraint(
            "state IN ('active', 'draining', 'retired')", name="tenantry_shards_state"
        ),
        sa.CheckConstraint("weight >= 0", name="tenantry_shards_weight"),
    )
    op.create_table(
        "tenantry_tenants",
        *tenant_columns(),
        sa.CheckConstraint("tier IN ('shared', 'dedicated')", name="tenantry_tenants_tier"),
    )
    op.create_index("tenantry_tenants_by_shard", "tenantry_tenants", ["shard"])


def downgrade() -> None:
    op.drop_index("tenantry_tenants_by_shard", table_name="tenantry_tenants")
    op.drop_table("tenantry_tenants")
    op.drop_table("tenantry_shards")
    op.drop_table("tenantry_map")
