"""``tenantry migrate upgrade|downgrade|status`` and ``tenantry shard create``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tenantry import migrations
from tenantry.cli.app import (
    CliState,
    emit_json,
    json_option,
    pass_state,
    render_table,
    shard_record,
)
from tenantry.migrations.fleet import FleetRun, ShardMigration, select_shards
from tenantry.migrations.provision import SecuredShard
from tenantry.migrations.rls import DEFAULT_ROUTING_ROLE
from tenantry.shardmap import ShardState, Tier, mask_url

__all__ = ["COMMANDS"]

TIERS = click.Choice([t.value for t in Tier])

_RESULT_STYLE = {
    "upgraded": "green",
    "downgraded": "green",
    "skipped": "dim",
    "failed": "bold red",
    "locked": "yellow",
}


def _fleet_options(func: Any) -> Any:
    func = click.option(
        "--alembic-config",
        type=click.Path(path_type=Path),
        help="The application's alembic.ini or migrations folder "
        "[default: TENANTRY_ALEMBIC_CONFIG].",
    )(func)
    func = click.option("--tier", type=TIERS, help="Only shards of this tier.")(func)
    func = click.option(
        "--shard", "shards", multiple=True, metavar="NAME", help="Only this shard (repeatable)."
    )(func)
    return func


def _run_options(func: Any) -> Any:
    func = click.option(
        "--jobs",
        "-j",
        type=click.IntRange(1, 64),
        default=4,
        show_default=True,
        help="Databases migrated at once (one connection each).",
    )(func)
    func = click.option(
        "--no-wait",
        is_flag=True,
        help="Leave a database another runner is migrating to it, instead of waiting.",
    )(func)
    return func


def _run(
    state: CliState,
    direction: str,
    revision: str,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    jobs: int,
    no_wait: bool,
    as_json: bool,
) -> None:
    catalog = state.catalog()
    count = len(select_shards(catalog, shards or None, tier))
    call = migrations.upgrade if direction == "upgrade" else migrations.downgrade
    progress = Progress(
        TextColumn(f"{direction} to {revision}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=state.console,
        transient=True,
        # Off a terminal the bar is never drawn, yet stopping it printed a blank line:
        # on stdout before an error, and ahead of the table in a pipe.
        disable=as_json or not state.console.is_terminal,
    )
    with progress:
        task = progress.add_task("", total=count)

        def advance(result: ShardMigration) -> None:
            progress.update(task, advance=1, description=f"{result.shard}: {result.result}")

        run: FleetRun = call(
            catalog,
            revision,
            jobs=jobs,
            shards=shards or None,
            tier=tier,
            alembic_config=alembic_config,
            wait=not no_wait,
            on_result=advance,
        )
    _render_run(state, run, as_json)
    if not run.ok:
        raise SystemExit(1)


def _render_run(state: CliState, run: FleetRun, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "target": run.target,
                "ok": run.ok,
                "shards": [
                    {
                        "shard": r.shard,
                        "tier": r.tier.value,
                        "from": r.before,
                        "to": r.after,
                        "result": r.result,
                        "seconds": r.seconds,
                        "error": r.error,
                        "warnings": list(r.warnings),
                    }
                    for r in run.results
                ],
            }
        )
        return
    render_table(
        state.console,
        ["shard", "tier", "from", "to", "result", "seconds"],
        (
            [
                r.shard,
                r.tier.value,
                r.before or "-",
                r.after or "-",
                f"[{_RESULT_STYLE[r.result]}]{r.result}[/]",
                f"{r.seconds:.2f}",
            ]
            for r in run.results
        ),
        title=f"migration to {run.target}",
    )
    for r in run.failed:
        # Error text is the database's or the migration's: brackets in it are not markup.
        state.console.print(f"[red]{r.shard}: {escape(r.error or '')}[/]")
    for r in run.results:
        for warning in r.warnings:
            state.console.print(f"[yellow]warning: {escape(warning)}[/]")
    done = sum(1 for r in run.results if r.ok)
    state.console.print(f"{done} of {len(run.results)} shard(s) at {run.target}")


@click.group("migrate")
def migrate_group() -> None:
    """Run the application's Alembic migrations on every shard of the fleet."""


@migrate_group.command("upgrade")
@click.argument("revision", default="head")
@_fleet_options
@_run_options
@json_option
@pass_state
def migrate_upgrade(
    state: CliState,
    revision: str,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    jobs: int,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Upgrade every shard (or --shard/--tier) to REVISION [default: head]."""
    _run(state, "upgrade", revision, shards, tier, alembic_config, jobs, no_wait, as_json)


@migrate_group.command("downgrade")
@click.argument("revision")
@_fleet_options
@_run_options
@json_option
@pass_state
def migrate_downgrade(
    state: CliState,
    revision: str,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    jobs: int,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Downgrade every shard (or --shard/--tier) to REVISION."""
    _run(state, "downgrade", revision, shards, tier, alembic_config, jobs, no_wait, as_json)


@migrate_group.command("status")
@_fleet_options
@json_option
@pass_state
def migrate_status(
    state: CliState,
    shards: tuple[str, ...],
    tier: str | None,
    alembic_config: Path | None,
    as_json: bool,
) -> None:
    """Show every shard's revision against head, and role warnings."""
    fleet = migrations.status(
        state.catalog(), shards=shards or None, tier=tier, alembic_config=alembic_config
    )
    if as_json:
        emit_json(
            {
                "head": fleet.head,
                "in_step": fleet.in_step,
                "verdict": fleet.verdict,
                "shards": [
                    {
                        "shard": s.shard,
                        "tier": s.tier.value,
                        "revision": s.revision,
                        "status": s.verdict,
                        "tenantry_revision": s.tenantry_revision,
                        "error": s.error,
                    }
                    for s in fleet.shards
                ],
                "warnings": fleet.warnings,
            }
        )
    else:
        render_table(
            state.console,
            ["shard", "tier", "revision", "status"],
            (
                [
                    s.shard,
                    s.tier.value,
                    s.revision or "-",
                    s.verdict + (f": {escape(s.error)}" if s.error else ""),
                ]
                for s in fleet.shards
            ),
            title=f"fleet schema (head {fleet.head})",
        )
        for warning in fleet.warnings:
            state.console.print(f"[yellow]warning: {escape(warning)}[/]")
        state.console.print(fleet.verdict)
    if not fleet.in_step:
        raise SystemExit(1)


@click.command("create")
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
        emit_json(shard_record(shard, 0))
    else:
        state.console.print(
            f"created {shard.tier.value} shard {shard.name} ({mask_url(shard.url)}), "
            f"migrated to {revision}"
        )


def secured_record(secured: SecuredShard) -> dict[str, Any]:
    """What ``shard secure`` did to one shard, JSON-ready (URLs masked, no password)."""
    return {
        **shard_record(secured.shard),
        "role": secured.role,
        "role_created": secured.role_created,
        "password": secured.password,
        "changed": secured.changed,
        "warnings": list(secured.warnings),
    }


@click.command("secure")
@click.argument("names", metavar="[NAME]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every PostgreSQL shard (not retired).")
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
    if bool(names) == every:
        raise click.UsageError("name the shards to secure, or give --all (not both)")
    catalog = state.catalog()
    if every:
        names = tuple(
            s.name
            for s in catalog.list_shards()
            if s.backend == "postgresql" and s.state is not ShardState.RETIRED
        )
    else:
        for name in names:  # every name checked before any shard changes
            catalog.get_shard(name)
    done = []
    for name in names:
        secured = migrations.secure_shard(catalog, name, role=role)
        done.append(secured_record(secured))
        if not as_json:
            how = "already" if not secured.changed else "now"
            made = "made" if secured.role_created else "reused"
            state.console.print(
                f"shard {name} routes as {secured.role} {how} (role {made}, password "
                f"{secured.password}, stored in the catalog): {mask_url(secured.shard.url)}"
            )
    if as_json:
        emit_json({"secured": done})
    elif not done:
        state.console.print("no PostgreSQL shard: nothing to secure")


COMMANDS = [migrate_group]
SHARD_COMMANDS = [shard_create, shard_secure]
