"""The shard map: map version, shards, tenants.

Revision ID: c0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0001"
down_revision = None
branch_labels = None
depends_on = None


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
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("admin_url", sa.Text, nullable=True),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("tier IN ('shared', 'dedicated')", name="tenantry_shards_tier"),
        sa.CheckConstraint(
            "state IN ('active', 'draining', 'retired')", name="tenantry_shards_state"
        ),
        sa.CheckConstraint("weight >= 0", name="tenantry_shards_weight"),
    )
    op.create_table(
        "tenantry_tenants",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column(
            "shard",
            sa.String(63),
            sa.ForeignKey("tenantry_shards.name", name="tenantry_tenants_shard_fk"),
            nullable=False,
        ),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("tier IN ('shared', 'dedicated')", name="tenantry_tenants_tier"),
    )
    op.create_index("tenantry_tenants_by_shard", "tenantry_tenants", ["shard"])


def downgrade() -> None:
    op.drop_index("tenantry_tenants_by_shard", table_name="tenantry_tenants")
    op.drop_table("tenantry_tenants")
    op.drop_table("tenantry_shards")
    op.drop_table("tenantry_map")
