"""Alembic environment of one of tenantry's own schemas (see ``_alembic.run_env``)."""

from tenantry.migrations._alembic import run_env

run_env()
