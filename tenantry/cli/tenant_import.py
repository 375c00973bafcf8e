"""``tenantry tenant import FILE|-``: register many tenants from CSV or JSON Lines."""

from __future__ import annotations

from typing import IO

import click

from tenantry.cli.app import CliState, emit_json, json_option, pass_state
from tenantry.shardmap.catalog.bulk import (
    DEFAULT_BATCH_SIZE,
    BulkProgress,
    BulkSummary,
    read_records,
)

__all__ = ["import_command"]

_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@click.command("import")
@click.argument("source", metavar="FILE|-", type=click.File("r", encoding="utf-8", lazy=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="Input format [default: from the file's suffix, else JSON Lines when the first "
    "line is an object, else CSV].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Tenants per batch: one catalog transaction and one map version each.",
)
@json_option
@pass_state
def import_command(
    state: CliState, source: IO[str], fmt: str | None, batch_size: int, as_json: bool
) -> None:
    """Register the tenants listed in FILE (- for stdin), in batches.

    CSV with a header row naming its columns, or JSON Lines with these keys: id, and
    optionally shard (else the hash ring places the tenant), tier (shared or dedicated;
    a dedicated tenant needs its shard) and pinned (true or false). Each batch is added
    whole or not at all; a refused line stops the import with its line number, and the
    batches before it stay.
    """
    if fmt is None:
        name = getattr(source, "name", "") or ""
        fmt = next((f for suffix, f in _SUFFIXES.items() if name.lower().endswith(suffix)), None)
    records = read_records(source, fmt)
    catalog = state.catalog()
    console = state.console
    if as_json or not console.is_terminal:
        summary = catalog.add_tenants(records, batch_size=batch_size)
    else:
        from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("importing"),
            BarColumn(bar_width=None),
            TextColumn("{task.completed:,} tenants"),
            TextColumn("{task.fields[rate]:,.0f}/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task: TaskID = progress.add_task("import", total=None, rate=0.0)

            def report(done: BulkProgress) -> None:
                progress.update(task, completed=done.added, rate=done.rate)

            summary = catalog.add_tenants(records, batch_size=batch_size, on_batch=report)
    if as_json:
        emit_json(summary.to_record())
    else:
        console.print(_one_line(summary))


def _one_line(summary: BulkSummary) -> str:
    if not summary.added:
        return "added no tenants: the input lists none"
    versions = (
        f"map version {summary.first_version}"
        if summary.first_version == summary.last_version
        else f"map versions {summary.first_version}-{summary.last_version}"
    )
    return (
        f"added {summary.added:,} tenant(s) in {summary.batches:,} batch(es) ({versions}) "
        f"on {len(summary.per_shard):,} shard(s) in {summary.seconds:.1f}s, "
        f"{summary.rate:,.0f}/s"
    )
