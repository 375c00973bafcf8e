"""Charging sessions, with foreign keys to users and chargers."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "d0002"
down_revision = "d0001"


def upgrade() -> None:
    op.create_table(
        "charging_sessions",
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("charger_id", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("energy_kwh", sa.Numeric(10, 3), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "id"),
        sa.ForeignKeyConstraint(["tenant_id", "charger_id"], ["chargers.tenant_id", "chargers.id"]),
        sa.ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"]),
    )
    # An index behind each foreign key: deleting a user or charger checks for its
    # sessions, and without one each check scans the tenant's sessions (moving a tenant
    # out of a database deletes all its users).
    op.create_index(
        "charging_sessions_by_charger", "charging_sessions", ["tenant_id", "charger_id"]
    )
    op.create_index("charging_sessions_by_user", "charging_sessions", ["tenant_id", "user_id"])


def downgrade() -> None:
    op.drop_index("charging_sessions_by_user", table_name="charging_sessions")
    op.drop_index("charging_sessions_by_charger", table_name="charging_sessions")
    op.drop_table("charging_sessions")
