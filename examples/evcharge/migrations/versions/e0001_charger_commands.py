"""Charger commands: start, stop, reboot and unlock requests and their states.

Revision ID: e0001
Revises: d0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "e0001"
down_revision = "d0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "charger_commands",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("charger_id", sa.Integer, nullable=False),
        sa.Column("command", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("client_ref", sa.String(100), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "id"),
        sa.ForeignKeyConstraint(["tenant_id", "charger_id"], ["chargers.tenant_id", "chargers.id"]),
        sa.UniqueConstraint("tenant_id", "client_ref", name="charger_commands_client_ref"),
    )
    # Behind the foreign key: deleting a charger (or moving a group away) checks it.
    op.create_index("charger_commands_by_charger", "charger_commands", ["tenant_id", "charger_id"])


def downgrade() -> None:
    op.drop_index("charger_commands_by_charger", table_name="charger_commands")
    op.drop_table("charger_commands")
