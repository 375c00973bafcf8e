"""Users and chargers."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "d0001"
down_revision = None


def upgrade() -> None:
    _tenant_table(
        "users",
        sa.Column("email", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
    )
    _tenant_table(
        "chargers",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("location", sa.String(200), nullable=False),
        sa.Column("power_kw", sa.Numeric(8, 2), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
    )


def _tenant_table(name: str, *columns: sa.Column[Any]) -> None:
    """A table whose every row is a tenant's, keyed by (tenant_id, id)."""
    op.create_table(
        name,
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("id", sa.Integer, nullable=False),
        *columns,
        sa.PrimaryKeyConstraint("tenant_id", "id"),
    )


def downgrade() -> None:
    op.drop_table("chargers")
    op.drop_table("users")
