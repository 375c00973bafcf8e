"""The map's change log, so that routers refresh by what changed, not the whole map.

Every catalog transaction that changes a tenant records (map version, tenant id) in
``tenantry_map_changes``; ``tenantry_map.changes_since`` is the oldest version from
which the log is complete (older rows are pruned). A router at version v >=
changes_since reads only the tenants changed after v.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "c0004"
down_revision = "c0003"


def upgrade() -> None:
    op.create_table(
        "tenantry_map_changes",
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=False),
    )
    op.create_index("tenantry_map_changes_version", "tenantry_map_changes", ["version"])
    with op.batch_alter_table("tenantry_map") as batch:
        batch.add_column(
            sa.Column("changes_since", sa.BigInteger, nullable=False, server_default="0")
        )
    # The log starts now: a router older than this reloads the whole map once.
    op.execute("UPDATE tenantry_map SET changes_since = version")


def downgrade() -> None:
    with op.batch_alter_table("tenantry_map") as batch:
        batch.drop_column("changes_since")
    op.drop_index("tenantry_map_changes_version", "tenantry_map_changes")
    op.drop_table("tenantry_map_changes")
