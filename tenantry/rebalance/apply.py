"""Applying a rebalancing plan through the mover.

At most *parallel* moves run at once, and never two on the same shard (as source or
target), so no shard carries more than one copy at a time. Each move is journaled and
resumable like any other. Each shard sees its moves in the plan's order, so a run
stopped half-way leaves the pool no worse than before. Setting *stop* (the CLI does on
Ctrl-C) lets the moves in flight finish and starts no more; the rest can be planned
again.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import sqlalchemy as sa

from tenantry.errors import ConfigurationError, TenantryError
from tenantry.moves import Move, MoveObserver
from tenantry.moves import move as run_move
from tenantry.rebalance.planner import (
    CostFunction,
    Plan,
    PlannedMove,
    TenantSize,
    plan_rebalance,
)
from tenantry.rebalance.sizes import measure_sizes, stale_sizes, stored_sizes
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import describe_error
from tenantry.shardmap.model import Shard, ShardState, Tier

__all__ = ["AppliedMove", "apply_plan", "plan_for", "start_drain"]


@dataclass(frozen=True, slots=True)
class AppliedMove:
    """What happened to one planned move."""

    planned: PlannedMove
    move: Move | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the planned move ran and succeeded."""
        return self.move is not None and self.move.succeeded


def plan_for(
    catalog: Catalog,
    *,
    refresh: bool = False,
    strategy: CostFunction | str = "by_size",
    threshold: float = 0.10,
    min_improvement: float = 0.001,
    max_moves: int | None = None,
    max_bytes: int | None = None,
    drain: Sequence[str] = (),
) -> Plan:
    """Plan with the catalog's map and stored sizes (measured now if *refresh* or none).

    The plan's ``warnings`` say when the stored sizes may mislead it (see
    :func:`~tenantry.rebalance.sizes.stale_sizes`)."""
    stored = {t: size for t, (size, _shard, _when) in stored_sizes(catalog).items()}
    if refresh or not stored:
        stored = measure_sizes(catalog)
    stale = stale_sizes(catalog)
    sizes: dict[str, TenantSize] = dict(stored)
    plan = plan_rebalance(
        catalog.snapshot(),
        sizes,
        strategy=strategy,
        threshold=threshold,
        min_improvement=min_improvement,
        max_moves=max_moves,
        max_bytes=max_bytes,
        drain=tuple(drain),
    )
    if stale:
        warning = "; ".join(stale) + ": plan with --refresh to measure them again"
        plan = dataclasses.replace(plan, warnings=(warning,))
    return plan


def start_drain(catalog: Catalog, name: str) -> Shard:
    """Mark shared shard *name* draining (it takes no new tenants) and return it.

    A draining or retired shard is left as it is; a dedicated shard is refused, before
    anything changes: its tenant leaves by ``demote`` or ``move``.
    """
    shard = catalog.get_shard(name)
    if shard.tier is not Tier.SHARED:
        raise ConfigurationError(
            f"only shared shards can be drained: {name!r} is {shard.tier.value} "
            "(move or demote its tenant instead)",
            field="drain",
        )
    if shard.state is ShardState.ACTIVE:
        shard = catalog.set_shard_state(name, ShardState.DRAINING)
    return shard


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
    """Run the plan's moves, at most one per shard at a time; return what happened.

    Each shard sees its moves in the plan's order, so whatever has run when the work
    stops leaves every shard at a load the plan passed through (the planner makes each
    of those no worse than before). For the same reason, once a move fails, the later
    moves touching its shards are skipped and reported: plan again.
    """
    if parallel < 1:
        raise ConfigurationError(f"parallel must be at least 1, got {parallel}")
    stop = stop or threading.Event()
    pending = list(plan.moves)
    busy: set[str] = set()
    broken: dict[str, str] = {}  # shard -> the tenant whose move on it failed or was skipped
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

    def finished(result: AppliedMove) -> None:
        if not result.ok:
            for shard in (result.planned.source, result.planned.target):
                broken.setdefault(shard, result.planned.tenant_id)
        done.append(result)
        if on_done is not None:
            on_done(result)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="tenantry-rebalance") as pool:
        while pending or running:
            # A shard is claimed by a running move, or by an earlier move still waiting:
            # a later move must not overtake it there.
            claimed = set(busy)
            for planned in list(pending):
                if stop.is_set() or len(running) >= parallel:
                    break
                shards = {planned.source, planned.target}
                hit = sorted(shards & set(broken))
                if hit and not shards & claimed:
                    pending.remove(planned)
                    finished(
                        AppliedMove(
                            planned,
                            None,
                            f"skipped: the move of {broken[hit[0]]} on shard {hit[0]} did not "
                            "succeed (plan again)",
                        )
                    )
                    continue
                if shards & claimed:
                    claimed |= shards
                    continue
                pending.remove(planned)
                busy |= shards
                claimed |= shards
                running[pool.submit(one, planned)] = planned
            if not running:
                break
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                planned = running.pop(future)
                busy.difference_update((planned.source, planned.target))
                finished(future.result())
    return done
