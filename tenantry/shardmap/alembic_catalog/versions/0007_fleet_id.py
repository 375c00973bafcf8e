"""The fleet's id, carried by the names of its moves' replication objects.

``tenantry_map.fleet_id`` is generated once, here (8 hex digits from Python's
``secrets``): every publication, slot and subscription of an online move is named
``tenantry_move_<fleet id>_<move id>``, so two catalogs whose shards share a server
never reuse or collect each other's objects. Moves recorded before this revision keep
the names their journal entries recorded (``tenantry_move_<move id>``).
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "c0007"
down_revision = "c0006"


def upgrade() -> None:
    op.add_column("tenantry_map", sa.Column("fleet_id", sa.String(16), nullable=True))
    op.execute(
        sa.text("UPDATE tenantry_map SET fleet_id = :f WHERE fleet_id IS NULL").bindparams(
            f=secrets.token_hex(4)
        )
    )


def downgrade() -> None:
    op.drop_column("tenantry_map", "fleet_id")  # SQLite >= 3.35 drops columns itself
