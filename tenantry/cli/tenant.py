"""``tenantry tenant ...``: add, list, show, pin, size and remove tenants."""

from __future__ import annotations

import click

from tenantry.cli.app import (
    CliState,
    emit_json,
    human_size,
    json_option,
    pass_state,
    render_table,
)
from tenantry.cli.tenant_import import import_command
from tenantry.moves.removal import RowsPolicy, remove_tenant
from tenantry.rebalance.sizes import measure_sizes, stored_sizes
from tenantry.shardmap import Tier

__all__ = ["COMMANDS"]


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


@tenant_group.command("list")
@click.option("--shard", metavar="NAME", help="Only tenants on this shard.")
@json_option
@pass_state
def tenant_list(state: CliState, shard: str | None, as_json: bool) -> None:
    """List tenants and where they live."""
    tenants = state.catalog().list_tenants(shard=shard)
    if as_json:
        emit_json([t.to_record() for t in tenants])
        return
    render_table(
        state.console,
        ["tenant", "shard", "tier", "pinned", "state"],
        ([t.id, t.shard, t.tier.value, "yes" if t.pinned else "", t.state.value] for t in tenants),
        title="tenants",
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
    catalog = state.catalog()
    if refresh:
        measure_sizes(catalog)
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
