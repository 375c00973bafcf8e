"""Alembic environment of one of tenantry's own schemas (``shardmap.scripts.run_env``)."""

from tenantry.shardmap.scripts import run_env

run_env()
