"""The move journal: move records in the catalog, and their states.

A move's state is committed *before* the step it names acts, so after a crash the
recorded state says which step to redo; every step is idempotent. A move is live
until ``ended_at`` is set, and the catalog allows one live move per tenant.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from tenantry.errors import MoveInProgress, UnknownMove
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.model import TenantState, as_utc
from tenantry.shardmap.schema import moves
from tenantry.urls import mask_url

__all__ = ["Journal", "Move", "MoveKind", "MoveMode", "MoveState", "owner_id"]


class MoveState(enum.StrEnum):
    """The move protocol's states (DESIGN.md), in order, and ``aborted``."""

    PLANNED = "planned"
    FROZEN = "frozen"
    COPIED = "copied"
    VERIFIED = "verified"
    SWITCHED = "switched"
    CLEANED = "cleaned"
    ABORTED = "aborted"

    @property
    def order(self) -> int:
        """The state's position in a move's life (planned first; aborted last)."""
        return _ORDER[self]


_ORDER = {state: i for i, state in enumerate(MoveState)}


class MoveKind(enum.StrEnum):
    """What the move does to the tenant's tier."""

    MOVE = "move"
    PROMOTE = "promote"
    DEMOTE = "demote"


class MoveMode(enum.StrEnum):
    """Offline: writes frozen for the copy. Online: logical replication, short freeze."""

    OFFLINE = "offline"
    ONLINE = "online"


def owner_id() -> str:
    """Who runs a move: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Move:
    """One move as recorded in the journal."""

    id: int
    tenant_id: str
    source: str
    target: str
    kind: MoveKind
    mode: MoveMode
    state: MoveState
    options: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    owner: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    ended_at: datetime | None = None

    @property
    def live(self) -> bool:
        """True until the move has finished or been rolled back."""
        return self.ended_at is None

    @property
    def succeeded(self) -> bool:
        """Whether the move ended cleaned: the tenant lives at the target."""
        return self.state is MoveState.CLEANED and self.ended_at is not None

    @property
    def can_abort(self) -> bool:
        """Before the switch a move can be rolled back; after it, only completed."""
        return self.live and self.state.order < MoveState.SWITCHED.order

    def to_record(self) -> dict[str, Any]:
        """The move as JSON-ready fields (``tenantry moves show --json``); URLs in the
        artifacts are masked."""
        return {
            "id": self.id,
            "tenant": self.tenant_id,
            "kind": self.kind.value,
            "mode": self.mode.value,
            "source": self.source,
            "target": self.target,
            "state": self.state.value,
            "live": self.live,
            "error": self.error,
            "next": self.next_step(),
            "stats": dict(self.stats),
            "artifacts": {key: _masked(value) for key, value in self.artifacts.items()},
            "owner": self.owner,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
        }

    def next_step(self) -> str | None:
        """What an operator should run for a live move, or None."""
        if not self.live:
            return None
        if self.state is MoveState.ABORTED:
            return f"tenantry moves abort {self.id}  (finish the rollback)"
        if self.can_abort:
            return f"tenantry moves resume {self.id}  (or: tenantry moves abort {self.id})"
        return f"tenantry moves resume {self.id}"


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def _move(row: Any) -> Move:
    return Move(
        id=row.id,
        tenant_id=row.tenant_id,
        source=row.source,
        target=row.target,
        kind=MoveKind(row.kind),
        mode=MoveMode(row.mode),
        state=MoveState(row.state),
        options=dict(row.options or {}),
        artifacts=dict(row.artifacts or {}),
        stats=dict(row.stats or {}),
        error=row.error,
        owner=row.owner,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        ended_at=as_utc(row.ended_at),
    )


class _Keep:
    """Sentinel: leave the error column as it is."""


class Journal:
    """Reads and writes move records in the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def create(
        self,
        tenant_id: str,
        source: str,
        target: str,
        *,
        kind: MoveKind,
        mode: MoveMode,
        options: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Any] | None = None,
    ) -> Move:
        """Record a planned move; refuse if the tenant already has a live one."""
        now = datetime.now(UTC)
        try:
            with self.catalog.transaction() as (conn, _version):
                live = self._live_for(conn, tenant_id)
                if live is not None:
                    raise MoveInProgress(tenant_id, live)
                move_id = conn.execute(
                    moves.insert()
                    .values(
                        tenant_id=tenant_id,
                        source=source,
                        target=target,
                        kind=kind.value,
                        mode=mode.value,
                        state=MoveState.PLANNED.value,
                        options=dict(options or {}),
                        artifacts=dict(artifacts or {}),
                        stats={},
                        owner=owner_id(),
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(moves.c.id)
                ).scalar_one()
                self.catalog.set_tenant_state(conn, tenant_id, TenantState.MOVING)
        except IntegrityError:
            # Another process planned a move of this tenant at the same moment.
            with self.catalog.read_transaction() as conn:
                live = self._live_for(conn, tenant_id)
            raise MoveInProgress(tenant_id, live) from None
        return self.get(int(move_id))

    def _live_for(self, conn: Connection, tenant_id: str) -> int | None:
        found = conn.execute(
            sa.select(moves.c.id).where(moves.c.tenant_id == tenant_id, moves.c.ended_at.is_(None))
        ).scalar_one_or_none()
        return None if found is None else int(found)

    def get(self, move_id: int) -> Move:
        """The move with this id, or raise UnknownMove."""
        with self.catalog.read_transaction() as conn:
            row = conn.execute(sa.select(moves).where(moves.c.id == move_id)).first()
        if row is None:
            raise UnknownMove(move_id)
        return _move(row)

    def list(self, *, live: bool | None = None, tenant_id: str | None = None) -> list[Move]:
        """Moves, newest first; ``live=True`` for unfinished ones only."""
        query = sa.select(moves).order_by(moves.c.id.desc())
        if live is True:
            query = query.where(moves.c.ended_at.is_(None))
        elif live is False:
            query = query.where(moves.c.ended_at.is_not(None))
        if tenant_id is not None:
            query = query.where(moves.c.tenant_id == tenant_id)
        with self.catalog.read_transaction() as conn:
            return [_move(row) for row in conn.execute(query)]

    def update(
        self,
        move_id: int,
        *,
        conn: Connection | None = None,
        state: MoveState | None = None,
        error: str | type[_Keep] | None = _Keep,
        stats: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Any] | None = None,
        ended: bool = False,
    ) -> None:
        """Change a move's record; stats and artifacts are merged into what is there."""
        with self._conn(conn) as c:
            row = c.execute(sa.select(moves).where(moves.c.id == move_id)).first()
            if row is None:
                raise UnknownMove(move_id)
            now = datetime.now(UTC)
            values: dict[str, Any] = {"updated_at": now, "owner": owner_id()}
            if state is not None:
                values["state"] = state.value
            if error is not _Keep:
                values["error"] = error
            if stats:
                values["stats"] = {**(row.stats or {}), **stats}
            if artifacts:
                values["artifacts"] = {**(row.artifacts or {}), **artifacts}
            if ended:
                values["ended_at"] = now
            c.execute(moves.update().where(moves.c.id == move_id).values(**values))

    def set_mode(self, move_id: int, mode: MoveMode, reason: str) -> None:
        """Record the mode chosen for a planned move (promote --server decides it late)."""
        with self.catalog.journal_transaction() as conn:
            row = conn.execute(sa.select(moves.c.options).where(moves.c.id == move_id)).first()
            options = {**dict(row[0] or {}), "mode_reason": reason} if row else {}
            conn.execute(
                moves.update()
                .where(moves.c.id == move_id, moves.c.state == MoveState.PLANNED.value)
                .values(mode=mode.value, options=options)
            )

    @contextmanager
    def _conn(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.catalog.journal_transaction() as own:
                yield own
