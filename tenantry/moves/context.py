"""What the steps of a move share, and what a move carries from one step to the next.

A :class:`MoveContext` holds the catalog and its journal, the settings, the observer
and the checkpoints, and opens short-lived engines on a shard's operations role. Per
move it keeps :class:`Carried`: the tenant tables reflected once when the move was
planned (reflected again only by a mover that did not plan it, e.g. after a crash),
and what an online move learnt at its cut. The step objects (planning, offline,
online, finishing, rollback) take the context; none imports the mover.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection, Engine

from tenantry.errors import MoveError, MoveRefused
from tenantry.moves import tail_decoder
from tenantry.moves.freeze import wait_out
from tenantry.moves.journal import Journal, Move
from tenantry.moves.observers import Checkpoints, MoveObserver
from tenantry.moves.references import ForeignKey, Key
from tenantry.moves.tables import TenantTable, tenant_tables
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.identity import LiveDatabase, live_database
from tenantry.shardmap.model import Shard
from tenantry.shardmap.operations import operator_engine
from tenantry.shardmap.residency import Residency, commit_residency

__all__ = ["Carried", "End", "MoveContext", "identify", "same_database_refusal"]

#: One end of a move.
End = Literal["source", "target"]


@dataclass
class Carried:
    """What one move carries between its steps, in this process."""

    #: The tenant tables of each end, as reflected (once) for the move.
    tables: dict[str, list[TenantTable]] = field(default_factory=dict)
    #: Online: the rows changed since the verified cut.
    tail: tail_decoder.Tail | None = None
    #: Online: the shared rows the tenant referenced at the cut, by foreign key (None:
    #: too many to check again inside the freeze).
    references: list[tuple[ForeignKey, list[Key] | None]] = field(default_factory=list)
    #: Online: the final freeze compared the rows changed since a verified cut.
    verified_in_freeze: bool = False


class MoveContext:
    """The catalog, journal, settings, observer and checkpoints a move's steps use,
    engines on its shards, and what each move carries (:class:`Carried`)."""

    def __init__(self, catalog: Catalog, observer: MoveObserver, hooks: Checkpoints) -> None:
        self.catalog = catalog
        self.settings = catalog.settings
        self.journal = Journal(catalog)
        self.observer = observer
        self.hooks = hooks
        self.column = self.settings.tenant_column
        self.schemas = self.settings.move_schemas
        self._carried: dict[int, Carried] = {}

    # what a move carries ------------------------------------------------------------------

    def carried(self, move_id: int) -> Carried:
        """What move *move_id* carries (empty for a move this process has not seen)."""
        return self._carried.setdefault(move_id, Carried())

    def forget(self, move_id: int) -> None:
        """Drop what move *move_id* carries (it has ended)."""
        self._carried.pop(move_id, None)

    def reflect(self, conn: Connection) -> list[TenantTable]:
        """The tenant tables on *conn*: the move's one reflection entry point."""
        return tenant_tables(conn, column=self.column, schemas=self.schemas)

    def tables(self, move_id: int, end: End, conn: Connection) -> list[TenantTable]:
        """The tenant tables of the move's *end*: as carried, else reflected on *conn*
        (and carried from then on)."""
        carried = self.carried(move_id).tables
        if end not in carried:
            carried[end] = self.reflect(conn)
        return carried[end]

    # shards ---------------------------------------------------------------------------------

    def shards(self, move: Move) -> tuple[Shard, Shard]:
        """The move's source and target shards, as the catalog has them now."""
        return self.catalog.get_shard(move.source), self.catalog.get_shard(move.target)

    @contextmanager
    def admin(self, shard: Shard) -> Iterator[Engine]:
        """A short-lived engine on the shard's operations role; errors name the shard
        (those raised on another database's connection pass on to its own block)."""
        with operator_engine(
            shard, connect_timeout=self.settings.connect_timeout, failed=MoveError, own_only=True
        ) as engine:
            yield engine

    def residency(self, shard: Shard, tenant_id: str, state: Residency) -> None:
        """Commit the tenant's residency row on *shard*."""
        with self.admin(shard) as engine:
            commit_residency(engine, tenant_id, state, self.catalog.map_version())

    def check_distinct(self, source: Shard, target: Shard, src: Engine, dst: Engine) -> None:
        """Refuse (MoveRefused) when *src* and *dst* reach one database.

        The identities are read on live connections of the engines the move uses, so
        this holds whatever the catalog says (two shard names for one database, its
        URL spelled two ways): a move between them would delete the tenant's rows.
        """
        refusal = same_database_refusal(source, target, identify(src), identify(dst))
        if refusal is not None:
            raise refusal

    def same_database(self, source: Shard, target: Shard) -> bool:
        """Whether the two shards reach one database (read on live connections)."""
        with self.admin(source) as src, self.admin(target) as dst:
            return identify(src).same_as(identify(dst))

    def wait_out(self, conn: Connection, *, timeout: float) -> None:
        """:func:`~tenantry.moves.freeze.wait_out`, telling the observer what it waits for."""
        wait_out(conn, timeout=timeout, note=self.observer.note)


def same_database_refusal(
    source: Shard, target: Shard, left: LiveDatabase, right: LiveDatabase
) -> MoveRefused | None:
    """The refusal of a move between two shards whose databases, as read live (*left*
    and *right*), are one; None when they are two."""
    if not left.same_as(right):
        return None
    return MoveRefused(
        f"source and target are the same database (shard {source.name!r} and "
        f"shard {target.name!r}: {left.describe()}): a move would delete the "
        f"tenant's rows; remove the duplicate shard with `tenantry shard remove "
        f"{target.name}`"
    )


def identify(engine: Engine) -> LiveDatabase:
    """Which database *engine* (an operations role's) reaches, read on a live
    connection; its identity row is made or repaired first when needed."""
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            return live_database(conn)
