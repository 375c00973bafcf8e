"""``tenantry top``: the busiest tenants per shard, live (:mod:`tenantry.survey.top`)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from urllib.parse import urlsplit

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tenantry.cli.app import CliState, emit_json, json_option, pass_state
from tenantry.survey.scrape import masked
from tenantry.survey.top import Top, TopReport

__all__ = ["COMMANDS", "live_view", "render_report"]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_report(report: TopReport) -> RenderableType:
    """One window as a table: per shard with load, its busiest tenants."""
    table = Table(
        "shard",
        "tier",
        "tenant",
        "active",
        "tx/s",
        "busy",
        "latency ms",
        "from",
        title=(
            f"busiest tenants per shard  {datetime.now():%H:%M:%S}  "
            f"({report.seconds:.1f}s, {report.samples} samples)"
        ),
        title_justify="left",
        header_style="bold",
    )
    shown = 0
    for shard in report.shards:
        if not shard.reachable:
            table.add_row(
                shard.shard, shard.tier, f"[red]unreachable[/]: {escape(shard.error or '')}"
            )
            continue
        if not shard.tenants and not shard.active:
            continue
        shown += 1
        first = True
        for t in shard.tenants:
            table.add_row(
                shard.shard if first else "",
                shard.tier if first else "",
                t.tenant,
                _number(t.active, 2),
                _number(t.transactions_per_second),
                _number(t.busy, 2),
                _number(t.latency_ms, 2),
                ", ".join(t.sources),
            )
            first = False
        if shard.unattributed:
            table.add_row(
                shard.shard if first else "",
                shard.tier if first else "",
                "[dim](no tenant comment)[/]",
                _number(shard.unattributed, 2),
                "",
                "",
                "",
                "activity",
            )
        table.add_section()
    parts: list[RenderableType] = [table]
    if not shown:
        parts.append(Text("no active statements and no routed transactions seen"))
    parts.extend(Text(f"warning: {e}", style="yellow") for e in report.errors)
    return Group(*parts)


def live_view(console: Console, top: Top, interval: float, windows: int | None = None) -> None:
    """Redraw the busiest tenants every *interval* seconds, *windows* times (None: until
    interrupted)."""
    with Live(Text("sampling..."), console=console, auto_refresh=False) as live:
        count = 0
        while windows is None or count < windows:
            live.update(render_report(top.window(interval)), refresh=True)
            count += 1


def _endpoints(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for url in value:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(
                f"{masked(url)!r} is not an http(s) URL of a router's Prometheus endpoint "
                "(for example http://router-1:9100/metrics)"
            )
    return value


@click.command("top")
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=2.0,
    show_default=True,
    help="Seconds per refresh (each window is sampled throughout).",
)
@click.option(
    "--step",
    type=click.FloatRange(0.01, 60),
    default=0.1,
    show_default=True,
    help="Seconds between samples of pg_stat_activity within a window.",
)
@click.option(
    "--once", is_flag=True, help="Show one window and exit (scripts; implied off a terminal)."
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=5, show_default=True, help="Tenants per shard."
)
@click.option(
    "--metrics",
    "metrics",
    multiple=True,
    metavar="URL",
    callback=_endpoints,
    help="A router's Prometheus endpoint to read per-tenant counters from (repeatable; "
    "needs tenantry[observability]).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 60),
    default=3.0,
    show_default=True,
    help="Seconds to reach a server or an endpoint.",
)
@json_option
@pass_state
def top_command(
    state: CliState,
    interval: float,
    step: float,
    once: bool,
    limit: int,
    metrics: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """The busiest tenants per shard, live: sampled from the servers (and routers).

    Dedicated shards: the database's sessions and transactions are its tenant's.
    Shared shards: active statements are attributed by their sqlcommenter comment
    (tenant='...'), which routers add when statement comments are on
    (TENANTRY_STATEMENT_COMMENTS=1). --json prints one window (implies --once).
    """
    console = state.console
    with Top(state.catalog(), metrics=metrics, limit=limit, timeout=timeout, step=step) as top:
        top.start()
        if as_json or once or not console.is_terminal:
            report = top.window(interval)
            if as_json:
                emit_json(report.to_record())
            else:
                console.print(render_report(report))
            return
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the view
            live_view(console, top, interval)


COMMANDS = [top_command]
