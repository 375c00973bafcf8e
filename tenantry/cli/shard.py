"""``tenantry shard ...``: register, inspect, change, create, secure, drain and remove
the shards of the fleet."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tenantry.cli.app import (
    STATES,
    TERMINAL_LIMIT,
    TIERS,
    CliState,
    emit_json,
    emit_json_with_list,
    emit_lines,
    json_option,
    listing_limit,
    pass_state,
    render_table,
)
from tenantry.cli.rebalance import plan_options, run_plan
from tenantry.migrations.rls import DEFAULT_ROUTING_ROLE
from tenantry.shardmap import Catalog, ShardState, mask_url

if TYPE_CHECKING:
    from tenantry.migrations.provision import SecuredShard

__all__ = ["COMMANDS"]

F = TypeVar("F", bound=Callable[..., Any])


def _shard_names(every_help: str) -> Callable[[F], F]:
    """``[NAME]... | --all``: the shards a command acts on (see :func:`_chosen`)."""

    def add(func: F) -> F:
        func = click.option("--all", "every", is_flag=True, help=every_help)(func)
        return click.argument("names", metavar="[NAME]...", nargs=-1)(func)

    return add


def _routing_role_options(func: F) -> F:
    """Add ``--role`` (the routing role --secure makes or reuses) and
    ``--allow-unsafe-routing-role`` (shard add and create)."""
    func = click.option(
        "--allow-unsafe-routing-role",
        is_flag=True,
        help="Local development only: accept a routing role row-level security does not bind.",
    )(func)
    return click.option(
        "--role",
        default=DEFAULT_ROUTING_ROLE,
        show_default=True,
        help="The routing role --secure makes or reuses.",
    )(func)


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
    "--pooled/--direct",
    default=None,
    help="URL goes through a connection pooler in transaction mode (PgBouncer), or not "
    "[default: found out by connecting]; a pooled shard needs --admin-url to the server.",
)
@_routing_role_options
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
    pooled: bool | None,
    role: str,
    allow_unsafe_routing_role: bool,
    as_json: bool,
) -> None:
    """Register database URL as shard NAME."""
    if secure and no_prepare:
        raise click.UsageError("--secure connects to the database: drop --no-prepare")
    if secure and pooled:
        raise click.UsageError(
            "--secure routes through the server's URL: add the shard with --secure first, "
            "then route through the pooler by adding it as --pooled with the secured role"
        )
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
            pooled=pooled,
        )
    if as_json:
        emit_json(shard.to_record(0))
    else:
        pooled_note = ", routed through a pooler" if shard.pooled else ""
        state.console.print(
            f"added {shard.tier.value} shard {shard.name} ({mask_url(shard.url)}{pooled_note})"
        )


@shard_group.command("list")
@click.option("--tier", type=TIERS, help="Only shards of this tier.")
@click.option("--state", "shard_state", type=STATES, help="Only shards in this state.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    metavar="N",
    help=f"Show at most N [default: {TERMINAL_LIMIT} on a terminal, all otherwise].",
)
@json_option
@pass_state
def shard_list(
    state: CliState, tier: str | None, shard_state: str | None, limit: int | None, as_json: bool
) -> None:
    """List the shards with their tenant counts, by name.

    On a terminal, a table of the first 100 (--limit N for more); to a pipe or a file,
    every shard, one tab-separated line each (the table's columns).
    """
    listing = state.catalog().shard_listing(tier=tier, state=shard_state)
    if as_json:
        emit_json([s.to_record(count) for s, count in listing.shards[:limit]])
        return
    rows = (
        [
            s.name,
            s.tier.value,
            s.state.value,
            str(s.weight),
            str(count),
            mask_url(s.url) + (" (pooled)" if s.pooled else ""),
        ]
        for s, count in listing.shards[:limit]
    )
    if not state.console.is_terminal:
        emit_lines("\t".join(row) for row in rows)
        return
    shown = listing_limit(state, limit)
    render_table(
        state.console,
        ["shard", "tier", "state", "weight", "tenants", "url"],
        itertools.islice(rows, shown),
        title=f"shards (map version {listing.map_version})",
    )
    total = len(listing.shards)
    if shown is not None and total > shown:
        state.console.print(f"{shown} of {total:,} shown: --limit N for more")


@shard_group.command("show")
@click.argument("name")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    metavar="N",
    help=f"Name at most N of its tenants [default: {TERMINAL_LIMIT} on a terminal, all otherwise].",
)
@json_option
@pass_state
def shard_show(state: CliState, name: str, limit: int | None, as_json: bool) -> None:
    """Show one shard and the tenants it holds (by id; `tenant list --shard NAME` pages
    through them)."""
    catalog = state.catalog()
    shard, count = catalog.shard_with_count(name)
    record = shard.to_record(count)
    shown = limit if as_json else listing_limit(state, limit)
    ids = catalog.iter_tenant_ids(shard=name, limit=shown)
    if as_json:
        emit_json_with_list(record, "tenant_ids", ids)
        return
    render_table(state.console, ["field", "value"], record.items(), title=f"shard {name}")
    if count == 0 or shown == 0:
        state.console.print("tenants: none" if count == 0 else f"tenants: {count:,}")
        return
    # streamed: thousands of ids go out a chunk at a time, on one line
    click.echo("tenants: ", nl=False)
    written = 0
    chunk: list[str] = []
    for tenant_id in ids:
        chunk.append(tenant_id)
        if len(chunk) >= 1000:
            click.echo((", " if written else "") + ", ".join(chunk), nl=False)
            written += len(chunk)
            chunk.clear()
    click.echo((", " if written and chunk else "") + ", ".join(chunk), nl=False)
    written += len(chunk)
    more = count - written
    click.echo(f" (and {more:,} more: `tenantry tenant list --shard {name}`)" if more > 0 else "")


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
    shard = state.catalog().update_shard(name, state=new_state, weight=weight)
    if as_json:
        emit_json(shard.to_record())
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
        emit_json({**shard.to_record(), "removed": True})
    else:
        state.console.print(
            f"removed shard {shard.name} from the map; its database was left as it is"
        )


@shard_group.command("rotate-key")
@_shard_names("Every PostgreSQL shard.")
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
    catalog = state.catalog()
    names = _chosen(catalog, names, every, "rotate", retired=True)

    def rotate(name: str) -> tuple[dict[str, Any], str]:
        key = catalog.rotate_fence_key(name, retire_previous=retire_previous)
        accepted = "only the new key" if retire_previous else "the new and the previous key"
        return (
            {"shard": name, "key_id": key.key_id, "retired_previous": retire_previous},
            f"shard {name}: fence key {key.key_id} in use; the shard accepts {accepted}",
        )

    _each_shard(state, names, as_json, rotate, "rotated", "rotate")


@shard_group.command("create")
@click.argument("name")
@click.option("--server", required=True, metavar="URL", help="Server URL of the operations role.")
@click.option(
    "--tier",
    type=TIERS,
    default="dedicated",
    show_default=True,
    help="dedicated (a database of its own for one tenant) or shared (a pool member).",
)
@click.option("--database", metavar="DBNAME", help="Database name [default: NAME].")
@click.option("--template", metavar="DBNAME", help="Create from this template database.")
@click.option("--routing-url", metavar="URL", help="Server URL of the routing role.")
@click.option(
    "--secure",
    is_flag=True,
    help="Route as a role made for it, with only the grants routing needs (see `shard secure`).",
)
@_routing_role_options
@click.option("--weight", type=click.IntRange(0, 10_000), default=1, show_default=True)
@click.option("--revision", default="head", show_default=True, help="Migrate it to this revision.")
@click.option("--alembic-config", type=click.Path(path_type=Path))
@json_option
@pass_state
def shard_create(
    state: CliState,
    name: str,
    server: str,
    tier: str,
    database: str | None,
    template: str | None,
    routing_url: str | None,
    secure: bool,
    role: str,
    allow_unsafe_routing_role: bool,
    weight: int,
    revision: str,
    alembic_config: Path | None,
    as_json: bool,
) -> None:
    """Create a database on a server, migrate it, and register it as shard NAME
    (dedicated unless --tier shared)."""
    if secure and routing_url:
        raise click.UsageError("give --secure or --routing-url, not both")
    from tenantry import migrations

    shard = migrations.provision(
        state.catalog(),
        name,
        server,
        tier=tier,
        database=database,
        template=template,
        routing_url=routing_url,
        weight=weight,
        alembic_config=alembic_config,
        revision=revision,
        secure_role=role if secure else None,
        allow_unsafe_routing_role=allow_unsafe_routing_role or None,
    )
    if as_json:
        emit_json(shard.to_record(0))
    else:
        state.console.print(
            f"created {shard.tier.value} shard {shard.name} ({mask_url(shard.url)}), "
            f"migrated to {revision}"
        )


def secured_record(secured: SecuredShard) -> dict[str, Any]:
    """What ``shard secure`` did to one shard, JSON-ready (URLs masked, no password)."""
    return {
        **secured.shard.to_record(),
        "role": secured.role,
        "role_created": secured.role_created,
        "password": secured.password,
        "changed": secured.changed,
        "warnings": list(secured.warnings),
    }


@shard_group.command("secure")
@_shard_names("Every PostgreSQL shard (not retired).")
@click.option(
    "--role",
    default=DEFAULT_ROUTING_ROLE,
    show_default=True,
    help="The routing role to make (or reuse).",
)
@json_option
@pass_state
def shard_secure(
    state: CliState, names: tuple[str, ...], every: bool, role: str, as_json: bool
) -> None:
    """Make shards route as a role with exactly the grants routing needs.

    Through each shard's operations URL, makes (or reuses) ROLE: LOGIN NOSUPERUSER
    NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT, with a generated password that is
    stored in the catalog and never shown; grants it CONNECT, USAGE on the schemas and
    SELECT, INSERT, UPDATE, DELETE on the tenant tables (and their sequences); then the
    shard's URL routes as it and the old URL stays as its operations URL (--admin-url).
    Safe to run again.
    """
    catalog = state.catalog()
    names = _chosen(catalog, names, every, "secure", retired=False)

    def secure(name: str) -> tuple[dict[str, Any], str]:
        from tenantry import migrations

        secured = migrations.secure_shard(catalog, name, role=role)
        how = "already" if not secured.changed else "now"
        made = "made" if secured.role_created else "reused"
        return (
            secured_record(secured),
            f"shard {name} routes as {secured.role} {how} (role {made}, password "
            f"{secured.password}, stored in the catalog): {mask_url(secured.shard.url)}",
        )

    _each_shard(state, names, as_json, secure, "secured", "secure")


@shard_group.command("drain")
@click.argument("name")
@plan_options
@json_option
@pass_state
def drain_command(state: CliState, /, name: str, **options: Any) -> None:
    """Mark shard NAME draining and plan moving all its tenants to the rest."""
    catalog = state.catalog()
    was = catalog.get_shard(name).state
    from tenantry.rebalance.apply import start_drain

    shard = start_drain(catalog, name)
    if was is not shard.state and not options["as_json"]:
        state.console.print(f"shard {name} is draining: it takes no new tenants")
    run_plan(state, drain=(name,), **options)


def _each_shard(
    state: CliState,
    names: tuple[str, ...],
    as_json: bool,
    act: Callable[[str], tuple[dict[str, Any], str]],
    key: str,
    verb: str,
) -> None:
    """Run *act* on each shard in turn, printing the line it returns as it goes; with
    --json, print the records it returns under *key* at the end."""
    records = []
    for name in names:
        record, line = act(name)
        records.append(record)
        if not as_json:
            state.console.print(line)
    if as_json:
        emit_json({key: records})
    elif not records:
        state.console.print(f"no PostgreSQL shard: nothing to {verb}")


def _chosen(
    catalog: Catalog, names: tuple[str, ...], every: bool, verb: str, *, retired: bool
) -> tuple[str, ...]:
    """The shards a ``NAME... | --all`` command acts on: the named ones, each checked
    before any changes, or every PostgreSQL shard (retired ones only if *retired*)."""
    if bool(names) == every:
        raise click.UsageError(f"name the shards to {verb}, or give --all (not both)")
    if every:
        return tuple(
            s.name
            for s in catalog.list_shards()
            if s.backend == "postgresql" and (retired or s.state is not ShardState.RETIRED)
        )
    for name in names:
        catalog.get_shard(name)
    return names


COMMANDS = [shard_group]
