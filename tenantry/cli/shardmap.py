"""``tenantry init``, ``shard ...``, ``tenant ...`` and ``route``."""

from __future__ import annotations

from collections import Counter

import click

from tenantry.cli.app import (
    CliState,
    emit_json,
    json_option,
    pass_state,
    render_table,
    shard_record,
    tenant_record,
)
from tenantry.migrations.rls import DEFAULT_ROUTING_ROLE
from tenantry.moves.removal import RowsPolicy, remove_tenant
from tenantry.shardmap import ShardState, Tier, mask_url, validate_tenant_id

__all__ = ["COMMANDS"]

TIERS = click.Choice([t.value for t in Tier])
STATES = click.Choice([s.value for s in ShardState])


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


@click.group("shard")
def shard_group() -> None:
    """Register and inspect shards (the fleet's databases)."""


@shard_group.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--admin-url", metavar="URL", help="Operations role URL [default: URL].")
@click.option("--tier", type=TIERS, default="shared", show_default=True)
@click.option("--weight", type=click.IntRange(0, 10_000), default=1, show_default=True)
@click.option(
    "--no-prepare",
    is_flag=True,
    help="Register without connecting (tenantry's tables are created on first migrate).",
)
@click.option(
    "--secure",
    is_flag=True,
    help="Route as a role made for it through URL (or --admin-url), with only the grants "
    "routing needs (see `shard secure`); URL stays the operations role.",
)
@click.option(
    "--role",
    default=DEFAULT_ROUTING_ROLE,
    show_default=True,
    help="The routing role --secure makes or reuses.",
)
@click.option(
    "--allow-unsafe-routing-role",
    is_flag=True,
    help="Local development only: accept a routing role row-level security does not bind.",
)
@json_option
@pass_state
def shard_add(
    state: CliState,
    name: str,
    url: str,
    admin_url: str | None,
    tier: str,
    weight: int,
    no_prepare: bool,
    secure: bool,
    role: str,
    allow_unsafe_routing_role: bool,
    as_json: bool,
) -> None:
    """Register database URL as shard NAME."""
    if secure and no_prepare:
        raise click.UsageError("--secure connects to the database: drop --no-prepare")
    if secure:
        from tenantry.migrations.provision import add_secured_shard

        secured = add_secured_shard(
            state.catalog(), name, url, admin_url=admin_url, tier=tier, weight=weight, role=role
        )
        shard = secured.shard
    else:
        shard = state.catalog().add_shard(
            name,
            url,
            admin_url=admin_url,
            tier=tier,
            weight=weight,
            prepare=not no_prepare,
            allow_unsafe_routing_role=allow_unsafe_routing_role or None,
        )
    if as_json:
        emit_json(shard_record(shard, 0))
    else:
        state.console.print(f"added {shard.tier.value} shard {shard.name} ({mask_url(shard.url)})")


@shard_group.command("list")
@click.option("--tier", type=TIERS, help="Only shards of this tier.")
@click.option("--state", "shard_state", type=STATES, help="Only shards in this state.")
@json_option
@pass_state
def shard_list(state: CliState, tier: str | None, shard_state: str | None, as_json: bool) -> None:
    """List the shards with their tenant counts."""
    snapshot = state.catalog().snapshot()
    counts = Counter(t.shard for t in snapshot.tenants.values())
    shards = [
        s
        for s in sorted(snapshot.shards.values(), key=lambda s: s.name)
        if (tier is None or s.tier.value == tier)
        and (shard_state is None or s.state.value == shard_state)
    ]
    if as_json:
        emit_json([shard_record(s, counts[s.name]) for s in shards])
        return
    render_table(
        state.console,
        ["shard", "tier", "state", "weight", "tenants", "url"],
        (
            [s.name, s.tier.value, s.state.value, s.weight, counts[s.name], mask_url(s.url)]
            for s in shards
        ),
        title=f"shards (map version {snapshot.version})",
    )


@shard_group.command("show")
@click.argument("name")
@json_option
@pass_state
def shard_show(state: CliState, name: str, as_json: bool) -> None:
    """Show one shard and the tenants it holds."""
    snapshot = state.catalog().snapshot()
    shard = snapshot.shard(name)
    tenants = snapshot.tenants_on(name)
    record = shard_record(shard, len(tenants))
    if as_json:
        emit_json({**record, "tenant_ids": [t.id for t in tenants]})
        return
    render_table(state.console, ["field", "value"], record.items(), title=f"shard {name}")
    state.console.print("tenants: " + (", ".join(t.id for t in tenants) or "none"))


@shard_group.command("set")
@click.argument("name")
@click.option("--state", "new_state", type=STATES, help="active, draining or retired.")
@click.option("--weight", type=click.IntRange(0, 10_000), help="New weight.")
@json_option
@pass_state
def shard_set(
    state: CliState, name: str, new_state: str | None, weight: int | None, as_json: bool
) -> None:
    """Change a shard's state or weight."""
    if new_state is None and weight is None:
        raise click.UsageError("nothing to change: give --state and/or --weight")
    catalog = state.catalog()
    shard = catalog.get_shard(name)
    # The state first: it is the change that can be refused (retiring a shard that
    # still holds tenants), and a refused command must change nothing.
    if new_state is not None:
        shard = catalog.set_shard_state(name, new_state)
    if weight is not None:
        shard = catalog.set_shard_weight(name, weight)
    if as_json:
        emit_json(shard_record(shard))
    else:
        state.console.print(f"shard {shard.name}: state {shard.state.value}, weight {shard.weight}")


@shard_group.command("remove")
@click.argument("name")
@json_option
@pass_state
def shard_remove(state: CliState, name: str, as_json: bool) -> None:
    """Unregister shard NAME, which must hold no tenant (its database is left as it is)."""
    shard = state.catalog().remove_shard(name)
    if as_json:
        emit_json({**shard_record(shard), "removed": True})
    else:
        state.console.print(
            f"removed shard {shard.name} from the map; its database was left as it is"
        )


@shard_group.command("rotate-key")
@click.argument("names", metavar="[NAME]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every PostgreSQL shard.")
@click.option(
    "--retire-previous",
    is_flag=True,
    help="Stop accepting the previous key at once (routers retry one fence).",
)
@json_option
@pass_state
def shard_rotate_key(
    state: CliState, names: tuple[str, ...], every: bool, retire_previous: bool, as_json: bool
) -> None:
    """Give shards a new fence key; the key itself is never shown.

    The shard keeps accepting the previous key until the next rotation (or at once
    with --retire-previous), so routers keep working while they pick up the new one.
    """
    if bool(names) == every:
        raise click.UsageError("name the shards to rotate, or give --all (not both)")
    catalog = state.catalog()
    if every:
        names = tuple(s.name for s in catalog.list_shards() if s.backend == "postgresql")
    else:
        for name in names:  # every name checked before any key changes
            catalog.get_shard(name)
    rotated = []
    for name in names:
        key = catalog.rotate_fence_key(name, retire_previous=retire_previous)
        rotated.append({"shard": name, "key_id": key.key_id, "retired_previous": retire_previous})
        if not as_json:
            accepted = "only the new key" if retire_previous else "the new and the previous key"
            state.console.print(
                f"shard {name}: fence key {key.key_id} in use; the shard accepts {accepted}"
            )
    if as_json:
        emit_json({"rotated": rotated})
    elif not rotated:
        state.console.print("no PostgreSQL shard: nothing to rotate")


# -- tenants ----------------------------------------------------------------------------


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
        emit_json(tenant_record(tenant))
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
        emit_json([tenant_record(t) for t in tenants])
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
    record = tenant_record(state.catalog().get_tenant(tenant_id))
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
                **tenant_record(tenant),
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


@click.command("route")
@click.argument("tenant_id", metavar="ID")
@json_option
@pass_state
def route_command(state: CliState, tenant_id: str, as_json: bool) -> None:
    """Print where tenant ID lives: shard, tier and URL (password masked)."""
    validate_tenant_id(tenant_id)
    snapshot = state.catalog().snapshot()
    tenant = snapshot.tenant(tenant_id)
    shard = snapshot.shard(tenant.shard)
    record = {
        "tenant": tenant.id,
        "shard": shard.name,
        "tier": shard.tier.value,
        "url": mask_url(shard.url),
        "map_version": snapshot.version,
    }
    if as_json:
        emit_json(record)
    else:
        render_table(state.console, ["field", "value"], record.items(), title=f"route {tenant_id}")


COMMANDS = [init_command, shard_group, tenant_group, route_command]
