"""The budgeted freeze of an online move, and catching up between its attempts.

A budgeted freeze freezes the tenant, waits out older transactions, writes a sentinel
on the source and awaits it on the target — proof that the target holds every
acknowledged write — then runs what must happen frozen, all within the move's
``max_freeze`` seconds; else it unfreezes the tenant, lets replication catch up and
tries again, a bounded number of times. Online moves take their cuts
(:func:`take_cut`) and their final freeze this way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import FreezeBudgetExceeded, FreezeTimeout
from tenantry.moves import replication as repl
from tenantry.moves.context import MoveContext
from tenantry.moves.freeze import SNAPSHOT_APPLICATION
from tenantry.moves.journal import Move
from tenantry.moves.watch import Watch
from tenantry.observability.moves import lagging
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.residency import Residency, commit_residency

__all__ = [
    "DEFAULT_FREEZE_ATTEMPTS",
    "DEFAULT_MAX_FREEZE",
    "OutOfBudget",
    "budgeted_freeze",
    "catch_up",
    "left",
    "snapshots",
    "take_cut",
]

DEFAULT_MAX_FREEZE = 1.0
DEFAULT_FREEZE_ATTEMPTS = 5
_CAUGHT_UP_BYTES = 64 * 1024

_T = TypeVar("_T")

#: What runs inside a freeze: given the source and target connections and the deadline.
Inside = Callable[[Connection, Connection, float], _T]


class OutOfBudget(Exception):
    """This freeze attempt cannot finish within the budget."""


def left(deadline: float) -> float:
    """Seconds left until *deadline* (``time.monotonic()``), negative once past."""
    return deadline - time.monotonic()


def catch_up(
    ctx: MoveContext, src: Connection, slot: str, *, timeout: float, watch: Watch | None = None
) -> None:
    """Wait (at most *timeout* seconds) until the subscription's lag behind the source
    is small; with *watch*, stop when replication has failed or stalled."""
    deadline = time.monotonic() + timeout
    while True:
        if watch is not None:
            watch.check(syncing=False)  # the source first: its failure names it
        lag = repl.lag_bytes(src, slot)
        if lag is not None:
            lagging(ctx.observer, lag)
            ctx.observer.note(f"replication lag: {lag:,} bytes")
        if lag is None or lag <= _CAUGHT_UP_BYTES or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def budgeted_freeze(
    ctx: MoveContext,
    move: Move,
    src_engine: Engine,
    dst_engine: Engine,
    inside: Inside[_T],
    *,
    checkpoint: str,
    stay: bool,
) -> _T:
    """Freeze, wait out older transactions, write the sentinel and await it, then run
    *inside* — all within the budget, else unfreeze, catch up and retry (a bounded
    number of times, the tenant left writable between two attempts at least as long as
    the first of them held it). With *stay* the tenant is left frozen on success."""
    budget = float(move.options.get("max_freeze", DEFAULT_MAX_FREEZE))
    attempts = int(move.options.get("freeze_attempts", DEFAULT_FREEZE_ATTEMPTS))
    slot = repl.move_names(move.artifacts, move.id, ctx.catalog.fleet_id()).name
    with src_engine.connect() as src, dst_engine.connect() as dst:
        src = src.execution_options(**WRITE)
        for attempt in range(1, attempts + 1):
            _residency(ctx, move, src, Residency.FROZEN)
            frozen_at, started = time.time(), time.monotonic()
            ctx.hooks.checkpoint(checkpoint)
            try:
                result = _attempt(ctx, move, src, dst, inside, budget, started + budget, stay)
            except OutOfBudget as exc:
                reason = str(exc)
            else:
                if stay:
                    ctx.journal.update(
                        move.id, stats={"frozen_at": frozen_at, "freeze_attempts": attempt}
                    )
                else:
                    _residency(ctx, move, src, Residency.ACTIVE)
                    held = round(time.monotonic() - started, 3)
                    ctx.journal.update(move.id, stats={"cut_freeze_seconds": held})
                return result
            _residency(ctx, move, src, Residency.ACTIVE)
            thawed = time.monotonic()
            held = thawed - started
            ctx.observer.note(
                f"freeze attempt {attempt}: {reason}; unfrozen after {held:.3f}s, catching up"
            )
            with src_engine.connect() as plain:
                auto = plain.execution_options(isolation_level="AUTOCOMMIT")
                catch_up(ctx, auto, slot, timeout=max(1.0, budget * 5))
            if attempt < attempts:
                # The tenant stays writable at least as long as the attempt held it:
                # retries never freeze it more than half the time, however soon the
                # mover caught up (its writers get through between attempts).
                time.sleep(max(0.0, held - (time.monotonic() - thawed)))
        raise FreezeBudgetExceeded(
            f"gave up after {attempts} freeze attempts: {reason}; the tenant was "
            "unfrozen each time and the move was rolled back",
            tenant_id=move.tenant_id,
            move_id=move.id,
        )


def _attempt(
    ctx: MoveContext,
    move: Move,
    src: Connection,
    dst: Connection,
    inside: Inside[_T],
    budget: float,
    deadline: float,
    stay: bool,
) -> _T:
    """One attempt, the tenant frozen: :class:`OutOfBudget` when it cannot finish in
    time; :class:`FreezeBudgetExceeded` (unfrozen) when older transactions outlast it."""
    try:
        ctx.wait_out(src, timeout=budget)
    except FreezeTimeout as exc:
        # Older transactions outlasting the budget: another attempt would only
        # refuse more of the tenant's writes. Stop now.
        _residency(ctx, move, src, Residency.ACTIVE)
        raise FreezeBudgetExceeded(
            f"{exc}; the tenant was unfrozen and the move was rolled back",
            tenant_id=move.tenant_id,
            move_id=move.id,
        ) from None
    token = uuid.uuid4().hex
    with src.begin():
        repl.write_sentinel(src, move.tenant_id, move.id, token)
    if left(deadline) <= 0 or not repl.wait_sentinel(
        dst, move.tenant_id, move.id, token, timeout=left(deadline)
    ):
        raise OutOfBudget(f"the sentinel did not reach the target within {budget:g}s")
    result = inside(src, dst, deadline)
    if stay and left(deadline) < 0:
        raise OutOfBudget(f"the freeze outlasted its budget of {budget:g}s")
    return result


def _residency(ctx: MoveContext, move: Move, src: Connection, state: Residency) -> None:
    commit_residency(src, move.tenant_id, state, ctx.catalog.map_version())


@contextmanager
def snapshots(src_engine: Engine, dst_engine: Engine) -> Iterator[tuple[Connection, Connection]]:
    """A REPEATABLE READ connection on each end, read-only, for a cut's snapshots.

    Named :data:`~tenantry.moves.freeze.SNAPSHOT_APPLICATION`: they cannot write, so
    the freezes of other moves on the same database do not wait for them.
    """
    with src_engine.connect() as src, dst_engine.connect() as dst:
        for conn in (src, dst):
            conn.execute(
                sa.text("SELECT set_config('application_name', :n, false)"),
                {"n": SNAPSHOT_APPLICATION},
            )
            conn.commit()
        yield (
            src.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True),
            dst.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True),
        )


def take_cut(
    ctx: MoveContext,
    move: Move,
    src_engine: Engine,
    dst_engine: Engine,
    src_snap: Connection,
    dst_snap: Connection,
) -> str:
    """A budgeted freeze that takes a snapshot on both ends and returns the source's
    WAL insert position; the tenant is unfrozen again before it returns."""

    def take(src: Connection, _dst: Connection, _deadline: float) -> str:
        for conn in (src_snap, dst_snap):
            if conn.in_transaction():  # from an attempt that ran out of budget
                conn.rollback()
            conn.begin()
            conn.execute(sa.text("SELECT pg_current_snapshot()")).one()
        # Every transaction committing after the unfreeze commits past this point.
        with src.begin():
            return str(src.execute(sa.text("SELECT pg_current_wal_insert_lsn()")).scalar())

    return budgeted_freeze(
        ctx, move, src_engine, dst_engine, take, checkpoint="online-cut-frozen", stay=False
    )
