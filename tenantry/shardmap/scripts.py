"""tenantry's own Alembic scripts, run programmatically on a connection we already hold.

tenantry's own schemas (the catalog, and its per-shard tables) belong to the shard map:
Alembic script directories beside this module (``alembic_catalog/``,
``alembic_shard/``), each with its own version table so that they never collide with
the application's ``alembic_version``. The application's fleet migrations
(:mod:`tenantry.migrations.fleet`) use the same lock.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Connection

if TYPE_CHECKING:  # Alembic is imported when a schema is upgraded, not to read one
    from alembic.config import Config

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
    """One of tenantry's own schemas: where its scripts are, which version table, and
    its newest revision (*head*, checked against the scripts by the tests: every
    command that opens the catalog compares its revision to it, and Alembic's script
    directory takes a tenth of a second to load)."""

    __slots__ = ("_modules", "head", "script_location", "version_table")

    def __init__(self, folder: str, version_table: str, head: str) -> None:
        self.script_location = str(_HERE / folder)
        self.version_table = version_table
        #: The newest revision shipped with this tenantry (a new revision updates it).
        self.head = head
        self._modules: dict[str, ModuleType] = {}

    def revision_module(self, file: str) -> ModuleType:
        """The module of the revision in ``versions/<file>``, loaded once: for a
        revision that reuses an earlier one's SQL (puts its body back on downgrade,
        say). Alembic loads revision files by path; they are not an importable package
        (their names start with digits)."""
        module = self._modules.get(file)
        if module is None:
            path = Path(self.script_location, "versions", file)
            name = f"tenantry_{Path(self.script_location).name}_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"no revision file {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module = self._modules.setdefault(file, module)
        return module

    def config(self, connection: Connection | None = None) -> Config:
        """An Alembic config for these scripts, on *connection* when given."""
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", self.script_location)
        cfg.attributes["connection"] = connection
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def scripts_head(self) -> str:
        """The newest revision of the scripts, as Alembic finds it (what :attr:`head`
        must say)."""
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.config()).get_current_head()
        assert head is not None, f"no revisions in {self.script_location}"
        return head

    def current(self, connection: Connection) -> str | None:
        """The revision the database is at, or None when the schema is absent (the
        version table Alembic keeps, read without Alembic)."""
        if not sa.inspect(connection).has_table(self.version_table):
            return None
        table = sa.table(self.version_table, sa.column("version_num"))
        found = connection.execute(sa.select(table.c.version_num)).scalars().all()
        if len(found) > 1:
            raise RuntimeError(f"{self.version_table} names several revisions: {found}")
        return found[0] if found else None

    def upgrade(self, connection: Connection, revision: str = "head") -> None:
        """Upgrade in the caller's transaction (the caller commits)."""
        from alembic import command

        with ALEMBIC_LOCK:
            command.upgrade(self.config(connection), revision)


CATALOG = TenantrySchema("alembic_catalog", "tenantry_catalog_version", head="c0008")
SHARD = TenantrySchema("alembic_shard", "tenantry_shard_version", head="s0008")


def run_env() -> None:
    """The body of every tenantry ``env.py``: migrate the connection we were handed."""
    from alembic import context

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
