"""Applying a rebalancing plan through the mover.

At most *parallel* moves run at once, and never two on the same shard (as source or
target), so no shard carries more than one copy at a time. Each move is journaled and
resumable like any other. Setting *stop* (the CLI does on Ctrl-C) lets the moves in
flight finish and starts no more; the rest can be planned again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import sqlalchemy as sa

from tenantry.errors import ConfigurationError, TenantryError
from tenantry.moves.api import move as run_move
from tenantry.moves.hooks import MoveObserver
from tenantry.moves.journal import Move
from tenantry.moves.planner import Plan, PlannedMove, TenantSize, plan_rebalance
from tenantry.moves.sizes import measure_sizes, stored_sizes
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import describe_error

__all__ = ["AppliedMove", "apply_plan", "plan_for"]


@dataclass(frozen=True, slots=True)
class AppliedMove:
    """What happened to one planned move."""

    planned: PlannedMove
    move: Move | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.move is not None and self.move.succeeded


def plan_for(
    catalog: Catalog,
    *,
    refresh: bool = False,
    strategy: str = "by_size",
    threshold: float = 0.10,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    drain: Sequence[str] = (),
) -> Plan:
    """Plan with the catalog's map and stored sizes (measured now if *refresh* or none)."""
    stored = {t: size for t, (size, _shard, _when) in stored_sizes(catalog).items()}
    if refresh or not stored:
        stored = measure_sizes(catalog)
    sizes: dict[str, TenantSize] = dict(stored)
    return plan_rebalance(
        catalog.snapshot(),
        sizes,
        strategy=strategy,
        threshold=threshold,
        max_moves=max_moves,
        max_bytes=max_bytes,
        drain=tuple(drain),
    )


def apply_plan(
    catalog: Catalog,
    plan: Plan,
    *,
    parallel: int = 1,
    mode: str = "auto",
    stop: threading.Event | None = None,
    observer: MoveObserver | None = None,
    on_done: Callable[[AppliedMove], None] | None = None,
) -> list[AppliedMove]:
    """Run the plan's moves, at most one per shard at a time; return what happened."""
    if parallel < 1:
        raise ConfigurationError(f"parallel must be at least 1, got {parallel}")
    stop = stop or threading.Event()
    pending = list(plan.moves)
    busy: set[str] = set()
    done: list[AppliedMove] = []
    running: dict[Future[AppliedMove], PlannedMove] = {}

    def one(planned: PlannedMove) -> AppliedMove:
        try:
            # The plan may be stale by now: only move a tenant still where it was planned.
            if catalog.get_tenant(planned.tenant_id).shard != planned.source:
                return AppliedMove(planned, None, "the tenant moved since the plan was made")
            moved = run_move(
                catalog, planned.tenant_id, planned.target, mode=mode, observer=observer
            )
            return AppliedMove(planned, moved)
        except (TenantryError, sa.exc.SQLAlchemyError, OSError) as exc:
            text = str(exc) if isinstance(exc, TenantryError) else describe_error(exc)
            return AppliedMove(planned, None, text)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="tenantry-rebalance") as pool:
        while pending or running:
            while not stop.is_set() and len(running) < parallel:
                ready = next(
                    (m for m in pending if m.source not in busy and m.target not in busy), None
                )
                if ready is None:
                    break
                pending.remove(ready)
                busy.update((ready.source, ready.target))
                running[pool.submit(one, ready)] = ready
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                planned = running.pop(future)
                busy.difference_update((planned.source, planned.target))
                result = future.result()
                done.append(result)
                if on_done is not None:
                    on_done(result)
    return done
