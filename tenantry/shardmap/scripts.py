"""tenantry's own Alembic scripts, run programmatically on a connection we already hold.

tenantry's own schemas (the catalog, and its per-shard tables) belong to the shard map:
Alembic script directories beside this module (``alembic_catalog/``,
``alembic_shard/``), each with its own version table so that they never collide with
the application's ``alembic_version``. The application's fleet migrations
(:mod:`tenantry.migrations.fleet`) use the same lock.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

__all__ = [
    "ALEMBIC_LOCK",
    "CATALOG",
    "SHARD",
    "TenantrySchema",
    "run_env",
]

_HERE = Path(__file__).resolve().parent

#: Alembic runs a migration through module globals (``alembic.context``), so two
#: threads of one process must not run Alembic commands at once. (Fleet migrations run
#: in parallel in separate processes.)
ALEMBIC_LOCK = threading.RLock()


class TenantrySchema:
    """One of tenantry's own schemas: where its scripts are, which version table."""

    __slots__ = ("_head", "script_location", "version_table")

    def __init__(self, folder: str, version_table: str) -> None:
        self.script_location = str(_HERE / folder)
        self.version_table = version_table
        self._head: str | None = None

    def config(self, connection: Connection | None = None) -> Config:
        """An Alembic config for these scripts, on *connection* when given."""
        cfg = Config()
        cfg.set_main_option("script_location", self.script_location)
        cfg.attributes["connection"] = connection
        cfg.attributes["version_table"] = self.version_table
        return cfg

    @property
    def head(self) -> str:
        """The newest revision shipped with this tenantry."""
        if self._head is None:
            head = ScriptDirectory.from_config(self.config()).get_current_head()
            assert head is not None, f"no revisions in {self.script_location}"
            self._head = head
        return self._head

    def current(self, connection: Connection) -> str | None:
        """The revision the database is at, or None when the schema is absent."""
        ctx = MigrationContext.configure(connection, opts={"version_table": self.version_table})
        return ctx.get_current_revision()

    def upgrade(self, connection: Connection, revision: str = "head") -> None:
        """Upgrade in the caller's transaction (the caller commits)."""
        with ALEMBIC_LOCK:
            command.upgrade(self.config(connection), revision)


CATALOG = TenantrySchema("alembic_catalog", "tenantry_catalog_version")
SHARD = TenantrySchema("alembic_shard", "tenantry_shard_version")


def run_env() -> None:
    """The body of every tenantry ``env.py``: migrate the connection we were handed."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("tenantry's schemas are migrated by tenantry, not the alembic CLI")
    context.configure(
        connection=connection,
        version_table=context.config.attributes["version_table"],
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
