"""Each shard's database identity, so one database cannot be registered twice.

``tenantry_shards.database_id`` is the id recorded in the shard database's
``tenantry_shard_identity`` row (shard revision s0003). It is unique: two shard names
for one database (its URL spelled two ways) are refused at registration. It is NULL for
shards registered before this revision until ``tenantry migrate upgrade`` fills it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0005"
down_revision = "c0004"


def upgrade() -> None:
    # A plain ADD COLUMN and a unique index rather than a batch (table-copying) alter:
    # on SQLite, recreating tenantry_shards would trip the foreign keys of
    # tenantry_tenants. Both databases allow many NULLs under a unique index.
    op.add_column("tenantry_shards", sa.Column("database_id", sa.String(64), nullable=True))
    op.create_index("tenantry_shards_database_id", "tenantry_shards", ["database_id"], unique=True)


def downgrade() -> None:
    op.drop_index("tenantry_shards_database_id", table_name="tenantry_shards")
    op.drop_column("tenantry_shards", "database_id")  # SQLite >= 3.35 drops columns itself
