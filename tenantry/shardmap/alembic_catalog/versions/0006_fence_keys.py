"""Each shard's fence key, for routers to sign the tenant of every transaction.

``tenantry_fence_keys`` holds, per shard, the key routers sign with (the newest one in
the shard's ``tenantry.fence_keys``; shard revision s0004). The catalog learns a
shard's key when it first needs it (from the shard, through its operations role) and
again at every ``tenantry shard rotate-key``. Whoever can read the catalog can sign:
the catalog is already where shard passwords live.
"""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.columns import fence_key_columns

revision = "c0006"
down_revision = "c0005"


def upgrade() -> None:
    op.create_table("tenantry_fence_keys", *fence_key_columns())


def downgrade() -> None:
    op.drop_table("tenantry_fence_keys")
