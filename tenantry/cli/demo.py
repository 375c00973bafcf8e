"""``tenantry demo``: a local fleet on SQLite files, built step by step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from tenantry.cli.app import CliState, pass_state, render_table
from tenantry.demo import build_fleet

__all__ = ["COMMANDS"]


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".tenantry-demo"),
    show_default=True,
    help="Where the demo's SQLite databases go.",
)
@pass_state
def demo_command(state: CliState, directory: Path) -> None:
    """Build a demo fleet (two shared shards, one dedicated) and print its map."""
    console = state.console
    console.rule("[bold]tenantry demo: EV-charger operator groups")
    fleet = build_fleet(directory)
    console.print(f"catalog: {fleet.catalog_url}")
    snapshot = fleet.snapshot
    counts = Counter(t.shard for t in snapshot.tenants.values())
    render_table(
        console,
        ["shard", "tier", "tenants"],
        ([s.name, s.tier.value, counts[s.name]] for s in snapshot.shards.values()),
        title=f"shard map, version {snapshot.version}",
    )
    render_table(
        console,
        ["tenant", "tier", "shard"],
        (
            [t.id, t.tier.value, t.shard]
            for t in sorted(snapshot.tenants.values(), key=lambda t: t.id)
        ),
        title="placements",
    )


COMMANDS = [demo_command]
