"""The seed story: EV-charger operator groups sharing a fleet.

Most operator groups are small and share two databases; a municipal utility bound by
its regulator to keep its data apart has a database of its own. The demo builds that
fleet on SQLite files, migrates it with the demo app's Alembic scripts, writes each
group's drivers, chargers and charging sessions through the router, and shows that
every group sees only its own rows; then it promotes a growing group, demotes an
over-provisioned one and rebalances the pool onto a new shard. :func:`tell_story` runs
the five steps and tells them to a :class:`StoryReport` (``tenantry demo`` prints them).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, select

from tenantry import moves
from tenantry.demo.models import Charger, ChargingSession, User
from tenantry.errors import ConfigurationError
from tenantry.migrations import provision, upgrade
from tenantry.rebalance import apply_plan, plan_for
from tenantry.router import Router
from tenantry.settings import TenantrySettings, load_settings
from tenantry.shardmap import Catalog, MapSnapshot, Tier

__all__ = [
    "DEDICATED_TENANT",
    "GROWING_TENANT",
    "MIGRATIONS",
    "OVERPROVISIONED_TENANT",
    "SHARED_TENANTS",
    "Census",
    "DemoFleet",
    "StoryReport",
    "build_fleet",
    "census",
    "seed",
    "tell_story",
]

#: Operator groups that share the pool.
SHARED_TENANTS = (
    "voltpark",
    "chargecity",
    "greenmile",
    "fjord-ev",
    "sunfleet",
    "metro-charge",
    "amp-alley",
)
#: The regulated municipal utility, on a database of its own.
DEDICATED_TENANT = "nordgrid-utility"
#: A small group that was given a database of its own it does not need.
OVERPROVISIONED_TENANT = "tinyvolt"
#: The group that grew: promoted to a dedicated database in the demo.
GROWING_TENANT = "voltpark"

#: The demo app's Alembic script directory (``--alembic-config`` accepts it).
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MARKER = ".tenantry-demo"


@dataclass(frozen=True)
class DemoFleet:
    """Where the demo fleet lives, and its map once built."""

    directory: Path
    catalog_url: str
    settings: TenantrySettings
    snapshot: MapSnapshot

    def catalog(self) -> Catalog:
        """The demo fleet's catalog."""
        return Catalog(settings=self.settings)


@dataclass(frozen=True)
class Census:
    """What one tenant's own session sees."""

    tenant: str
    shard: str
    users: int
    chargers: int
    sessions: int
    energy_kwh: Decimal
    foreign_rows: int


def _reset(directory: Path) -> None:
    """Start from scratch, but only in a folder the demo made (or an empty one)."""
    if directory.exists() and any(directory.iterdir()):
        ours = (directory / _MARKER).exists() or all(
            p.name.endswith((".db", ".db-wal", ".db-shm", ".lock")) for p in directory.iterdir()
        )
        if not ours:
            raise ConfigurationError(
                f"{directory} exists and was not made by `tenantry demo`: choose another --dir"
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _MARKER).write_text("made by `tenantry demo`; safe to delete\n")


def build_fleet(directory: Path | str = ".tenantry-demo") -> DemoFleet:
    """Build the demo fleet afresh in *directory*: catalog, two shared shards and a
    dedicated one, provisioned and migrated, and the tenants placed. Safe to run again."""
    directory = Path(directory).resolve()
    _reset(directory)
    catalog_url = f"sqlite:///{directory / 'catalog.db'}"
    settings = load_settings(catalog_url=catalog_url, alembic_config=str(MIGRATIONS))
    server = f"sqlite:///{directory}"
    with Catalog(settings=settings) as catalog:
        catalog.init()
        provision(catalog, "shared-1", server, tier=Tier.SHARED)
        provision(catalog, "shared-2", server, tier=Tier.SHARED)
        provision(catalog, "nordgrid", server, tier=Tier.DEDICATED)
        provision(catalog, "tinyvolt-db", server, tier=Tier.DEDICATED)
        upgrade(catalog, jobs=1)  # a no-op here: provisioning migrated each one
        for tenant in SHARED_TENANTS:
            catalog.add_tenant(tenant)
        catalog.add_tenant(DEDICATED_TENANT, tier=Tier.DEDICATED, shard="nordgrid")
        catalog.add_tenant(OVERPROVISIONED_TENANT, tier=Tier.DEDICATED, shard="tinyvolt-db")
        return DemoFleet(directory, catalog_url, settings, catalog.snapshot())


def _numbers(tenant: str) -> tuple[int, int, int]:
    # Stable per tenant, so the demo prints the same story every time.
    digest = hashlib.sha256(tenant.encode()).digest()
    return 2 + digest[0] % 4, 2 + digest[1] % 5, 5 + digest[2] % 20


def seed(router: Router, tenants: list[str]) -> None:
    """Write each tenant's drivers, chargers and charging sessions through the router.

    Every tenant gets ids starting at 1: the same primary keys in the same tables of a
    shared database, told apart only by ``tenant_id``.
    """
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    for tenant in tenants:
        users, chargers, sessions = _numbers(tenant)
        with router.session(tenant) as session:
            session.add_all(
                User(id=i, email=f"driver{i}@{tenant}.example", name=f"Driver {i}")
                for i in range(1, users + 1)
            )
            session.add_all(
                Charger(
                    id=i,
                    name=f"{tenant} charger {i}",
                    location=f"Bay {i}",
                    power_kw=Decimal(50 * (1 + i % 3)),
                    status="available",
                )
                for i in range(1, chargers + 1)
            )
            session.flush()
            session.add_all(
                ChargingSession(
                    id=i,
                    charger_id=1 + i % chargers,
                    user_id=1 + i % users,
                    started_at=start + timedelta(hours=i),
                    ended_at=start + timedelta(hours=i, minutes=40),
                    energy_kwh=Decimal(10 + i % 30),
                )
                for i in range(1, sessions + 1)
            )
            session.commit()


def census(router: Router, tenants: list[str]) -> list[Census]:
    """Count what each tenant's own session sees, and any row of another tenant."""
    found = []
    for tenant in tenants:
        with router.session(tenant) as session:
            users = session.scalar(select(func.count()).select_from(User)) or 0
            chargers = session.scalar(select(func.count()).select_from(Charger)) or 0
            sessions = session.scalars(select(ChargingSession)).all()
            foreign = sum(
                1
                for model in (User, Charger, ChargingSession)
                for owner in session.scalars(select(model.tenant_id))
                if owner != tenant
            )
            found.append(
                Census(
                    tenant=tenant,
                    shard=router.shard_for(tenant).name,
                    users=users,
                    chargers=chargers,
                    sessions=len(sessions),
                    energy_kwh=sum((s.energy_kwh for s in sessions), Decimal(0)),
                    foreign_rows=foreign,
                )
            )
    return found


# -- the story, step by step ----------------------------------------------------------------


class StoryReport(Protocol):
    """Where :func:`tell_story` tells the demo's story, line by line and table by table."""

    def heading(self, text: str) -> None:
        """The story's title."""

    def say(self, text: str) -> None:
        """One line of the story (a numbered step, or what it did, indented)."""

    def shard_map(self, snapshot: MapSnapshot, title: str) -> None:
        """The shard map as it stands now."""

    def census(self, rows: list[Census]) -> None:
        """What each tenant's own session sees."""


def tell_story(directory: Path | str, report: StoryReport) -> None:
    """Run the demo's five steps on a fleet built afresh in *directory*: provision, write
    through the router, read back, promote and demote, add a shard and rebalance."""
    report.heading("tenantry demo: EV-charger operator groups")
    report.say(
        "1. provision two shared shards and two dedicated ones (a regulated utility, and a "
        "small group that needs none), migrated with Alembic"
    )
    fleet = build_fleet(directory)
    report.say(f"   catalog: {fleet.catalog_url}")
    report.shard_map(fleet.snapshot, "shard map")
    tenants = [t.id for t in fleet.snapshot.tenants_sorted()]
    server = f"sqlite:///{fleet.directory}"
    with Router(settings=fleet.settings, listen=False) as router:
        rows = _write_and_read(router, tenants, report)
        _promote_and_demote(router, server, rows, report)
        _add_shard_and_rebalance(router, server, report)


def _write_and_read(router: Router, tenants: list[str], report: StoryReport) -> list[Census]:
    """Steps 2 and 3: every tenant's rows written through the router, then read back."""
    report.say("2. write each group's drivers, chargers and sessions through the router")
    seed(router, tenants)
    report.say("3. read them back, each group through its own session")
    rows = census(router, tenants)
    report.census(rows)
    leaks = sum(c.foreign_rows for c in rows)
    report.say(
        f"   every group used ids from 1 in the same shared tables; rows of another "
        f"group seen: {leaks}"
    )
    return rows


def _promote_and_demote(
    router: Router, server: str, before: list[Census], report: StoryReport
) -> None:
    """Step 4: the growing group promoted, the small one demoted; the router follows."""
    catalog = router.catalog
    report.say(
        f"4. promote {GROWING_TENANT} to a database of its own, demote {OVERPROVISIONED_TENANT}"
        " into the shared pool (SQLite: offline moves, verified before the switch)"
    )
    for move in (
        moves.promote(catalog, GROWING_TENANT, server=server, mode="auto"),
        moves.demote(catalog, OVERPROVISIONED_TENANT, drop_source=True, mode="auto"),
    ):
        report.say(
            f"   move {move.id}: {move.tenant_id} {move.source} -> {move.target}, "
            f"{move.stats.get('rows', 0)} rows verified, writes frozen "
            f"{float(move.stats.get('freeze_seconds', 0.0)):.2f}s"
        )
    router.refresh()
    report.shard_map(router.snapshot, "shard map after the moves")
    after = {c.tenant: c for c in census(router, [GROWING_TENANT, OVERPROVISIONED_TENANT])}
    for old in before:
        new = after.get(old.tenant)
        if new is None:
            continue
        same = (new.users, new.sessions, new.energy_kwh) == (
            old.users,
            old.sessions,
            old.energy_kwh,
        )
        report.say(
            f"   {new.tenant}: the router now serves it from {new.shard}; "
            f"{new.sessions} sessions, {'same data' if same else 'DATA DIFFERS'}"
        )


def _add_shard_and_rebalance(router: Router, server: str, report: StoryReport) -> None:
    """Step 5: a third shared shard, and the pool rebalanced onto it."""
    catalog = router.catalog
    report.say("5. add a third shared shard and rebalance the pool")
    provision(catalog, "shared-3", server, tier=Tier.SHARED)
    plan = plan_for(catalog, refresh=True)
    for applied in apply_plan(catalog, plan):
        report.say(
            f"   {applied.planned.tenant_id}: {applied.planned.source} -> "
            f"{applied.planned.target}" + ("" if applied.ok else f" failed: {applied.error}")
        )
    report.say(
        f"   spread {plan.spread_before():.0%} -> {plan.spread_after():.0%} "
        f"with {len(plan.moves)} move(s); {plan.reason}"
    )
    router.refresh()
    report.shard_map(router.snapshot, "shard map after rebalancing")
