"""The shard database's identity: one row saying which database this is.

``database_id`` is a random id generated here; ``system_identifier`` (the PostgreSQL
server's, from ``pg_control_system()``) and ``database_oid`` (this database's oid) are
what the identity was made on. A database cloned from a template or restored from a
dump carries the row along with different live values, and
:func:`tenantry.shardmap.identity.ensure_identity` then gives it an id of its own.
On SQLite both are NULL (a copied file keeps the id: copies are not detected).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from tenantry.shardmap.columns import shard_identity_columns

revision = "s0003"
down_revision = "s0002"


def upgrade() -> None:
    table = op.create_table(
        "tenantry_shard_identity",
        *shard_identity_columns(),
        sa.CheckConstraint("id = 1", name="tenantry_shard_identity_one_row"),
    )
    bind = op.get_bind()
    system_identifier: str | None = None
    database_oid: int | None = None
    if bind.dialect.name == "postgresql":
        system_identifier = str(
            bind.execute(sa.text("SELECT system_identifier FROM pg_control_system()")).scalar_one()
        )
        database_oid = int(
            bind.execute(
                sa.text("SELECT oid FROM pg_database WHERE datname = current_database()")
            ).scalar_one()
        )
        op.execute("REVOKE ALL ON tenantry_shard_identity FROM PUBLIC")
    op.bulk_insert(
        table,
        [
            {
                "id": 1,
                "database_id": uuid.uuid4().hex,
                "system_identifier": system_identifier,
                "database_oid": database_oid,
                "created_at": datetime.now(UTC),
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("tenantry_shard_identity")
