"""A log table and one row saying which database ran this migration, and which runner.

Revision ID: c0001
Revises:
Create Date: 2026-11-28

Each database must end with exactly one row: a second run of this migration on the same
database would fail (the table exists) or add a row. ``MIGRATION_RUNNER`` names the
runner in the row; ``MIGRATION_SLEEP`` (seconds) keeps the transaction open a while, so
that runners overlap.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from alembic import op

revision = "c0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    log = op.create_table(
        "migration_log",
        sa.Column("database", sa.String(500), nullable=False),
        sa.Column("runner", sa.String(50), nullable=False),
    )
    database = op.get_bind().engine.url.database or ""
    op.bulk_insert(
        log, [{"database": database, "runner": os.environ.get("MIGRATION_RUNNER", "test")}]
    )
    time.sleep(float(os.environ.get("MIGRATION_SLEEP", "0")))


def downgrade() -> None:
    op.drop_table("migration_log")
