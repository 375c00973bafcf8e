"""The move state machine: planned → frozen → copied → verified → switched → cleaned.

Each state is committed to the catalog's journal before its step acts, and every step
is idempotent, so :meth:`Mover.run` resumes a move from its recorded state after a
crash at any point; :meth:`Mover.abort` rolls back a move that has not switched.

The mover only sequences the states. The steps are objects of their own, given the
:class:`~tenantry.moves.context.MoveContext` the mover holds: :class:`Planning`
(``plan``), :class:`OfflineSteps` or :class:`OnlineSteps` (how the rows get there),
:class:`FinishSteps` (verify, switch, clean) and :mod:`~tenantry.moves.rollback`.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from tenantry.errors import (
    FreezeBudgetExceeded,
    MoveError,
    MoveRefused,
    MoveRolledBack,
    ReplicationFailed,
    TenantryError,
    UnknownShard,
    VerificationFailed,
)
from tenantry.migrations.fleet import MIGRATION_LOCK
from tenantry.moves.context import MoveContext
from tenantry.moves.finish import FinishSteps
from tenantry.moves.journal import Move, MoveMode, MoveState
from tenantry.moves.observers import Checkpoints, EnvHooks, MoveObserver, NullObserver
from tenantry.moves.offline import OfflineSteps
from tenantry.moves.online import OnlineSteps
from tenantry.moves.planning import Planning
from tenantry.moves.rollback import describe, roll_back_failed, rollback
from tenantry.moves.tables import table_shapes
from tenantry.observability.moves import moving, watch_moves
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.model import Shard
from tenantry.shardmap.operations import operations_engine, shard_errors
from tenantry.shardmap.sizes import follow_move

__all__ = ["Checkpoints", "Mover"]

logger = logging.getLogger("tenantry.moves")

_MOVE_LOCK_BASE = 0x7E4A0000  # + move id: one advisory lock per move on the catalog
_CLAIM_PATIENCE = 3.0  # seconds a move's claim is retried before "run by another process"


class Mover:
    """Runs moves recorded in *catalog*'s journal; :meth:`plan` records one
    (:meth:`Planning.plan <tenantry.moves.planning.Planning.plan>`)."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        observer: MoveObserver | None = None,
        hooks: Checkpoints | None = None,
    ) -> None:
        # Metrics and traces (README, "Observing the fleet") watch the observer's calls.
        watched = watch_moves(observer or NullObserver(), catalog.settings)
        self.ctx = MoveContext(catalog, watched, hooks or EnvHooks())
        self.catalog = catalog
        self.journal = self.ctx.journal
        self.observer = self.ctx.observer
        self.hooks = self.ctx.hooks
        self.planning = Planning(self.ctx)
        self.plan = self.planning.plan
        self.offline = OfflineSteps(self.ctx)
        self.online = OnlineSteps(self.ctx)
        self.finish = FinishSteps(self.ctx)

    # -- running ------------------------------------------------------------------------

    def run(self, move_id: int) -> Move:
        """Drive the move from its recorded state to the end (this is also resume)."""
        with self._claim(move_id):
            move = self.journal.get(move_id)
            if not move.live:
                return move
            with self._no_migration(move), moving(self.observer, move, self.journal.get):
                return self._run(move)

    def _run(self, move: Move) -> Move:
        if move.state is MoveState.ABORTED:
            return rollback(self.ctx, move)
        try:
            return self._forward(move)
        except (VerificationFailed, FreezeBudgetExceeded) as exc:
            self.journal.update(move.id, state=MoveState.ABORTED, error=str(exc))
            rollback(self.ctx, self.journal.get(move.id))
            raise
        except Exception as exc:
            raise self._stopped(move.id, exc) from exc

    def _stopped(self, move_id: int, exc: Exception) -> Exception:
        """Leave a failed move in a clean, explained state; the error to raise.

        The reason goes into the journal. A move that has not switched is rolled back
        (the tenant stays home and writable; nothing of it stays at the target); one
        that has switched stays live where it stopped, to be resumed.
        """
        reason = describe(exc)
        try:
            move = self.journal.get(move_id)
        except TenantryError:
            return _one_line(exc, reason)  # the catalog is out of reach: nothing to record
        if not move.live:
            return _one_line(exc, reason)  # ended already (a step rolled itself back)
        if move.state is MoveState.ABORTED or move.state.order >= MoveState.SWITCHED.order:
            self.journal.update(move.id, error=reason)
            logger.error("move %s stopped in %s: %s", move.id, move.state.value, reason)
            if isinstance(exc, TenantryError):
                return exc
            return MoveError(
                f"move {move.id} stopped ({move.state.value}): {reason}; run `tenantry moves "
                f"resume {move.id}` once that is fixed",
                tenant_id=move.tenant_id,
                move_id=move.id,
            )
        if isinstance(exc, ReplicationFailed) and not exc.reachable:
            return exc  # left live on purpose, saying what to run: an end is out of reach
        unfinished = roll_back_failed(self.ctx, move, reason)
        if unfinished is not None:
            return MoveError(
                f"move {move.id} failed: {reason}; the roll back did not finish: "
                f"{unfinished}; run `tenantry moves abort {move.id}` once that is fixed",
                tenant_id=move.tenant_id,
                move_id=move.id,
            )
        return MoveRolledBack(
            f"move {move.id} failed and was rolled back (tenant {move.tenant_id!r} stays on "
            f"{move.source!r}, writable): {reason}",
            tenant_id=move.tenant_id,
            move_id=move.id,
        )

    def _steps(self, move: Move) -> list[tuple[MoveState, Callable[[Move], None]]]:
        steps: list[tuple[MoveState, Callable[[Move], None]]]
        if move.mode is MoveMode.ONLINE:
            steps = [
                (MoveState.COPIED, self.online.prepare),
                (MoveState.FROZEN, self.online.cutover),
            ]
        else:
            steps = [
                (MoveState.FROZEN, self.offline.freeze),
                (MoveState.COPIED, self.offline.copy),
            ]
        return [
            *steps,
            (MoveState.VERIFIED, self.finish.verify),
            (MoveState.SWITCHED, self.finish.switch),
            (MoveState.CLEANED, self.finish.clean),
        ]

    def _forward(self, move: Move) -> Move:
        if move.state is MoveState.PLANNED:
            self._check_planned(move)
        steps = self._steps(move)
        order = [MoveState.PLANNED, *(state for state, _ in steps)]
        for state, action in steps:
            if order.index(move.state) > order.index(state):
                continue
            if move.state is not state and state is not MoveState.SWITCHED:
                # Journal first: the state is committed before its step acts.
                self.journal.update(move.id, state=state, error=None)
            self.observer.step(move.id, state.value)
            self.hooks.checkpoint(state.value)
            action(self.journal.get(move.id))
            move = self.journal.get(move.id)
        self.journal.update(move.id, ended=True, stats={"finished_at": time.time()})
        self._follow_size(self.journal.get(move.id))
        self.ctx.forget(move.id)
        self.observer.step(move.id, "done")
        return self.journal.get(move.id)

    def _follow_size(self, move: Move) -> None:
        """The tenant's stored size follows it to its new shard, with the rows copied
        (or verified). Bookkeeping only: a failure here is logged, not raised."""
        rows = move.stats.get("rows")
        verified = move.stats.get("verified")
        if rows is None and isinstance(verified, dict):
            rows = sum(int(t.get("rows", 0)) for t in verified.values())
        try:
            follow_move(self.catalog, move.tenant_id, move.target, rows)
        except (TenantryError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("move %s: stored size not updated: %s", move.id, describe(exc))

    def _check_planned(self, move: Move) -> None:
        """Before anything is frozen or copied, on the live connections: source and
        target are two databases (even when the plan skipped its checks), and the
        tables' shapes are recorded, if the plan did not (to find DDL run by hand
        during the move). A refusal ends the move, rolled back (nothing was done)."""
        ctx = self.ctx
        source, target = ctx.shards(move)
        try:
            with ctx.admin(source) as src, ctx.admin(target) as dst:
                ctx.check_distinct(source, target, src, dst)
                if "table_shapes" in move.stats:
                    return
                with src.connect() as s, dst.connect() as d:
                    shapes = {
                        "source": table_shapes(ctx.tables(move.id, "source", s)),
                        "target": table_shapes(ctx.tables(move.id, "target", d)),
                    }
                self.journal.update(move.id, stats={"table_shapes": shapes})
        except MoveRefused as exc:
            self.journal.update(move.id, state=MoveState.ABORTED, error=str(exc))
            rollback(ctx, self.journal.get(move.id))
            raise

    # abort -------------------------------------------------------------------------------

    def abort(self, move_id: int) -> Move:
        """Roll back a move that has not switched: target copy deleted, source unfrozen."""
        with self._claim(move_id):
            move = self.journal.get(move_id)
            if not move.live:
                raise MoveError(
                    f"move {move_id} has ended ({move.state.value}); nothing to abort",
                    move_id=move_id,
                )
            if move.state.order >= MoveState.SWITCHED.order and move.state is not MoveState.ABORTED:
                raise MoveError(
                    f"move {move_id} has switched the tenant to {move.target!r} already; it "
                    f"can only be completed: run `tenantry moves resume {move_id}`",
                    move_id=move_id,
                )
            with moving(self.observer, move, self.journal.get):
                return rollback(self.ctx, move)

    def rollback(self, move: Move) -> Move:
        """Roll *move* back (see :func:`tenantry.moves.rollback.rollback`)."""
        return rollback(self.ctx, move)

    def admin(self, shard: Shard) -> AbstractContextManager[Engine]:
        """A short-lived engine on the shard's operations role (see
        :meth:`MoveContext.admin <tenantry.moves.context.MoveContext.admin>`)."""
        return self.ctx.admin(shard)

    # plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _no_migration(self, move: Move) -> Iterator[None]:
        """Hold the migration lock of both shards, shared, while the move runs.

        DDL under a move breaks the copy's schema check and logical replication; fleet
        migrations take the same per-database lock exclusively, so each waits for (or,
        with --no-wait, refuses) the other. A crashed move's journal entry keeps
        migrations off its shards too (see ``tenantry.migrations.fleet``).
        """
        held: list[Connection] = []
        with ExitStack() as stack:  # the engines, disposed after their connections close
            try:
                for name in dict.fromkeys((move.source, move.target)):
                    try:
                        shard = self.catalog.get_shard(name)
                    except UnknownShard:
                        continue
                    if shard.backend != "postgresql":
                        continue
                    engine = stack.enter_context(
                        operations_engine(
                            shard,
                            connect_timeout=self.ctx.settings.connect_timeout,
                            isolation_level="AUTOCOMMIT",
                        )
                    )
                    with shard_errors(shard, failed=MoveError):
                        conn = engine.connect()
                        held.append(conn)
                        got = conn.execute(
                            sa.text("SELECT pg_try_advisory_lock_shared(:k)"), {"k": MIGRATION_LOCK}
                        ).scalar()
                    if not got:
                        raise MoveError(
                            f"shard {shard.name!r} is being migrated (`tenantry migrate` holds its "
                            f"lock): run `tenantry moves resume {move.id}` when it has finished",
                            move_id=move.id,
                        )
                yield
            finally:
                for conn in held:
                    with suppress(sa.exc.SQLAlchemyError):
                        conn.close()

    @contextmanager
    def _claim(self, move_id: int) -> Iterator[None]:
        """Only one process runs a given move; a killed owner's claim dies with it."""
        if self.catalog.dialect == "postgresql":
            with self.catalog.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                # A killed owner's session ends when the server notices its socket
                # closed: moments later, not at once. Give it that long.
                deadline = time.monotonic() + _CLAIM_PATIENCE
                while (
                    not (
                        got := conn.execute(
                            sa.text("SELECT pg_try_advisory_lock(:k)"),
                            {"k": _MOVE_LOCK_BASE + move_id},
                        ).scalar()
                    )
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                if not got:
                    raise MoveError(
                        f"move {move_id} is being run by another process", move_id=move_id
                    )
                try:
                    yield
                finally:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MOVE_LOCK_BASE + move_id}
                    )
            return
        path = Path(make_url(self.catalog.url).database or "catalog")
        lock_path = path.with_name(f"{path.name}.move-{move_id}.lock")
        with open(lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MoveError(
                    f"move {move_id} is being run by another process", move_id=move_id
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _one_line(exc: Exception, reason: str) -> Exception:
    return exc if isinstance(exc, TenantryError) else MoveError(reason)
