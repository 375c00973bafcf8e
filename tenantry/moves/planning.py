"""Planning a move: every check before anything is recorded, frozen or copied.

:class:`Planning` opens one connection to each end, reflects the tenant tables of each
once, resolves the mode (online where both ends allow it), refuses what cannot move,
records the move as planned and carries the reflected tables (and their shapes, to
find DDL run by hand during the move) forward in the :class:`MoveContext`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import MoveError, MoveRefused, ShardOccupied
from tenantry.moves.context import MoveContext, same_database_refusal
from tenantry.moves.copy import replica_allowed, user_triggers
from tenantry.moves.journal import Move, MoveKind, MoveMode
from tenantry.moves.online import online_problems
from tenantry.moves.references import cross_tenant_problems, missing_references, rows_left
from tenantry.moves.tables import (
    TenantTable,
    check_same_tables,
    check_whole_database,
    table_shapes,
)
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.identity import LiveDatabase, live_database
from tenantry.shardmap.model import Shard, Tier, require_active

__all__ = ["Planning", "check_droppable"]

_SQLITE_OFFLINE = "online moves need PostgreSQL on both ends (SQLite has no logical replication)"


class _Ends:
    """One connection to each end of a planned move, opened on first use, and what was
    read on them: each database's identity and its tenant tables (once)."""

    def __init__(self, ctx: MoveContext, source: Shard, target: Shard, stack: ExitStack) -> None:
        self.ctx, self.source, self.target, self._stack = ctx, source, target, stack
        self._opened: tuple[Connection, Connection] | None = None
        self.identities: tuple[LiveDatabase, LiveDatabase] | None = None
        self._tables: dict[str, list[TenantTable]] = {}

    def connections(self) -> tuple[Connection, Connection]:
        """The connections to source and target; each database's identity is read
        first, on them."""
        if self._opened is None:
            engines: list[Engine] = [
                self._stack.enter_context(self.ctx.admin(self.source)),
                self._stack.enter_context(self.ctx.admin(self.target)),
            ]
            src, dst = (self._stack.enter_context(e.connect()) for e in engines)
            self.identities = (_identity(src), _identity(dst))
            self._opened = (src, dst)
        return self._opened

    def tables(self, end: str) -> list[TenantTable]:
        """The tenant tables of *end* (``source`` or ``target``), reflected once."""
        if end not in self._tables:
            src, dst = self.connections()
            self._tables[end] = self.ctx.reflect(src if end == "source" else dst)
        return self._tables[end]

    @property
    def reflected(self) -> dict[str, list[TenantTable]]:
        """What was reflected, by end."""
        return dict(self._tables)


@dataclass(frozen=True)
class Planning:
    """The ``plan`` step of a move (see the module docstring), in *ctx*."""

    ctx: MoveContext

    def plan(
        self,
        tenant_id: str,
        target: str,
        *,
        kind: MoveKind = MoveKind.MOVE,
        mode: MoveMode | str = MoveMode.OFFLINE,
        check: bool = True,
        options: dict[str, Any] | None = None,
        artifacts: dict[str, Any] | None = None,
    ) -> Move:
        """Check that the move can run, resolve its mode, then record it as planned.
        Nothing is frozen. Without *check* the move is recorded as asked, unchecked
        (a promote into a database yet to be created checks it with :meth:`check`)."""
        ctx = self.ctx
        snapshot = ctx.catalog.snapshot()
        source = snapshot.shard(snapshot.tenant(tenant_id).shard)
        if not check:
            return ctx.journal.create(
                tenant_id,
                source.name,
                target,
                kind=kind,
                mode=MoveMode(str(mode)),
                options=options,
                artifacts=artifacts,
            )
        target_shard = snapshot.shard(target)
        with ExitStack() as stack:
            ends = _Ends(ctx, source, target_shard, stack)
            chosen, why = self._mode(ends, mode)
            self._check_target(tenant_id, source, target_shard, kind)
            self._precheck(ends, tenant_id)
            if kind is MoveKind.DEMOTE and (options or {}).get("drop_source"):
                check_droppable(ctx, tenant_id, source, move_id=None, conn=ends.connections()[0])
        planned = ctx.journal.create(
            tenant_id,
            source.name,
            target,
            kind=kind,
            mode=chosen,
            options={**(options or {}), "mode_reason": why},
            artifacts=artifacts,
        )
        self._carry(planned, ends)
        # Once planned: a move refused by its checks says only why it was refused.
        ctx.observer.note(f"mode: {why}")
        return planned

    def check(self, move: Move, mode: MoveMode | str) -> None:
        """The checks of :meth:`plan`, for *move* recorded unchecked, and its mode
        resolved and recorded (promote into a new database, once it exists)."""
        ctx = self.ctx
        source, target = ctx.shards(move)
        with ExitStack() as stack:
            ends = _Ends(ctx, source, target, stack)
            self._precheck(ends, move.tenant_id)
            chosen, why = self._mode(ends, mode)
        self._carry(move, ends)
        ctx.observer.note(f"mode: {why}")
        ctx.journal.set_mode(move.id, chosen, why)

    def _carry(self, move: Move, ends: _Ends) -> None:
        """The tables reflected for *move* go forward with it, and their shapes into
        its journal entry (compared again before the switch)."""
        reflected = ends.reflected
        self.ctx.carried(move.id).tables.update(reflected)
        if set(reflected) == {"source", "target"}:
            shapes = {end: table_shapes(tables) for end, tables in reflected.items()}
            self.ctx.journal.update(move.id, stats={"table_shapes": shapes})

    def _mode(self, ends: _Ends, mode: MoveMode | str) -> tuple[MoveMode, str]:
        """Resolve ``auto`` to online or offline, and say why (online asked for but
        impossible is refused with the reasons)."""
        wanted = str(mode)
        if wanted == MoveMode.OFFLINE.value:
            return MoveMode.OFFLINE, "offline, as asked"
        if ends.source.backend != "postgresql" or ends.target.backend != "postgresql":
            problems = [_SQLITE_OFFLINE]
        else:
            src, dst = ends.connections()
            problems = online_problems(src, dst, ends.tables("source"), self.ctx.column)
            src.rollback()
            dst.rollback()
        if not problems:
            why = "online, as asked" if wanted == "online" else "online: both ends support it"
            return MoveMode.ONLINE, why
        if wanted == MoveMode.ONLINE.value:
            raise MoveRefused("cannot move online: " + "; ".join(problems))
        return MoveMode.OFFLINE, "offline: " + "; ".join(problems)

    def _check_target(self, tenant_id: str, source: Shard, target: Shard, kind: MoveKind) -> None:
        if target.name == source.name:
            raise MoveRefused(
                f"tenant {tenant_id!r} lives on shard {source.name!r} already: choose "
                "another target",
                tenant_id=tenant_id,
            )
        require_active(target, tenant_id)
        if kind is MoveKind.PROMOTE and target.tier is not Tier.DEDICATED:
            raise MoveRefused(
                f"promote needs a dedicated target; {target.name!r} is shared",
                tenant_id=tenant_id,
            )
        if kind is MoveKind.DEMOTE and target.tier is not Tier.SHARED:
            raise MoveRefused(
                f"demote needs a shared target; {target.name!r} is dedicated",
                tenant_id=tenant_id,
            )
        if target.tier is Tier.DEDICATED:
            others = [t.id for t in self.ctx.catalog.list_tenants(shard=target.name)]
            if others:
                raise ShardOccupied(
                    f"dedicated shard {target.name!r} already holds tenant {others[0]!r}: "
                    "give each dedicated tenant its own shard",
                    tenant_id=tenant_id,
                    shard=target.name,
                )

    def _precheck(self, ends: _Ends, tenant_id: str) -> None:
        """Both ends reachable, two different databases, at one migration revision,
        with the same tenant tables, and no foreign key to a tenant table from a table
        that does not move. Then the tenant's rows: none tied to another tenant's
        through a foreign key, and every row of a table that does not move (shared
        reference data) that they reference present at the target."""
        source, target, column = ends.source, ends.target, self.ctx.column
        s, d = ends.connections()
        assert ends.identities is not None
        refusal = same_database_refusal(source, target, *ends.identities)
        if refusal is not None:
            raise refusal
        src_rev, dst_rev = _app_revision(s), _app_revision(d)
        if src_rev != dst_rev:
            raise MoveRefused(
                f"shard {target.name!r} is at migration revision {dst_rev or 'none'} "
                f"but {source.name!r} is at {src_rev or 'none'}: run "
                "`tenantry migrate upgrade` first"
            )
        tables = ends.tables("source")
        check_whole_database(s, tables, column=column)
        for end, conn in ((source, s), (target, d)):
            _check_triggers(end, conn, tables)
        check_same_tables(tables, ends.tables("target"))
        if not sa.inspect(d).has_table("tenantry_residency"):
            raise MoveRefused(
                f"shard {target.name!r} lacks tenantry's tables: run `tenantry migrate upgrade`"
            )
        problems = cross_tenant_problems(s, tenant_id, tables, column)
        problems += missing_references(s, d, tenant_id, tables, column)
        s.rollback()
        d.rollback()
        if problems:
            raise MoveRefused(
                f"cannot move tenant {tenant_id!r}: {problems[0]}", tenant_id=tenant_id
            )


def check_droppable(
    ctx: MoveContext,
    tenant_id: str,
    source: Shard,
    *,
    move_id: int | None,
    conn: Connection | None = None,
) -> None:
    """Refuse to drop *source*'s database while a table with the tenant column, in
    any schema, holds another tenant's row: when planning (*move_id* None,
    MoveRefused), and just before the drop (MoveError: the move waits, resumable),
    when a row of *tenant_id* left by the cleanup refuses it too. Read on *conn* (a
    connection to *source*), else on a connection of its own."""
    if source.backend != "postgresql":
        return
    own = move_id is not None
    if conn is not None:
        left = rows_left(conn, tenant_id, ctx.column, own=own)
        conn.rollback()
    else:
        with ctx.admin(source) as engine, engine.connect() as fresh:
            left = rows_left(fresh, tenant_id, ctx.column, own=own)
    if left is None:
        return
    if move_id is None:
        raise MoveRefused(
            f"refusing to drop the database of shard {source.name!r}: {left}; move or "
            "delete those rows first, or demote without --drop-source (the database "
            "is then kept, retired)",
            tenant_id=tenant_id,
        )
    raise MoveError(
        f"refusing to drop the database of shard {source.name!r}: {left}; the tenant "
        f"lives on its new shard already; move or delete those rows, then run "
        f"`tenantry moves resume {move_id}` (the database is kept until then)",
        tenant_id=tenant_id,
        move_id=move_id,
    )


def _check_triggers(end: Shard, conn: Connection, tables: list[TenantTable]) -> None:
    triggers = user_triggers(conn, tables)
    if triggers and not replica_allowed(conn):
        raise MoveRefused(
            f"shard {end.name!r} has triggers on tenant tables "
            f"({', '.join(triggers[:3])}) and its operations role may not "
            "set session_replication_role, so the copy and the cleanup "
            "would fire them: GRANT SET ON PARAMETER session_replication_role "
            "to it, or disable the triggers"
        )


def _identity(conn: Connection) -> LiveDatabase:
    """:func:`~tenantry.moves.context.identify`, on an open connection."""
    conn = conn.execution_options(**WRITE)
    try:
        with conn.begin():
            return live_database(conn)
    finally:
        conn.execution_options(tenantry_write=False)  # reads from here on


def _app_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) or None
