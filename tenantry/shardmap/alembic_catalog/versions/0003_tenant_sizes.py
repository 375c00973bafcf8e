"""Measured tenant sizes, for rebalancing plans."""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.columns import tenant_size_columns

revision = "c0003"
down_revision = "c0002"


def upgrade() -> None:
    op.create_table("tenantry_tenant_sizes", *tenant_size_columns())


def downgrade() -> None:
    op.drop_table("tenantry_tenant_sizes")
