"""``tenantry migrate upgrade|downgrade|status``: the application's schema on every shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from tenantry import migrations
from tenantry.cli.app import (
    TIERS,
    CliState,
    emit_json,
    json_option,
    pass_state,
    render_table,
)
from tenantry.cli.progress import Display, shows_progress
from tenantry.migrations import FleetStatus
from tenantry.migrations.fleet import FleetRun, ShardMigration, select_shards

__all__ = ["COMMANDS"]


_RESULT_STYLE = {
    "upgraded": "green",
    "downgraded": "green",
    "skipped": "dim",
    "failed": "bold red",
    "locked": "yellow",
}


def _fleet_options(func: Any) -> Any:
    func = click.option(
        "--alembic-config",
        type=click.Path(path_type=Path),
        help="The application's alembic.ini or migrations folder "
        "[default: TENANTRY_ALEMBIC_CONFIG].",
    )(func)
    func = click.option("--tier", type=TIERS, help="Only shards of this tier.")(func)
    func = click.option(
        "--shard", "shards", multiple=True, metavar="NAME", help="Only this shard (repeatable)."
    )(func)
    return func


def _run_options(func: Any) -> Any:
    func = click.option(
        "--jobs",
        "-j",
        type=click.IntRange(1, 64),
        default=4,
        show_default=True,
        help="Databases migrated at once (one connection each).",
    )(func)
    func = click.option(
        "--no-wait",
        is_flag=True,
        help="Leave a database another runner is migrating to it, instead of waiting.",
    )(func)
    return func


def _run(
    state: CliState,
    direction: str,
    revision: str,
    *,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    jobs: int,
    no_wait: bool,
    as_json: bool,
) -> None:
    catalog = state.catalog()
    count = len(select_shards(catalog, shards or None, tier))
    call = migrations.upgrade if direction == "upgrade" else migrations.downgrade
    with Display(state.console, shows_progress(state.console, as_json)) as display:
        counted = display.counter(f"{direction} to {revision}", count, "shards")

        def advance(result: ShardMigration) -> None:
            counted.advance(detail=f"{result.shard}: {result.result}")

        run: FleetRun = call(
            catalog,
            revision,
            jobs=jobs,
            shards=shards or None,
            tier=tier,
            alembic_config=alembic_config,
            wait=not no_wait,
            on_result=advance,
        )
    _render_run(state, run, as_json)
    if not run.ok:
        raise SystemExit(1)


def _render_run(state: CliState, run: FleetRun, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "target": run.target,
                "ok": run.ok,
                "shards": [
                    {
                        "shard": r.shard,
                        "tier": r.tier.value,
                        "from": r.before,
                        "to": r.after,
                        "result": r.result,
                        "seconds": r.seconds,
                        "error": r.error,
                        "warnings": list(r.warnings),
                    }
                    for r in run.results
                ],
            }
        )
        return
    render_table(
        state.console,
        ["shard", "tier", "from", "to", "result", "seconds"],
        (
            [
                r.shard,
                r.tier.value,
                r.before or "-",
                r.after or "-",
                f"[{_RESULT_STYLE[r.result]}]{r.result}[/]",
                f"{r.seconds:.2f}",
            ]
            for r in run.results
        ),
        title=f"migration to {run.target}",
    )
    for r in run.failed:
        # Error text is the database's or the migration's: brackets in it are not markup.
        state.console.print(f"[red]{r.shard}: {escape(r.error or '')}[/]")
    for r in run.results:
        for warning in r.warnings:
            state.console.print(f"[yellow]warning: {escape(warning)}[/]")
    done = sum(1 for r in run.results if r.ok)
    state.console.print(f"{done} of {len(run.results)} shard(s) at {run.target}")


@click.group("migrate")
def migrate_group() -> None:
    """Run the application's Alembic migrations on every shard of the fleet."""


def _direction_command(
    direction: str, revision: Callable[[Callable[..., Any]], Callable[..., Any]], summary: str
) -> click.Command:
    """``migrate upgrade`` or ``migrate downgrade``: the same options, one direction."""

    @migrate_group.command(direction, help=summary)
    @revision
    @_fleet_options
    @_run_options
    @json_option
    @pass_state
    def command(state: CliState, /, revision: str, **options: Any) -> None:
        _run(state, direction, revision, **options)

    return command


migrate_upgrade = _direction_command(
    "upgrade",
    click.argument("revision", default="head"),
    "Upgrade every shard (or --shard/--tier) to REVISION [default: head].",
)
migrate_downgrade = _direction_command(
    "downgrade",
    click.argument("revision"),
    "Downgrade every shard (or --shard/--tier) to REVISION.",
)


@migrate_group.command("status")
@_fleet_options
@json_option
@pass_state
def migrate_status(
    state: CliState,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    as_json: bool,
) -> None:
    """Show every shard's revision against head, and role warnings."""
    fleet = migrations.status(
        state.catalog(), shards=shards or None, tier=tier, alembic_config=alembic_config
    )
    if as_json:
        emit_json(_status_record(fleet))
    else:
        _render_status(state, fleet)
    if not fleet.in_step:
        raise SystemExit(1)


def _status_record(fleet: FleetStatus) -> dict[str, Any]:
    """``migrate status --json``."""
    return {
        "head": fleet.head,
        "in_step": fleet.in_step,
        "verdict": fleet.verdict,
        "shards": [
            {
                "shard": s.shard,
                "tier": s.tier.value,
                "revision": s.revision,
                "status": s.verdict,
                "tenantry_revision": s.tenantry_revision,
                "error": s.error,
            }
            for s in fleet.shards
        ],
        "warnings": fleet.warnings,
    }


def _render_status(state: CliState, fleet: FleetStatus) -> None:
    """``migrate status``: the table, the warnings and the verdict."""
    render_table(
        state.console,
        ["shard", "tier", "revision", "status"],
        (
            [
                s.shard,
                s.tier.value,
                s.revision or "-",
                s.verdict + (f": {escape(s.error)}" if s.error else ""),
            ]
            for s in fleet.shards
        ),
        title=f"fleet schema (head {fleet.head})",
    )
    for warning in fleet.warnings:
        state.console.print(f"[yellow]warning: {escape(warning)}[/]")
    state.console.print(fleet.verdict)


COMMANDS = [migrate_group]
