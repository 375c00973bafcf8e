"""``tenantry init`` and ``tenantry route``: the catalog itself, and where a tenant lives."""

from __future__ import annotations

import click

from tenantry.cli.app import (
    CliState,
    emit_json,
    json_option,
    pass_state,
    render_table,
)
from tenantry.shardmap import mask_url

__all__ = ["COMMANDS"]


@click.command("init")
@json_option
@pass_state
def init_command(state: CliState, as_json: bool) -> None:
    """Create or upgrade the catalog's schema (safe to run again)."""
    catalog = state.catalog()
    revision = catalog.init()
    if as_json:
        emit_json({"catalog": mask_url(catalog.url), "revision": revision})
    else:
        state.console.print(f"catalog {mask_url(catalog.url)} is ready (schema {revision})")


# -- shards ---------------------------------------------------------------------------


@click.command("route")
@click.argument("tenant_id", metavar="ID")
@json_option
@pass_state
def route_command(state: CliState, tenant_id: str, as_json: bool) -> None:
    """Print where tenant ID lives: shard, tier and URL (password masked)."""
    route = state.catalog().route_of(tenant_id)
    record = {
        "tenant": route.tenant.id,
        "shard": route.shard.name,
        "tier": route.shard.tier.value,
        "url": mask_url(route.shard.url),
        "map_version": route.map_version,
    }
    if as_json:
        emit_json(record)
    else:
        render_table(state.console, ["field", "value"], record.items(), title=f"route {tenant_id}")


COMMANDS = [init_command, route_command]
