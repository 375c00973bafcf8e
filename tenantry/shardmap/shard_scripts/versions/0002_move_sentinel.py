"""The sentinel table of online moves.

Inside an online move's freeze the mover writes a row here on the source; when it
arrives on the target through the row-filtered subscription, the target provably has
every write acknowledged before the freeze.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "s0002"
down_revision = "s0001"


def upgrade() -> None:
    op.create_table(
        "tenantry_move_sentinel",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("move_id", sa.Integer, nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "move_id"),
    )


def downgrade() -> None:
    op.drop_table("tenantry_move_sentinel")
