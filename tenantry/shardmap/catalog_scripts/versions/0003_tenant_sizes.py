"""Measured tenant sizes, for rebalancing plans.

Revision ID: c0003
Revises: c0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0003"
down_revision = "c0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenantry_tenant_sizes",
        sa.Column("tenant_id", sa.String(63), primary_key=True),
        sa.Column("shard", sa.String(63), nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tenantry_tenant_sizes")
