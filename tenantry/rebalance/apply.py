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
from dataclasses import dataclass, field

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
from tenantry.shardmap.drivers import describe_error
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
    drain: Sequence[str] = (),
    refresh: bool = False,
    strategy: CostFunction | str = "by_size",
    threshold: float = 0.10,
    min_improvement: float = 0.001,
    max_moves: int | None = None,
    max_bytes: int | None = None,
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
    run = _Run(catalog, list(plan.moves), mode, observer, on_done)
    stop = stop or threading.Event()
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="tenantry-rebalance") as pool:
        while run.pending or run.running:
            run.start_ready(pool, parallel, stop)
            if not run.running:
                break
            run.collect()
    return run.done


@dataclass
class _Run:
    """A plan being applied: the moves waiting, running and done, and the shards that
    are busy or broken (a move on them failed or was skipped)."""

    catalog: Catalog
    pending: list[PlannedMove]
    mode: str
    observer: MoveObserver | None
    on_done: Callable[[AppliedMove], None] | None
    busy: set[str] = field(default_factory=set)
    #: shard -> the tenant whose move on it failed or was skipped
    broken: dict[str, str] = field(default_factory=dict)
    done: list[AppliedMove] = field(default_factory=list)
    running: dict[Future[AppliedMove], PlannedMove] = field(default_factory=dict)

    def start_ready(self, pool: ThreadPoolExecutor, parallel: int, stop: threading.Event) -> None:
        """Start the waiting moves whose shards are free, in the plan's order; skip
        those on a broken shard that no earlier move still claims."""
        # A shard is claimed by a running move, or by an earlier move still waiting:
        # a later move must not overtake it there.
        claimed = set(self.busy)
        for planned in list(self.pending):
            if stop.is_set() or len(self.running) >= parallel:
                break
            shards = {planned.source, planned.target}
            hit = sorted(shards & set(self.broken))
            if hit and not shards & claimed:
                self.pending.remove(planned)
                self.finished(
                    AppliedMove(
                        planned,
                        None,
                        f"skipped: the move of {self.broken[hit[0]]} on shard {hit[0]} did not "
                        "succeed (plan again)",
                    )
                )
                continue
            if shards & claimed:
                claimed |= shards
                continue
            self.pending.remove(planned)
            self.busy |= shards
            claimed |= shards
            self.running[pool.submit(self.move_one, planned)] = planned

    def collect(self) -> None:
        """Wait for at least one running move to end, and record what ended."""
        completed, _ = wait(self.running, return_when=FIRST_COMPLETED)
        for future in completed:
            planned = self.running.pop(future)
            self.busy.difference_update((planned.source, planned.target))
            self.finished(future.result())

    def move_one(self, planned: PlannedMove) -> AppliedMove:
        """Run one planned move (in a worker thread); its errors become its result."""
        try:
            # The plan may be stale by now: only move a tenant still where it was planned.
            if self.catalog.get_tenant(planned.tenant_id).shard != planned.source:
                return AppliedMove(planned, None, "the tenant moved since the plan was made")
            moved = run_move(
                self.catalog,
                planned.tenant_id,
                planned.target,
                mode=self.mode,
                observer=self.observer,
            )
            return AppliedMove(planned, moved)
        except (TenantryError, sa.exc.SQLAlchemyError, OSError) as exc:
            text = str(exc) if isinstance(exc, TenantryError) else describe_error(exc)
            return AppliedMove(planned, None, text)

    def finished(self, result: AppliedMove) -> None:
        """Record *result*; a failed move breaks both its shards for later moves."""
        if not result.ok:
            for shard in (result.planned.source, result.planned.target):
                self.broken.setdefault(shard, result.planned.tenant_id)
        self.done.append(result)
        if self.on_done is not None:
            self.on_done(result)
