"""A data migration whose own Python code raises (not the database).

Revision ID: r0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("backfilled", sa.Column("id", sa.Integer, primary_key=True))
    raise RuntimeError("cannot backfill [users]: 3 rows without an email")


def downgrade() -> None:
    op.drop_table("backfilled")
