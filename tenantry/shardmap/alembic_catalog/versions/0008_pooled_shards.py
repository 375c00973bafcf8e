"""Which shards are routed through a connection pooler in transaction mode.

``tenantry_shards.pooled`` is true when the shard's routing URL reaches the server
through a pooler that shares server connections between clients (PgBouncer in
transaction mode, RDS Proxy and the like): routers then use no server-side prepared
statements there and sign the fence for each transaction (shard revision s0005).
Detected when the shard is added (or said with ``--pooled``); false for every shard
registered before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0008"
down_revision = "c0007"


def upgrade() -> None:
    with op.batch_alter_table("tenantry_shards") as batch:
        batch.add_column(sa.Column("pooled", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("tenantry_shards") as batch:
        batch.drop_column("pooled")
