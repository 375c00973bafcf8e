"""``tenantry demo``: a local fleet on SQLite files, built and used step by step (the
story is :func:`tenantry.demo.tell_story`'s; this prints it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
from rich.console import Console

from tenantry.cli.app import CliState, pass_state, render_table
from tenantry.demo import Census, tell_story
from tenantry.shardmap import MapSnapshot

__all__ = ["COMMANDS"]


class _ConsoleReport:
    """The demo's story on the console: rules, lines and tables."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def heading(self, text: str) -> None:
        self.console.rule(f"[bold]{text}")

    def say(self, text: str) -> None:
        self.console.print(text)

    def shard_map(self, snapshot: MapSnapshot, title: str) -> None:
        counts = Counter(t.shard for t in snapshot.tenants.values())
        render_table(
            self.console,
            ["shard", "tier", "tenants"],
            (
                [s.name, s.tier.value, ", ".join(t.id for t in snapshot.tenants_on(s.name)) or "-"]
                for s in snapshot.shards.values()
                if counts[s.name] or s.state.value == "active"
            ),
            title=f"{title} (map version {snapshot.version})",
        )

    def census(self, rows: list[Census]) -> None:
        """The table of what each tenant sees; it fits an 80-column terminal: names
        whole, numbers right-aligned, energy in whole kWh (the story's are whole)."""
        from rich.table import Table

        table = Table(title="what each tenant sees", title_justify="left", header_style="bold")
        table.add_column("tenant", no_wrap=True)
        table.add_column("shard", no_wrap=True)
        for name in ("users", "chargers", "sessions", "kWh", "foreign\nrows"):
            table.add_column(name, justify="right")
        for c in rows:
            table.add_row(
                c.tenant,
                c.shard,
                str(c.users),
                str(c.chargers),
                str(c.sessions),
                f"{c.energy_kwh:,.0f}",
                str(c.foreign_rows),
            )
        self.console.print(table)


@click.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".tenantry-demo"),
    show_default=True,
    help="Where the demo's SQLite databases go (rebuilt on every run).",
)
@pass_state
def demo_command(state: CliState, directory: Path) -> None:
    """Build a demo fleet, write and read each tenant's rows through the router."""
    tell_story(directory, _ConsoleReport(state.console))


COMMANDS = [demo_command]
