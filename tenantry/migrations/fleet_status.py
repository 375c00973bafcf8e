"""The fleet's status: every shard's schema revision against the application's head,
and what an operator should know of its roles (``tenantry migrate status``)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry.errors import TenantryError
from tenantry.migrations.fleet import (
    Verdict,
    app_config,
    format_heads,
    script_directory,
    select_shards,
    version_heads,
)
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog import catalog_of
from tenantry.shardmap.drivers import describe_error, make_engine
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.operations import operations_engine
from tenantry.shardmap.roles import check_role
from tenantry.shardmap.scripts import SHARD

__all__ = ["FleetStatus", "ShardStatus", "classify", "status"]


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard's schema revision against the application's head."""

    shard: str
    tier: Tier
    #: The application's revision(s) on the shard (None: none, or unreachable).
    revision: str | None
    verdict: Verdict
    #: The revision of tenantry's own per-shard tables.
    tenantry_revision: str | None = None
    error: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """The fleet's revisions and its verdict."""

    head: str
    shards: list[ShardStatus]

    @property
    def in_step(self) -> bool:
        """True when every shard is at head."""
        return all(s.verdict == "ok" for s in self.shards)

    @property
    def verdict(self) -> str:
        """One sentence for operators."""
        if self.in_step:
            return f"in step: all {len(self.shards)} shard(s) at {self.head}"
        counts: dict[str, int] = {}
        for s in self.shards:
            if s.verdict != "ok":
                counts[s.verdict] = counts.get(s.verdict, 0) + 1
        detail = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        return f"out of step ({detail}): run `tenantry migrate upgrade`"

    @property
    def warnings(self) -> list[str]:
        """What an operator should know of the shards' revisions (behind, ahead, unknown)."""
        return [w for s in self.shards for w in s.warnings]


def classify(script: ScriptDirectory, current: set[str], heads: set[str]) -> Verdict:
    """A database's revisions *current* against the scripts' *heads*: ok, behind, ahead
    (a revision the scripts do not know) or unknown (none)."""
    if not current:
        return "unknown"
    if current == heads:
        return "ok"
    for rev in current:
        try:
            script.get_revision(rev)
        except CommandError:
            return "ahead"  # a revision this code does not know: newer migrations ran
    return "behind"


def _shard_status(
    shard: Shard, script: ScriptDirectory, heads: set[str], settings: TenantrySettings
) -> ShardStatus:
    warnings: list[str] = []
    with operations_engine(shard, connect_timeout=settings.connect_timeout) as engine:
        try:
            with engine.connect() as conn:
                current = version_heads(conn, "alembic_version")
                ours = SHARD.current(conn)
                postgres = conn.dialect.name == "postgresql"
        except (sa.exc.SQLAlchemyError, TenantryError, OSError) as exc:
            return ShardStatus(
                shard.name, shard.tier, None, "unreachable", error=describe_error(exc)
            )
    if postgres and shard.tier is Tier.SHARED:
        if not shard.admin_url or shard.admin_url == shard.url:
            warnings.append(
                f"shard {shard.name!r}: one URL serves routing and operations; give it an "
                "--admin-url so that routing runs as a role that row-level security binds"
            )
        warnings.extend(_routing_role_warning(shard, settings))
    return ShardStatus(
        shard.name,
        shard.tier,
        format_heads(current),
        classify(script, current, heads),
        tenantry_revision=ours,
        warnings=tuple(warnings),
    )


def _routing_role_warning(shard: Shard, settings: TenantrySettings) -> list[str]:
    engine = make_engine(shard.url, connect_timeout=settings.connect_timeout, poolclass=NullPool)
    # One URL for both roles is warned about on its own (see _shard_status).
    ops = make_url(shard.admin_url).username if shard.admin_url not in (None, shard.url) else None
    try:
        with engine.connect() as conn:
            check = check_role(conn, column=settings.tenant_column, operations_role=ops)
            warning = check.warning(shard.name)
    except (sa.exc.SQLAlchemyError, TenantryError, OSError) as exc:
        warning = f"shard {shard.name!r}: cannot connect as the routing role: {describe_error(exc)}"
    finally:
        engine.dispose()
    return [warning] if warning else []


def status(
    target: object,
    *,
    shards: Sequence[str] | None = None,
    tier: Tier | str | None = None,
    alembic_config: str | Path | None = None,
    jobs: int = 4,
) -> FleetStatus:
    """Every shard's revision against the application's head, and role warnings."""
    catalog = catalog_of(target)
    settings = catalog.settings
    cfg = app_config(alembic_config if alembic_config is not None else settings.alembic_config)
    script = script_directory(cfg)
    heads = set(script.get_heads())
    chosen = select_shards(catalog, shards, tier)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = list(pool.map(lambda s: _shard_status(s, script, heads, settings), chosen))
    return FleetStatus(head=format_heads(heads) or "base", shards=found)
