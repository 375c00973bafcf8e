"""``tenantry rebalance``, and the plan options and runner ``shard drain`` shares."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from tenantry.cli.app import (
    MODES,
    CliState,
    emit_json,
    human_size,
    json_option,
    pass_state,
    render_table,
)
from tenantry.rebalance.planner import STRATEGIES, Plan

if TYPE_CHECKING:
    from tenantry.rebalance.apply import AppliedMove

__all__ = ["COMMANDS", "plan_options", "run_plan"]


def plan_options(func: Any) -> Any:
    """Add the options of a rebalancing plan (strategy, threshold, budgets, apply)."""
    for option in reversed(
        [
            click.option("--refresh", is_flag=True, help="Measure tenant sizes first."),
            click.option(
                "--strategy",
                type=click.Choice(sorted(STRATEGIES)),
                default="by_size",
                show_default=True,
            ),
            click.option(
                "--threshold",
                type=click.FloatRange(0.01, 0.9),
                default=0.10,
                show_default=True,
                help="How far from its weighted share a shard may be.",
            ),
            click.option("--max-moves", type=click.IntRange(1), help="At most this many moves."),
            click.option("--max-bytes", type=click.IntRange(1), help="At most this many bytes."),
            click.option("--apply", is_flag=True, help="Run the plan (default: print it)."),
            click.option(
                "--parallel",
                type=click.IntRange(1, 32),
                default=1,
                show_default=True,
                help="Moves at once (never two on one shard).",
            ),
            click.option("--mode", type=MODES, default="auto", show_default=True),
        ]
    ):
        func = option(func)
    return func


def _show_plan(state: CliState, plan: Plan) -> None:
    render_table(
        state.console,
        ["tenant", "from", "to", "size"],
        ([m.tenant_id, m.source, m.target, human_size(m.bytes)] for m in plan.moves),
        title="plan",
    )
    total_before = sum(plan.before.values()) or 1.0
    total_after = sum(plan.after.values()) or 1.0
    render_table(
        state.console,
        ["shard", "share", "before", "after"],
        (
            [
                s,
                f"{plan.shares.get(s, 0.0):.1%}",
                f"{plan.before[s] / total_before:.1%}",
                f"{plan.after[s] / total_after:.1%}",
            ]
            for s in sorted(plan.before)
        ),
        title="load per shard (share of the pool)",
    )
    state.console.print(
        f"{len(plan.moves)} move(s), {human_size(plan.bytes)}; spread "
        f"{plan.spread_before():.1%} -> {plan.spread_after():.1%} (threshold "
        f"{plan.threshold:.0%}); {plan.reason}"
    )
    spreads = (plan.spread_before(), plan.spread_after())
    in_bytes = (plan.bytes_spread_before(), plan.bytes_spread_after())
    if [round(x, 3) for x in spreads] != [round(x, 3) for x in in_bytes]:
        # The strategy weighs more than bytes: show what the shards really hold too.
        state.console.print(
            f"spread in measured bytes {in_bytes[0]:.1%} -> {in_bytes[1]:.1%} "
            "(the strategy's cost differs from bytes)"
        )
    for warning in plan.warnings:
        state.console.print(f"[yellow]warning: {warning}[/]")


def _apply(state: CliState, plan: Plan, as_json: bool, **running: Any) -> list[AppliedMove]:
    """Apply *plan* (*running*: apply_plan's parallel and mode), its moves shown (not
    with --json); the first Ctrl-C stops starting moves, the second interrupts them."""
    from tenantry.cli.moves import RichObserver
    from tenantry.rebalance.apply import apply_plan

    stop = threading.Event()

    def interrupted(_signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        state.console.print(
            "[yellow]stopping: the moves in flight finish, no new ones start "
            "(Ctrl-C again to interrupt them; `tenantry moves resume` finishes them)[/]"
        )

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        with RichObserver(state.console, not as_json) as observer:
            counted = observer.display.counter("moves", len(plan.moves), "moves")
            moved = [0]

            def done(result: AppliedMove) -> None:
                moved[0] += result.planned.bytes if result.ok else 0
                outcome = "done" if result.ok else "failed"
                counted.advance(
                    detail=f"{result.planned.tenant_id}: {outcome}; "
                    f"{human_size(moved[0])} of {human_size(plan.bytes)} moved"
                )

            results = apply_plan(
                state.catalog(), plan, stop=stop, observer=observer, on_done=done, **running
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    return results


def run_plan(
    state: CliState,
    *,
    drain: Sequence[str],
    apply: bool,
    parallel: int,
    mode: str,
    as_json: bool,
    **planning: Any,
) -> None:
    """Plan (draining *drain*, with :func:`plan_for`'s *planning* options: refresh,
    strategy, threshold, max_moves, max_bytes), then print the plan or apply it and
    print what happened."""
    from tenantry.rebalance.apply import plan_for

    plan = plan_for(state.catalog(), drain=drain, **planning)
    if as_json:
        for warning in plan.warnings:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
    if not apply:
        if as_json:
            emit_json(plan.to_record())
        else:
            _show_plan(state, plan)
            if plan.moves:
                state.console.print("dry run: add --apply to run it")
        return
    if not as_json:
        _show_plan(state, plan)
    results = _apply(state, plan, as_json, parallel=parallel, mode=mode)
    if as_json:
        emit_json({**plan.to_record(), "applied": [_applied_record(r) for r in results]})
    else:
        _show_applied(state, plan, results)
    if any(not r.ok for r in results):
        raise SystemExit(1)


def _applied_record(result: AppliedMove) -> dict[str, Any]:
    """One applied move in ``rebalance --apply --json``."""
    return {
        "tenant": result.planned.tenant_id,
        "from": result.planned.source,
        "to": result.planned.target,
        "ok": result.ok,
        "move": result.move.id if result.move else None,
        "error": result.error,
    }


def _show_applied(state: CliState, plan: Plan, results: list[AppliedMove]) -> None:
    """The moves that failed, and how much of the plan ran."""
    failed = [r for r in results if not r.ok]
    for r in failed:
        state.console.print(f"[red]{r.planned.tenant_id}: {r.error}[/]")
    state.console.print(
        f"{len(results) - len(failed)} of {len(plan.moves)} planned move(s) done"
        + ("" if len(results) == len(plan.moves) else "; stopped early: plan again")
    )


@click.command("rebalance")
@plan_options
@json_option
@pass_state
def rebalance_command(state: CliState, /, **options: Any) -> None:
    """Even the shared pool's load with as little data moved as possible (dry run)."""
    run_plan(state, drain=(), **options)


COMMANDS = [rebalance_command]
