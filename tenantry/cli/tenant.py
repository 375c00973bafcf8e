"""``tenantry tenant ...``: add, list, show, pin, size and remove tenants."""

from __future__ import annotations

import re
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tenantry.cli.app import (
    TENANT_STATES,
    TERMINAL_LIMIT,
    TIERS,
    CliState,
    emit_json,
    emit_json_list,
    emit_lines,
    human_size,
    json_option,
    listing_limit,
    pass_state,
    render_table,
)
from tenantry.cli.tenant_import import import_command
from tenantry.shardmap import Tier

if TYPE_CHECKING:
    from tenantry.moves.removal import RowsPolicy

__all__ = ["COMMANDS", "listing_options"]

F = TypeVar("F", bound=Callable[..., Any])

#: What --prefix accepts: the first characters of a tenant id.
_PREFIX = re.compile(r"[a-z0-9_-]{1,63}")


@click.group("tenant")
def tenant_group() -> None:
    """Register, place and inspect tenants."""


@tenant_group.command("add")
@click.argument("tenant_id", metavar="ID")
@click.option("--dedicated", is_flag=True, help="Place on a dedicated shard (needs --shard).")
@click.option("--shard", metavar="NAME", help="Place on this shard [default: the hash ring].")
@click.option("--pin", is_flag=True, help="Never move this tenant when rebalancing.")
@json_option
@pass_state
def tenant_add(
    state: CliState, tenant_id: str, dedicated: bool, shard: str | None, pin: bool, as_json: bool
) -> None:
    """Register tenant ID and place it."""
    tier = Tier.DEDICATED if dedicated else Tier.SHARED
    tenant = state.catalog().add_tenant(tenant_id, tier=tier, shard=shard, pinned=pin)
    if as_json:
        emit_json(tenant.to_record())
    else:
        state.console.print(f"added {tenant.tier.value} tenant {tenant.id} on shard {tenant.shard}")


def _tenant_prefix(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _PREFIX.fullmatch(value):
        raise click.BadParameter("a tenant id's first characters: a-z, 0-9, '_' and '-'")
    return value


def _plain_line(row: tuple[Any, ...]) -> str:
    """A tenant row as one tab-separated line (``pinned`` says yes or no: no field is
    empty)."""
    return f"{row[0]}\t{row[1]}\t{row[2]}\t{'yes' if row[3] else 'no'}\t{row[4]}"


def _tenant_json(row: tuple[Any, ...], indented: bool) -> str:
    """A tenant row as the JSON text of its record (:meth:`Tenant.to_record`), compact
    as ``json.dumps`` writes it or laid out one level deep in an indented list.
    Written field by field: 100,000 of them through the indenting encoder take seconds."""
    q = encode_basestring_ascii
    when = "null" if row[5] is None else q(row[5].isoformat())
    fields = (
        f'"id": {q(row[0])}',
        f'"shard": {q(row[1])}',
        f'"tier": {q(row[2])}',
        f'"pinned": {"true" if row[3] else "false"}',
        f'"state": {q(row[4])}',
        f'"created_at": {when}',
    )
    if indented:
        return "{\n    " + ",\n    ".join(fields) + "\n  }"
    return "{" + ", ".join(fields) + "}"


def listing_options(func: F) -> F:
    """``--after``, ``--offset``, ``--limit``, ``--jsonl`` and ``--json``: how a
    listing of tenants is paged and printed."""
    func = click.option(
        "--jsonl",
        "as_jsonl",
        is_flag=True,
        help="Print one JSON object per line instead of a table.",
    )(func)
    func = json_option(func)
    func = click.option(
        "--limit",
        type=click.IntRange(min=0),
        metavar="N",
        help=f"Show at most N [default: {TERMINAL_LIMIT} on a terminal, all otherwise].",
    )(func)
    func = click.option(
        "--offset", type=click.IntRange(min=0), default=0, metavar="N", help="Skip the first N."
    )(func)
    return click.option(
        "--after", metavar="ID", help="Start after tenant ID (the last of the previous page)."
    )(func)


@tenant_group.command("list")
@click.option("--shard", metavar="NAME", help="Only tenants on this shard.")
@click.option("--tier", type=TIERS, help="Only tenants of this tier.")
@click.option("--state", "tenant_state", type=TENANT_STATES, help="Only tenants in this state.")
@click.option("--pinned/--unpinned", default=None, help="Only pinned (or unpinned) tenants.")
@click.option(
    "--prefix", metavar="P", callback=_tenant_prefix, help="Only tenants whose id starts with P."
)
@listing_options
@pass_state
def tenant_list(
    state: CliState,
    shard: str | None,
    tier: str | None,
    tenant_state: str | None,
    pinned: bool | None,
    prefix: str | None,
    after: str | None,
    offset: int,
    limit: int | None,
    as_json: bool,
    as_jsonl: bool,
) -> None:
    """List tenants and where they live, by id.

    On a terminal, a table of the first 100 (--limit N for more, --after ID for the
    next page); to a pipe or a file, every tenant, one tab-separated line each (id,
    shard, tier, pinned, state), streamed. --json prints a JSON list, --jsonl one
    object per line, every tenant unless --limit.
    """
    if as_json and as_jsonl:
        raise click.UsageError("give --json or --jsonl, not both")
    catalog = state.catalog()
    filters: dict[str, Any] = {
        "shard": shard,
        "tier": tier,
        "state": tenant_state,
        "pinned": pinned,
        "prefix": prefix,
    }
    table = not (as_json or as_jsonl) and state.console.is_terminal
    shown = listing_limit(state, limit) if table else limit
    # a table reads one more than it shows, to know whether to say that more follow
    asked = shown + 1 if table and shown is not None else shown
    if not table:
        rows = catalog.iter_tenant_rows(
            **filters, after=after, offset=offset, limit=shown, created=as_json or as_jsonl
        )
        if as_json:
            emit_json_list((_tenant_json(row, True) for row in rows), encoded=True)
        elif as_jsonl:
            emit_lines(_tenant_json(row, False) for row in rows)
        else:
            emit_lines(_plain_line(row) for row in rows)
    else:
        tenants = catalog.iter_tenants(**filters, after=after, offset=offset, limit=asked)
        found = list(tenants)
        more = shown is not None and len(found) > shown
        found = found[:shown]
        render_table(
            state.console,
            ["tenant", "shard", "tier", "pinned", "state"],
            (
                [t.id, t.shard, t.tier.value, "yes" if t.pinned else "", t.state.value]
                for t in found
            ),
            title="tenants",
        )
        if more:
            total = catalog.count_tenants(**filters)
            page = f"; next page: --after {found[-1].id}" if found else ""
            state.console.print(
                f"{len(found)} of {total:,} shown{page}"
                f"{'' if limit is not None else ' (--limit N for more at once)'}"
            )


@tenant_group.command("show")
@click.argument("tenant_id", metavar="ID")
@json_option
@pass_state
def tenant_show(state: CliState, tenant_id: str, as_json: bool) -> None:
    """Show one tenant."""
    record = state.catalog().get_tenant(tenant_id).to_record()
    if as_json:
        emit_json(record)
    else:
        render_table(state.console, ["field", "value"], record.items(), title=f"tenant {tenant_id}")


@tenant_group.command("remove")
@click.argument("tenant_id", metavar="ID")
@click.option("--purge", is_flag=True, help="Delete the tenant's rows at its home first.")
@click.option(
    "--keep-rows",
    is_flag=True,
    help="Leave its rows at its home (a tenant added again with this id sees them).",
)
@json_option
@pass_state
def tenant_remove(
    state: CliState, tenant_id: str, purge: bool, keep_rows: bool, as_json: bool
) -> None:
    """Unregister tenant ID; refused while it has rows at its home, unless --purge or
    --keep-rows."""
    if purge and keep_rows:
        raise click.UsageError("give --purge or --keep-rows, not both")
    from tenantry.moves.removal import remove_tenant

    policy: RowsPolicy = "purge" if purge else "keep" if keep_rows else "refuse"
    done = remove_tenant(state.catalog(), tenant_id, rows=policy)
    tenant, total = done.tenant, sum(done.rows.values())
    if as_json:
        emit_json(
            {
                **tenant.to_record(),
                "rows": policy,
                "row_counts": done.rows,
                "deleted": done.deleted,
            }
        )
    elif policy == "purge":
        counts = ", ".join(f"{t} {n}" for t, n in sorted(done.deleted.items()))
        state.console.print(
            f"removed tenant {tenant.id}: deleted {sum(done.deleted.values())} row(s) on "
            f"shard {tenant.shard}" + (f" ({counts})" if counts else "")
        )
    elif done.kept:
        state.console.print(
            f"removed tenant {tenant.id}: its {total} row(s) stay on shard {tenant.shard}; "
            f"a tenant added again as {tenant.id} will see them"
        )
    else:
        state.console.print(f"removed tenant {tenant.id} (it had no rows on shard {tenant.shard})")


@tenant_group.command("pin")
@click.argument("tenant_id", metavar="ID")
@click.option("--off", is_flag=True, help="Unpin instead.")
@pass_state
def tenant_pin(state: CliState, tenant_id: str, off: bool) -> None:
    """Pin tenant ID so that rebalancing never moves it (--off to unpin)."""
    tenant = state.catalog().set_pinned(tenant_id, not off)
    state.console.print(f"tenant {tenant.id} is {'pinned' if tenant.pinned else 'not pinned'}")


@tenant_group.command("sizes")
@click.option("--refresh", is_flag=True, help="Measure now (default: what is stored).")
@json_option
@pass_state
def sizes_command(state: CliState, refresh: bool, as_json: bool) -> None:
    """Per-tenant rows and bytes on the shared shards, as stored or measured now."""
    from tenantry.cli.progress import Counted, Display, shows_progress
    from tenantry.rebalance.sizes import measure_sizes, stored_sizes

    catalog = state.catalog()
    if refresh:
        with Display(state.console, shows_progress(state.console, as_json)) as display:
            counted: Counted | None = None

            def measured(shard: str, done: int, total: int) -> None:
                nonlocal counted
                if counted is None:
                    counted = display.counter("measuring", total, "shards")
                counted.advance(detail=shard)

            measure_sizes(catalog, on_shard=measured)
    stored = stored_sizes(catalog)
    rows = sorted(stored.items(), key=lambda item: (-item[1][0].bytes, item[0]))
    if as_json:
        emit_json(
            [
                {
                    "tenant": t,
                    "shard": shard,
                    "rows": size.rows,
                    "bytes": size.bytes,
                    "measured_at": when.isoformat() if when else None,
                }
                for t, (size, shard, when) in rows
            ]
        )
        return
    render_table(
        state.console,
        ["tenant", "shard", "rows", "size", "measured"],
        (
            [
                t,
                shard,
                f"{size.rows:,}",
                human_size(size.bytes),
                when.strftime("%Y-%m-%d %H:%M") if when else "",
            ]
            for t, (size, shard, when) in rows
        ),
        title="tenant sizes" + ("" if stored else " (none stored: add --refresh)"),
    )


tenant_group.add_command(import_command)
COMMANDS = [tenant_group]
