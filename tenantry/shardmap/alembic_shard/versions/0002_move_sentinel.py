"""The sentinel table of online moves.

Inside an online move's freeze the mover writes a row here on the source; when it
arrives on the target through the row-filtered subscription, the target provably has
every write acknowledged before the freeze.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tenantry.shardmap.columns import move_sentinel_columns

revision = "s0002"
down_revision = "s0001"


def upgrade() -> None:
    op.create_table(
        "tenantry_move_sentinel",
        *move_sentinel_columns(),
        sa.PrimaryKeyConstraint("tenant_id", "move_id"),
    )


def downgrade() -> None:
    op.drop_table("tenantry_move_sentinel")
