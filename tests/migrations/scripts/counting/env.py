"""Alembic environment of a test script directory: migrate the connection tenantry hands
over (``config.attributes["connection"]``), as Alembic's docs show."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("this script directory is run by tenantry, which hands over a connection")
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
