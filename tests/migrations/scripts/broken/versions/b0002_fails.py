"""A migration the database refuses, after b0001 has run in the same transaction.

Revision ID: b0002
Revises: b0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "b0002"
down_revision = "b0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT no_such_function()")


def downgrade() -> None:
    pass
