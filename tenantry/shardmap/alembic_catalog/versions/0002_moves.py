"""The move journal: one row per move, its state committed before each step acts."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantry.shardmap.columns import move_columns

revision = "c0002"
down_revision = "c0001"


def upgrade() -> None:
    op.create_table(
        "tenantry_moves",
        *move_columns(),
        sa.CheckConstraint(
            "state IN ('planned', 'frozen', 'copied', 'verified', 'switched', 'cleaned', "
            "'aborted')",
            name="tenantry_moves_state",
        ),
    )
    # One live move per tenant, enforced by the catalog itself (safe across processes).
    op.create_index(
        "tenantry_moves_one_live",
        "tenantry_moves",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("tenantry_moves_one_live", table_name="tenantry_moves")
    op.drop_table("tenantry_moves")
