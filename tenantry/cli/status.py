"""``tenantry status``: the whole fleet on one screen (:mod:`tenantry.survey.status`).

Exit status: 0 when nothing needs attention, 3 when something does (the ``attention``
lines say what and what to run), 1 when the command itself failed (the catalog cannot
be read, bad input).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from tenantry.cli.app import CliState, emit_json, human_size, json_option, pass_state, render_table
from tenantry.survey.status import FleetStatus, ShardStatus, fleet_status

__all__ = ["ATTENTION", "COMMANDS", "render_status"]

#: The exit status when something needs an operator's attention.
ATTENTION = 3


def _size(n: int | None) -> str:
    return "-" if n is None else human_size(n)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def render_status(console: Console, fleet: FleetStatus) -> None:
    """Print *fleet* as ``tenantry status`` shows it: a header, shards, servers, moves
    in flight, and what needs attention."""
    reachable = sum(1 for s in fleet.shards if s.reachable)
    console.print(
        f"[bold]fleet[/] {escape(fleet.catalog)}  map version {fleet.map_version}  "
        f"app head {fleet.app_head or '(unknown: set TENANTRY_ALEMBIC_CONFIG)'}  "
        f"tenantry {fleet.tenantry_head}  "
        f"{reachable} of {len(fleet.shards)} shard(s) reachable ({fleet.seconds:.1f}s)",
        highlight=False,
    )

    def schema(app: str | None, verdict: str | None) -> str:
        text = app or "-"
        if verdict not in (None, "ok"):
            text += f" [yellow]({verdict})[/]"
        return text

    def slots(s: ShardStatus) -> str:
        return ", ".join(
            escape(x.name)
            + (f" (move {x.move})" if x.move else "")
            + (" [red](leftover)[/]" if x.leftover else "")
            + f": {_size(x.lag_bytes)} behind"
            for x in s.slots
        )

    render_table(
        console,
        [
            "shard",
            "tier",
            "state",
            "reachable",
            "schema",
            "tenantry",
            "tenants",
            "size",
            "conns",
            "slots (lag)",
        ],
        (
            [
                s.name,
                s.tier,
                s.state,
                "[green]yes[/]" if s.reachable else f"[red]no[/]: {escape(s.error or '')}",
                schema(s.app_revision, s.app_verdict) if s.reachable else "-",
                s.tenantry_revision or "-",
                f"{s.tenants:,}",
                _size(s.bytes),
                "-" if s.connections is None else s.connections,
                slots(s),
            ]
            for s in fleet.shards
        ),
        title="shards",
    )
    if fleet.servers:
        render_table(
            console,
            ["server", "version", "connections", "shards", "physical slots"],
            (
                [
                    v.server,
                    v.version or "-",
                    f"{v.connections} of {v.usable} (max {v.max_connections})",
                    len(v.shards),
                    ", ".join(f"{x.name}: {_size(x.lag_bytes)} behind" for x in v.physical_slots),
                ]
                for v in fleet.servers
            ),
            title="servers",
        )
    if fleet.moves:
        render_table(
            console,
            ["move", "tenant", "from", "to", "mode", "step", "running", "rows", "lag", "error"],
            (
                [
                    m.id,
                    m.tenant,
                    m.source,
                    m.target,
                    m.mode,
                    f"{m.state} ({m.step}/{m.steps})",
                    _seconds(m.age_seconds),
                    "-" if m.rows is None else f"{m.rows:,}",
                    _size(m.lag_bytes),
                    escape(m.error or ""),
                ]
                for m in fleet.moves
            ),
            title="moves in flight",
        )
    else:
        console.print("moves in flight: none")
    if fleet.attention:
        console.print("[bold yellow]needs attention:[/]")
        for line in fleet.attention:
            console.print(f"[yellow]- {escape(line)}[/]")
    else:
        console.print("[green]nothing needs attention[/]")


@click.command("status")
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 60),
    default=3.0,
    show_default=True,
    help="Seconds to reach each shard before it counts as unreachable.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 256),
    default=32,
    show_default=True,
    help="Shards checked at once (one connection each).",
)
@click.option(
    "--alembic-config",
    type=click.Path(path_type=Path),
    help="The application's alembic.ini or migrations folder, to judge revisions "
    "[default: TENANTRY_ALEMBIC_CONFIG].",
)
@json_option
@pass_state
def status_command(
    state: CliState, timeout: float, jobs: int, alembic_config: Path | None, as_json: bool
) -> None:
    """The whole fleet: shards, schema, tenants, bytes, connections, slots, moves.

    Exit status 0 when nothing needs attention, 3 when something does (listed).
    """
    fleet = fleet_status(state.catalog(), timeout=timeout, jobs=jobs, alembic_config=alembic_config)
    if as_json:
        emit_json(fleet.to_record())
    else:
        render_status(state.console, fleet)
    if not fleet.ok:
        raise SystemExit(ATTENTION)


COMMANDS = [status_command]
