"""Watching logical replication while an online move waits for it.

The initial copy and the catch-up wait for the subscription; :class:`Watch` bounds
those waits, so that no move waits without a bound for replication that failed.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import ReplicationFailed, SchemaContractError, TenantryError
from tenantry.moves import replication as repl
from tenantry.moves.context import MoveContext
from tenantry.moves.journal import Move
from tenantry.moves.tables import check_same_tables
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.model import Shard

__all__ = ["Watch"]


class Watch:
    """Bounds the waits for logical replication before the freeze.

    Each :meth:`check` stops the move (:class:`ReplicationFailed`) when the source
    cannot be reached, when the subscription's apply or table-sync worker has failed
    since the watch began (``pg_stat_subscription_stats``), naming the cause where the
    tables' comparison finds it, or when nothing has progressed for
    ``move_stall_timeout`` seconds: while *syncing*, the initial copy
    (:func:`~tenantry.moves.replication.sync_progress`); then, the position the
    subscription has confirmed on the source slot.
    """

    def __init__(
        self,
        ctx: MoveContext,
        move: Move,
        source: Shard,
        target: Shard,
        src: Connection,
        dst: Connection,
        name: str,
    ) -> None:
        self.ctx, self.move = ctx, move
        self.source, self.target = source, target
        self.src, self.dst, self.name = src, dst, name
        self.stall = ctx.settings.move_stall_timeout
        self.errors = repl.subscription_errors(dst, name) or (0, 0)
        self.progress: object = None
        self.since = time.monotonic()

    def _fail(self, message: str, *, reachable: bool = True) -> ReplicationFailed:
        return ReplicationFailed(
            message, reachable=reachable, tenant_id=self.move.tenant_id, move_id=self.move.id
        )

    def check(self, *, syncing: bool) -> None:
        """Raise :class:`ReplicationFailed` when replication failed or stalled."""
        try:
            confirmed = self.src.execute(
                sa.text(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = :n"
                ),
                {"n": self.name},
            ).scalar()
        except sa.exc.DBAPIError as exc:
            if not (exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError)):
                raise
            raise self._fail(
                f"replication stopped: cannot reach the source shard {self.source.name!r} "
                f"({describe_error(exc)})",
                reachable=False,
            ) from None
        errors = repl.subscription_errors(self.dst, self.name) or self.errors
        if errors[0] > self.errors[0] or errors[1] > self.errors[1]:
            worker = "table copy" if errors[1] > self.errors[1] else "apply"
            raise self._fail(
                f"replication stopped: the subscription's {worker} worker failed on the "
                f"target shard {self.target.name!r}: {self._cause()}"
            )
        progress = repl.sync_progress(self.dst, self.name) if syncing else confirmed
        now = time.monotonic()
        if progress != self.progress:
            self.progress, self.since = progress, now
        elif now - self.since > self.stall:
            raise self._fail(
                f"replication made no progress for {self.stall:g}s (TENANTRY_MOVE_STALL_"
                f"TIMEOUT) from shard {self.source.name!r} to shard {self.target.name!r}: "
                f"{self._cause()}"
            )

    def _cause(self) -> str:
        """The tables' comparison, run again: a schema that changed on one end only is
        the usual cause; else the target server's log says it."""
        try:
            check_same_tables(self.ctx.reflect(self.src), self.ctx.reflect(self.dst))
        except SchemaContractError as exc:
            return f"table {exc.table!r}: {exc.reason}"
        except (TenantryError, sa.exc.SQLAlchemyError):
            pass
        return "see the target server's log for the error"
