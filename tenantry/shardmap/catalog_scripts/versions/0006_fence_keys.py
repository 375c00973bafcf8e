"""Each shard's fence key, for routers to sign the tenant of every transaction.

``tenantry_fence_keys`` holds, per shard, the key routers sign with (the newest one in
the shard's ``tenantry.fence_keys``; shard revision s0004). The catalog learns a
shard's key when it first needs it (from the shard, through its operations role) and
again at every ``tenantry shard rotate-key``. Whoever can read the catalog can sign:
the catalog is already where shard passwords live.

Revision ID: c0006
Revises: c0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0006"
down_revision = "c0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenantry_fence_keys",
        sa.Column("shard", sa.String(63), primary_key=True),
        sa.Column("key_id", sa.Integer, nullable=False),
        sa.Column("secret", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tenantry_fence_keys")
