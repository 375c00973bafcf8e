"""tenantry's per-shard residency table: which tenants live here, and their state."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantry.shardmap.columns import residency_columns

revision = "s0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenantry_residency",
        *residency_columns(),
        sa.CheckConstraint(
            "state IN ('active', 'frozen', 'moved', 'incoming')",
            name="tenantry_residency_state",
        ),
    )


def downgrade() -> None:
    op.drop_table("tenantry_residency")
