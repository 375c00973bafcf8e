"""tenantry's per-shard residency table: which tenants live here, and their state.

Revision ID: s0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "s0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenantry_residency",
        sa.Column("tenant_id", sa.String(63), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("map_version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('active', 'frozen', 'moved', 'incoming')",
            name="tenantry_residency_state",
        ),
    )


def downgrade() -> None:
    op.drop_table("tenantry_residency")
