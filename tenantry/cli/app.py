"""The ``tenantry`` click group: global options, error rendering, shared helpers.

**Commands load lazily.** :data:`COMMANDS` names each top-level command and where it
is defined (``"module:attribute"``); a command's module is imported only when that
command runs (or when ``--help`` lists the commands), so ``tenantry route T`` does not
import the movers, the fleet migrations or the router. To add a command, define it
(a ``click.Command`` or ``click.Group``) in a module of ``tenantry.cli`` and add one
line to :data:`COMMANDS`::

    "status": "tenantry.cli.status:status_command",

Keep the imports a command's module makes at its top to what every one of its
subcommands needs; a subcommand that needs a heavy module (Alembic, the router, the
movers, ``rich.progress``) imports it in its body.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tenantry.errors import TenantryError
from tenantry.shardmap.model import ShardState, TenantState, Tier

if TYPE_CHECKING:
    from rich.console import Console

    from tenantry.settings import TenantrySettings
    from tenantry.shardmap.catalog import Catalog

__all__ = [
    "COMMANDS",
    "MODES",
    "STATES",
    "TENANT_STATES",
    "TERMINAL_LIMIT",
    "TIERS",
    "CliState",
    "Failure",
    "cli",
    "emit_json",
    "emit_json_list",
    "emit_json_with_list",
    "emit_lines",
    "human_size",
    "json_option",
    "listing_limit",
    "mode_options",
    "pass_state",
    "render_table",
]

F = TypeVar("F", bound=Callable[..., Any])


class Failure(click.ClickException):
    """A domain error shown as one red line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        """Print the error as one red ``error:`` line on stderr."""
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


@dataclass
class CliState:
    """What every command shares: the settings and a lazily opened catalog."""

    catalog_url: str | None = None
    traceback: bool = False
    _settings: TenantrySettings | None = None
    _catalog: Catalog | None = None
    _console: Console | None = None

    @property
    def console(self) -> Console:
        """A rich console on stdout (rich is imported on first use)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(soft_wrap=True)
        return self._console

    @property
    def settings(self) -> TenantrySettings:
        """The settings, with ``--catalog`` applied when given."""
        if self._settings is None:
            from tenantry.settings import load_settings

            overrides = {"catalog_url": self.catalog_url} if self.catalog_url else {}
            self._settings = load_settings(**overrides)
        return self._settings

    def catalog(self) -> Catalog:
        """The catalog, opened on first use and closed with the command."""
        if self._catalog is None:
            from tenantry.shardmap.catalog import Catalog

            self._catalog = Catalog(settings=self.settings)
        return self._catalog

    def close(self) -> None:
        """Release the catalog's connections."""
        if self._catalog is not None:
            self._catalog.close()


pass_state = click.make_pass_decorator(CliState)

#: The library's warnings every command shows on stderr (the unsafe-routing-role
#: override, routing-role cautions): ``warning: ...``, one line each.
SHOWN_LOGGERS = ("tenantry.security",)


class WarningPrinter(logging.Handler):
    """Prints the library's warnings on stderr while a command runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        """Print a logged warning as a yellow ``warning:`` line on stderr."""
        click.secho(f"warning: {record.getMessage()}", fg="yellow", err=True)


#: Every top-level command: its name and where it is defined (``"module:attribute"``),
#: imported only when it runs. One line per command (see the module's docstring).
COMMANDS: dict[str, str] = {
    "init": "tenantry.cli.shardmap:init_command",
    "route": "tenantry.cli.shardmap:route_command",
    "shard": "tenantry.cli.shard:shard_group",
    "tenant": "tenantry.cli.tenant:tenant_group",
    "migrate": "tenantry.cli.migrate:migrate_group",
    "move": "tenantry.cli.moves:move_command",
    "promote": "tenantry.cli.moves:promote_command",
    "demote": "tenantry.cli.moves:demote_command",
    "moves": "tenantry.cli.moves:moves_group",
    "rebalance": "tenantry.cli.rebalance:rebalance_command",
    "status": "tenantry.cli.status:status_command",
    "top": "tenantry.cli.top:top_command",
    "bench": "tenantry.cli.bench:bench_command",
    "demo": "tenantry.cli.demo:demo_command",
}


def load_command(name: str) -> click.Command:
    """The command :data:`COMMANDS` registers as *name*, its module imported now."""
    module, _, attribute = COMMANDS[name].partition(":")
    command = getattr(importlib.import_module(module), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{COMMANDS[name]} is not a click command")
    return command


class TenantryGroup(click.Group):
    """Turns TenantryError into one clear line (the traceback only with --traceback);
    loads the commands of :data:`COMMANDS` when they are asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands added to the group and those registered lazily, sorted."""
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A command added to the group, else a registered one (imported now)."""
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in COMMANDS:
            command = load_command(cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a TenantryError becomes one ``error:`` line."""
        try:
            return super().invoke(ctx)
        except TenantryError as exc:
            state = ctx.find_object(CliState)
            if state is not None and state.traceback:
                raise
            raise Failure(str(exc)) from None


@click.group(cls=TenantryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--catalog",
    "catalog_url",
    metavar="URL",
    help="Catalog database URL [default: TENANTRY_CATALOG_URL or sqlite:///.tenantry/catalog.db].",
)
@click.option("--traceback", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="tenantry")
@click.pass_context
def cli(ctx: click.Context, catalog_url: str | None, traceback: bool) -> None:
    """tenantry: route, migrate and move the tenants of a shared and dedicated fleet."""
    state = CliState(catalog_url=catalog_url, traceback=traceback)
    ctx.obj = state
    ctx.call_on_close(state.close)
    printer = WarningPrinter()
    for name in SHOWN_LOGGERS:
        logging.getLogger(name).addHandler(printer)
        ctx.call_on_close(lambda name=name: logging.getLogger(name).removeHandler(printer))


def json_option(func: F) -> F:
    """Add ``--json``: machine-readable output, same fields, no colour."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


#: How a move may run.
MODES = click.Choice(["offline", "online", "auto"])
#: A shard's tier, and its states.
TIERS = click.Choice([t.value for t in Tier])
STATES = click.Choice([s.value for s in ShardState])
#: A tenant's states.
TENANT_STATES = click.Choice([s.value for s in TenantState])


def mode_options(func: F) -> F:
    """Add ``--mode`` and ``--max-freeze``: how a move runs (move, promote, demote)."""
    func = click.option(
        "--max-freeze",
        type=click.FloatRange(0.05, 60),
        default=1.0,
        show_default=True,
        help="Seconds an online move may hold the tenant's writes per attempt.",
    )(func)
    return click.option(
        "--mode",
        type=MODES,
        default="auto",
        show_default=True,
        help="online: logical replication and a short freeze; offline: writes frozen for the "
        "copy; auto: online where both ends allow it.",
    )(func)


def human_size(n: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KB, 3.2 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def emit_json(data: Any) -> None:
    """Print *data* as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, default=_plain, sort_keys=False))


#: Lines (or JSON items) written to stdout at a time when streaming a listing.
_CHUNK = 1000

#: How many rows a listing shows on a terminal when no --limit is given.
TERMINAL_LIMIT = 100


def listing_limit(state: CliState, limit: int | None) -> int | None:
    """The rows a listing shows: *limit* when given, else :data:`TERMINAL_LIMIT` on a
    terminal and every row otherwise (pipes and files get the whole listing)."""
    if limit is not None:
        return limit
    return TERMINAL_LIMIT if state.console.is_terminal else None


def emit_lines(lines: Iterable[str]) -> int:
    """Write *lines* to stdout as they come, a chunk at a time; return how many."""
    count = 0
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= _CHUNK:
            click.echo("\n".join(chunk))
            count += len(chunk)
            chunk.clear()
    if chunk:
        click.echo("\n".join(chunk))
        count += len(chunk)
    return count


def _indented(data: Any, depth: int) -> str:
    """*data* as indented JSON nested *depth* levels deep (JSON text has no raw
    newlines inside strings, so indenting its lines is safe)."""
    text = json.dumps(data, indent=2, default=_plain)
    return text.replace("\n", "\n" + "  " * depth)


def _json_items(items: Iterable[Any], depth: int, encoded: bool = False) -> Iterable[str]:
    """The lines of a JSON list's items, as ``json.dumps(..., indent=2)`` lays them
    out *depth* levels deep, with the commas; nothing for an empty list. *encoded*:
    the items are JSON text laid out so already."""
    pad = "  " * (depth + 1)
    previous: str | None = None
    for item in items:
        if previous is not None:
            yield previous + ","
        previous = pad + (item if encoded else _indented(item, depth + 1))
    if previous is not None:
        yield previous


def emit_json_list(items: Iterable[Any], *, encoded: bool = False) -> None:
    """Print *items* as an indented JSON list, streamed: the same text as
    :func:`emit_json` of the list, without holding it whole. With *encoded*, each item
    is its JSON text already, laid out one level deep."""
    lines = iter(_json_items(items, 0, encoded))
    first = next(lines, None)
    if first is None:
        click.echo("[]")
        return
    emit_lines(itertools.chain(["[", first], lines, ["]"]))


def emit_json_with_list(record: dict[str, Any], key: str, items: Iterable[Any]) -> None:
    """Print *record* with *key* set to the list of *items*, as :func:`emit_json`
    would, the list streamed (*key* comes last)."""
    head = _indented({k: v for k, v in record.items() if k != key}, 0)
    lines = iter(_json_items(items, 1))
    first = next(lines, None)
    opening = head[:-2] + ("," if len(head) > 2 else "")
    if first is None:
        click.echo(f"{opening}\n  {json.dumps(key)}: []\n}}")
        return
    emit_lines(itertools.chain([f"{opening}\n  {json.dumps(key)}: [", first], lines, ["  ]\n}"]))


def render_table(
    console: Console,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
) -> None:
    """Print an aligned table; empty tables say so.

    On a terminal too narrow for the whole table the first column (the name: a shard,
    a tenant, a server, a move) does not wrap and keeps its width while the terminal
    can hold it, and the other cells wrap rather than end in an ellipsis: an operator
    must see which shard a row is about, and all of what it says.
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for index, name in enumerate(columns):
        table.add_column(name, no_wrap=index == 0, overflow="ellipsis" if index == 0 else "fold")
    count = 0
    for row in rows:
        table.add_row(*("" if v is None else str(_plain(v)) for v in row))
        count += 1
    if count == 0:
        console.print(f"{title or 'nothing'}: none")
    else:
        console.print(table)
