"""``tenantry move``, ``promote``, ``demote`` and ``moves list|show|resume|abort``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import TaskID

from tenantry import moves
from tenantry.cli.app import (
    CliState,
    emit_json,
    human_size,
    json_option,
    mode_options,
    pass_state,
    render_table,
)
from tenantry.cli.progress import Display
from tenantry.moves import Move

__all__ = ["COMMANDS", "RichObserver"]


class RichObserver:
    """Shows a move's steps and a line per table (rows, bytes, rate) on a terminal
    (:mod:`tenantry.cli.progress`); its notes are printed unless *enabled* is False
    (``--json``)."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.display = Display(console, enabled and console.is_terminal)
        self._tables: dict[str, tuple[TaskID, float]] = {}
        self._step: TaskID | None = None

    def __enter__(self) -> RichObserver:
        self.display.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.display.__exit__(*exc)

    def step(self, move_id: int, state: str) -> None:
        """Show that move *move_id* entered *state*."""
        if self._step is not None:
            self.display.finish(self._step)
        self._step = self.display.line(f"move {move_id}: {state}")

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        """Show a table's progress: rows and bytes so far, and the rate."""
        task, started = self._tables.get(table, (None, time.monotonic()))
        if task is None:
            task = self.display.line(f"  {table}")
            self._tables[table] = (task, started)
        elapsed = max(time.monotonic() - started, 1e-6)
        detail = f"{rows:,} rows"
        if size:
            detail += f", {human_size(size)} ({human_size(size / elapsed)}/s)"
        self.display.update(task, detail)

    def note(self, message: str) -> None:
        """Show a note of the mover (a wait, a warning, a choice it made)."""
        if self.enabled:
            self.display.note(f"[yellow]{message}[/]")


def _summary(console: Console, move: Move) -> None:
    stats = move.stats
    freeze = stats.get("freeze_seconds")
    outcome = "done" if move.succeeded else move.state.value
    if "rows" in stats:  # an offline copy counts what it copied
        what = (
            f"{int(stats['rows']):,} rows, {human_size(int(stats.get('bytes', 0)))} copied in "
            f"{float(stats.get('copy_seconds', 0.0)):.2f}s"
        )
    else:  # logical replication copied them; the verification counted them
        verified = stats.get("verified") or {}
        rows = sum(int(t.get("rows", 0)) for t in verified.values())
        what = f"{rows:,} rows replicated and verified"
    console.print(
        f"move {move.id}: {move.tenant_id} {move.source} -> {move.target}: {outcome}; {what}"
        + (f"; writes frozen {float(freeze):.2f}s" if freeze is not None else "")
    )


def _run_move(
    state: CliState, as_json: bool, call: Callable[..., Move], *args: Any, **options: Any
) -> None:
    """Run *call* (``moves.move``, ``promote`` or ``demote``) on the catalog with *args*
    and *options*, its steps shown (not with --json); then report the move."""
    with RichObserver(state.console, not as_json) as observer:
        move = call(state.catalog(), *args, observer=observer, **options)
    if as_json:
        emit_json(move.to_record())
    else:
        _summary(state.console, move)


@click.command("move")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--to", "to_shard", required=True, metavar="SHARD", help="Target shard.")
@mode_options
@json_option
@pass_state
def move_command(
    state: CliState, tenant_id: str, to_shard: str, mode: str, max_freeze: float, as_json: bool
) -> None:
    """Move TENANT to shard SHARD, verified, with nothing lost."""
    _run_move(state, as_json, moves.move, tenant_id, to_shard, mode=mode, max_freeze=max_freeze)


@click.command("promote")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--to", metavar="SHARD", help="An empty dedicated shard.")
@click.option("--server", metavar="URL", help="Provision a new dedicated database here.")
@click.option("--database", metavar="DBNAME", help="Name of the new database [default: TENANT].")
@click.option(
    "--routing-url",
    metavar="URL",
    help="Server URL of the routing role [default: the tenant's routing role now, on --server].",
)
@click.option(
    "--allow-unsafe-routing-role",
    is_flag=True,
    help="Local development only: let the operations role route too (warns).",
)
@click.option("--alembic-config", type=click.Path(path_type=Path))
@mode_options
@json_option
@pass_state
def promote_command(
    state: CliState,
    /,
    tenant_id: str,
    allow_unsafe_routing_role: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Move shared TENANT to a dedicated database (--to SHARD or --server URL)."""
    if (options["to"] is None) == (options["server"] is None):
        raise click.UsageError("give exactly one of --to SHARD or --server URL")
    unsafe = allow_unsafe_routing_role or None
    _run_move(state, as_json, moves.promote, tenant_id, allow_unsafe_routing_role=unsafe, **options)


@click.command("demote")
@click.argument("tenant_id", metavar="TENANT")
@click.option("--to", metavar="SHARD", help="Shared shard [default: the hash ring].")
@click.option("--drop-source", is_flag=True, help="Drop the dedicated database afterwards.")
@mode_options
@json_option
@pass_state
def demote_command(state: CliState, /, tenant_id: str, as_json: bool, **options: Any) -> None:
    """Move dedicated TENANT into the shared pool."""
    _run_move(state, as_json, moves.demote, tenant_id, **options)


@click.group("moves")
def moves_group() -> None:
    """List, inspect, resume and abort moves."""


@moves_group.command("list")
@click.option("--live", is_flag=True, help="Only unfinished moves.")
@json_option
@pass_state
def moves_list(state: CliState, live: bool, as_json: bool) -> None:
    """List moves, newest first; unfinished ones say what to run."""
    found = moves.list_moves(state.catalog(), live=True if live else None)
    if as_json:
        emit_json([m.to_record() for m in found])
        return
    render_table(
        state.console,
        ["id", "tenant", "kind", "from", "to", "state", "next / error"],
        (
            [
                m.id,
                m.tenant_id,
                m.kind.value,
                m.source,
                m.target,
                m.state.value + ("" if m.live else " (ended)"),
                m.next_step() or m.error or "",
            ]
            for m in found
        ),
        title="moves",
    )


@moves_group.command("show")
@click.argument("move_id", type=int)
@json_option
@pass_state
def moves_show(state: CliState, move_id: int, as_json: bool) -> None:
    """Show one move in full."""
    record = moves.get_move(state.catalog(), move_id).to_record()
    if as_json:
        emit_json(record)
        return
    render_table(
        state.console,
        ["field", "value"],
        ([k, v] for k, v in record.items() if k not in ("stats", "artifacts")),
        title=f"move {move_id}",
    )
    for key in ("rows", "bytes", "copy_seconds", "freeze_seconds", "cleaned_rows"):
        if key in record["stats"]:
            state.console.print(f"{key}: {record['stats'][key]}")


@moves_group.command("resume")
@click.argument("move_id", type=int, required=False)
@json_option
@pass_state
def moves_resume(state: CliState, move_id: int | None, as_json: bool) -> None:
    """Finish move MOVE_ID, or every unfinished move."""
    with RichObserver(state.console, not as_json) as observer:
        done = moves.resume(state.catalog(), move_id, observer=observer)
    if as_json:
        emit_json([m.to_record() for m in done])
        return
    if not done:
        state.console.print("no unfinished moves")
    for move in done:
        _summary(state.console, move)


@moves_group.command("abort")
@click.argument("move_id", type=int)
@json_option
@pass_state
def moves_abort(state: CliState, move_id: int, as_json: bool) -> None:
    """Roll back MOVE_ID (only before its switch)."""
    move = moves.abort(state.catalog(), move_id)
    if as_json:
        emit_json(move.to_record())
    else:
        state.console.print(f"move {move.id} rolled back: {move.tenant_id} stays on {move.source}")


@moves_group.command("gc")
@click.option("--apply", is_flag=True, help="Drop them (default: only list them).")
@json_option
@pass_state
def moves_gc(state: CliState, apply: bool, as_json: bool) -> None:
    """Find (and with --apply drop) replication objects no live move owns."""
    found = moves.collect_garbage(state.catalog(), apply=apply)
    if as_json:
        emit_json(
            [
                {
                    "shard": f.shard,
                    "kind": f.kind,
                    "name": f.name,
                    "dropped": f.dropped,
                    "error": f.error,
                }
                for f in found
            ]
        )
        return
    render_table(
        state.console,
        ["shard", "kind", "name", "action"],
        (
            [f.shard, f.kind, f.name, f.error or ("dropped" if f.dropped else "would drop")]
            for f in found
        ),
        title="leftover replication objects",
    )
    if found and not apply:
        state.console.print("dry run: run `tenantry moves gc --apply` to drop them")


COMMANDS = [move_command, promote_command, demote_command, moves_group]
