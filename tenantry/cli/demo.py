"""``tenantry demo``: a local fleet on SQLite files, built and used step by step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
from rich.console import Console

from tenantry import moves
from tenantry.cli.app import CliState, pass_state, render_table
from tenantry.demo import GROWING_TENANT, OVERPROVISIONED_TENANT, build_fleet, census, seed
from tenantry.migrations import provision
from tenantry.rebalance.apply import apply_plan, plan_for
from tenantry.router import Router
from tenantry.shardmap import MapSnapshot, Tier

__all__ = ["COMMANDS"]


def _show_map(console: Console, snapshot: MapSnapshot, title: str) -> None:
    counts = Counter(t.shard for t in snapshot.tenants.values())
    render_table(
        console,
        ["shard", "tier", "tenants"],
        (
            [s.name, s.tier.value, ", ".join(t.id for t in snapshot.tenants_on(s.name)) or "-"]
            for s in snapshot.shards.values()
            if counts[s.name] or s.state.value == "active"
        ),
        title=f"{title} (map version {snapshot.version})",
    )


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
    console = state.console
    console.rule("[bold]tenantry demo: EV-charger operator groups")
    console.print(
        "1. provision two shared shards and two dedicated ones (a regulated utility, and a "
        "small group that needs none), migrated with Alembic"
    )
    fleet = build_fleet(directory)
    console.print(f"   catalog: {fleet.catalog_url}")
    _show_map(console, fleet.snapshot, "shard map")
    tenants = [t.id for t in fleet.snapshot.tenants_sorted()]
    with Router(settings=fleet.settings, listen=False) as router:
        console.print("2. write each group's drivers, chargers and sessions through the router")
        seed(router, tenants)
        console.print("3. read them back, each group through its own session")
        rows = census(router, tenants)
        render_table(
            console,
            ["tenant", "shard", "users", "chargers", "sessions", "kWh", "foreign rows"],
            (
                [c.tenant, c.shard, c.users, c.chargers, c.sessions, c.energy_kwh, c.foreign_rows]
                for c in rows
            ),
            title="what each tenant sees",
        )
        leaks = sum(c.foreign_rows for c in rows)
        console.print(
            f"   every group used ids from 1 in the same shared tables; rows of another "
            f"group seen: {leaks}"
        )
        catalog = router.catalog
        server = f"sqlite:///{fleet.directory}"
        console.print(
            f"4. promote {GROWING_TENANT} to a database of its own, demote {OVERPROVISIONED_TENANT}"
            " into the shared pool (SQLite: offline moves, verified before the switch)"
        )
        for move in (
            moves.promote(catalog, GROWING_TENANT, server=server, mode="auto"),
            moves.demote(catalog, OVERPROVISIONED_TENANT, drop_source=True, mode="auto"),
        ):
            console.print(
                f"   move {move.id}: {move.tenant_id} {move.source} -> {move.target}, "
                f"{move.stats.get('rows', 0)} rows verified, writes frozen "
                f"{float(move.stats.get('freeze_seconds', 0.0)):.2f}s"
            )
        router.refresh()
        _show_map(console, router.snapshot, "shard map after the moves")
        followed = census(router, [GROWING_TENANT, OVERPROVISIONED_TENANT])
        for before in rows:
            for after in followed:
                if after.tenant == before.tenant:
                    same = (after.users, after.sessions, after.energy_kwh) == (
                        before.users,
                        before.sessions,
                        before.energy_kwh,
                    )
                    console.print(
                        f"   {after.tenant}: the router now serves it from {after.shard}; "
                        f"{after.sessions} sessions, {'same data' if same else 'DATA DIFFERS'}"
                    )
        console.print("5. add a third shared shard and rebalance the pool")
        provision(catalog, "shared-3", server, tier=Tier.SHARED)
        plan = plan_for(catalog, refresh=True)
        for applied in apply_plan(catalog, plan):
            console.print(
                f"   {applied.planned.tenant_id}: {applied.planned.source} -> "
                f"{applied.planned.target}" + ("" if applied.ok else f" failed: {applied.error}")
            )
        console.print(
            f"   spread {plan.spread_before():.0%} -> {plan.spread_after():.0%} "
            f"with {len(plan.moves)} move(s); {plan.reason}"
        )
        router.refresh()
        _show_map(console, router.snapshot, "shard map after rebalancing")


COMMANDS = [demo_command]
