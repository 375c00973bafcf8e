"""Fleet migrations: the application's Alembic migrations run on every shard.

Each database is migrated on one connection of its operations role, in one
transaction that first takes a per-database advisory lock (PostgreSQL) or the write
lock (SQLite), so two runners never migrate the same database at once and there is no
global lock. A database already at the target is skipped, so a re-run after a failure
resumes; one failing database does not stop the others. The same transaction
upgrades tenantry's own per-shard tables and, on PostgreSQL shared shards, installs
or refreshes the row-level-security policies.
"""

from __future__ import annotations

import configparser
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from tenantry.errors import (
    ConfigurationError,
    DatabaseAlreadyRegistered,
    TenantryError,
    UnknownShard,
)
from tenantry.migrations.rls import grant_routing_role, install_rls
from tenantry.observability.moves import watch_migrations
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog import Catalog, catalog_of
from tenantry.shardmap.dedicated import mark_tier
from tenantry.shardmap.drivers import WRITE, describe_error
from tenantry.shardmap.identity import ensure_identity
from tenantry.shardmap.model import Shard, ShardState, Tier
from tenantry.shardmap.operations import operations_engine
from tenantry.shardmap.roles import inspect_routing_role
from tenantry.shardmap.schema import moves
from tenantry.shardmap.scripts import ALEMBIC_LOCK, SHARD

__all__ = [
    "MIGRATION_LOCK",
    "FleetRun",
    "ShardMigration",
    "app_config",
    "downgrade",
    "format_heads",
    "migrate_shard",
    "script_directory",
    "select_shards",
    "upgrade",
    "version_heads",
]

#: Advisory-lock key held while a database is migrated (advisory locks are per
#: database, so this locks one database, never the fleet). Moves take it too.
MIGRATION_LOCK = 0x7E4A7C02

Result = Literal["upgraded", "downgraded", "skipped", "failed", "locked"]
Verdict = Literal["ok", "behind", "ahead", "unknown", "unreachable"]


@dataclass(frozen=True, slots=True)
class ShardMigration:
    """What a fleet run did on one shard."""

    shard: str
    tier: Tier
    before: str | None
    after: str | None
    result: Result
    seconds: float
    error: str | None = None
    warnings: tuple[str, ...] = ()
    #: The database's identity (tenantry.shardmap.identity), recorded in the catalog.
    database_id: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the shard ended at the wanted revision without an error."""
        return self.result in ("upgraded", "downgraded", "skipped")


@dataclass(frozen=True, slots=True)
class FleetRun:
    """Every shard's result of one ``upgrade`` or ``downgrade``."""

    target: str
    results: list[ShardMigration] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every shard reached the target."""
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[ShardMigration]:
        """The shards whose migration did not succeed."""
        return [r for r in self.results if not r.ok]


# -- configuration ------------------------------------------------------------------------


def app_config(source: str | Path | None) -> Config:
    """The application's Alembic Config from an ``alembic.ini`` or a script directory."""
    if source is None:
        raise ConfigurationError(
            "no Alembic configuration: pass --alembic-config PATH or set "
            "TENANTRY_ALEMBIC_CONFIG to the application's alembic.ini or migrations folder",
            field="alembic_config",
        )
    path = Path(source)
    if path.is_dir():
        cfg = Config()
        cfg.set_main_option("script_location", str(path.resolve()))
    elif path.is_file():
        cfg = Config(str(path))
        try:
            location = cfg.get_main_option("script_location")
        except (configparser.Error, CommandError) as exc:
            raise ConfigurationError(
                f"cannot read Alembic configuration {str(source)!r}: "
                f"{str(exc).splitlines()[0]}; give the application's alembic.ini or its "
                "migrations folder",
                field="alembic_config",
            ) from None
        if location and not Path(location).is_absolute() and ":" not in location:
            # Relative to the ini file, as the alembic command line resolves it.
            cfg.set_main_option("script_location", str((path.parent / location).resolve()))
    else:
        raise ConfigurationError(
            f"Alembic configuration {str(source)!r} not found: give the path of the "
            "application's alembic.ini or its migrations folder",
            field="alembic_config",
        )
    try:
        script = ScriptDirectory.from_config(cfg)
    except CommandError as exc:
        raise ConfigurationError(
            f"cannot load Alembic scripts: {exc}", field="alembic_config"
        ) from None
    if not Path(script.env_py_location).is_file():
        # Any folder loads as a script directory with no revisions: every database would
        # be "skipped" and the run reported a success without migrating anything.
        raise ConfigurationError(
            f"{script.dir} is not an Alembic script directory (it has no env.py): give "
            "the application's alembic.ini or its migrations folder",
            field="alembic_config",
        )
    return cfg


def script_directory(cfg: Config) -> ScriptDirectory:
    """The application's migration scripts, as *cfg* names them."""
    return ScriptDirectory.from_config(cfg)


def _target_heads(script: ScriptDirectory, revision: str) -> set[str]:
    """The revisions a database is at after migrating to *revision*."""
    if revision == "base":
        return set()
    try:
        if revision in ("head", "heads"):
            return set(script.get_heads())
        found = script.get_revisions(revision)
    except CommandError as exc:
        raise ConfigurationError(
            f"unknown revision {revision!r}: see `alembic history` ({exc})"
        ) from None
    if not found:
        raise ConfigurationError(f"unknown revision {revision!r}: see `alembic history`")
    return {r.revision for r in found if r is not None}


def select_shards(
    catalog: Catalog,
    names: Sequence[str] | None = None,
    tier: Tier | str | None = None,
) -> list[Shard]:
    """The shards a fleet command works on: named ones, or all (not retired) of a tier."""
    everything = {s.name: s for s in catalog.list_shards()}
    if names:
        missing = [n for n in names if n not in everything]
        if missing:
            raise UnknownShard(missing[0])
        chosen = [everything[n] for n in names]
    else:
        chosen = [s for s in everything.values() if s.state is not ShardState.RETIRED]
    if tier is not None:
        chosen = [s for s in chosen if s.tier is Tier(tier)]
    return chosen


# -- one shard ----------------------------------------------------------------------------


def _lock(conn: Connection, wait: bool) -> bool:
    if conn.dialect.name != "postgresql":
        return True  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
    if wait:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        return True
    got = conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    return bool(got.scalar())


def version_heads(conn: Connection, version_table: str) -> set[str]:
    """The revisions the database on *conn* is at, by its *version_table*."""
    ctx = MigrationContext.configure(conn, opts={"version_table": version_table})
    return set(ctx.get_current_heads())


def format_heads(heads: Iterable[str]) -> str | None:
    """Revisions as one sorted, comma-separated string (None for none)."""
    items = sorted(heads)
    return ",".join(items) if items else None


def _routing_user(shard: Shard) -> str | None:
    """The routing role's name when it differs from the operations role's."""
    if not shard.admin_url:
        return None
    routing, ops = make_url(shard.url), make_url(shard.admin_url)
    return routing.username if routing.username != ops.username else None


def migrate_shard(
    shard: Shard,
    cfg: Config,
    revision: str = "head",
    *,
    settings: TenantrySettings,
    direction: Literal["upgrade", "downgrade"] = "upgrade",
    wait: bool = True,
    version_table: str = "alembic_version",
) -> ShardMigration:
    """Migrate one shard; never raises for a database-side failure (it is reported)."""
    started = time.monotonic()
    before: set[str] = set()
    script = script_directory(cfg)
    target = _target_heads(script, revision)
    warnings: list[str] = []
    database_id: str | None = None

    def result(outcome: Result, after: set[str] | None, error: str | None = None) -> ShardMigration:
        return ShardMigration(
            shard=shard.name,
            tier=shard.tier,
            before=format_heads(before),
            after=format_heads(after) if after is not None else None,
            result=outcome,
            seconds=round(time.monotonic() - started, 3),
            error=error,
            warnings=tuple(warnings),
            database_id=database_id,
        )

    with operations_engine(shard, connect_timeout=settings.connect_timeout) as engine:
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(**WRITE)
                with conn.begin():
                    if not _lock(conn, wait):
                        return result(
                            "locked",
                            None,
                            "another runner is migrating this database; it was left to it",
                        )
                    before = version_heads(conn, version_table)
                    changed = before != target
                    if changed:
                        _run_alembic(conn, shard, cfg, revision, direction)
                    database_id = _tenantry_objects(conn, shard, settings)
                    after = version_heads(conn, version_table)
            if after != target:
                return result(
                    "failed",
                    after,
                    "the migration ran but the database is not at the target; does the "
                    "application's env.py use config.attributes['connection']?",
                )
            outcome: Result = direction + "d" if changed else "skipped"  # type: ignore[assignment]
            if shard.tier is Tier.SHARED and engine.dialect.name == "postgresql":
                warnings.extend(_routing_role_warnings(shard, settings))
            return result(outcome, after)
        except Exception as exc:
            # The application's migration code may raise anything (a data check, a typo):
            # it is this database's failure, reported like a driver error, never one that
            # stops the rest of the fleet or escapes provision() with a traceback.
            return result("failed", None, describe_error(exc))


def _run_alembic(
    conn: Connection,
    shard: Shard,
    cfg: Config,
    revision: str,
    direction: Literal["upgrade", "downgrade"],
) -> None:
    """Run the application's migrations on *conn*, in its transaction."""
    cfg.attributes["connection"] = conn
    # A env.py that ignores the shared connection would still reach
    # this database, never the one in alembic.ini.
    cfg.set_main_option(
        "sqlalchemy.url",
        make_url(shard.operations_url).render_as_string(hide_password=False).replace("%", "%%"),
    )
    with ALEMBIC_LOCK:
        if direction == "upgrade":
            command.upgrade(cfg, revision)
        else:
            command.downgrade(cfg, revision)


def _tenantry_objects(conn: Connection, shard: Shard, settings: TenantrySettings) -> str:
    """tenantry's own tables, the database's identity and, on PostgreSQL, the
    row-level-security policies and the routing role's grants; return the identity."""
    SHARD.upgrade(conn)
    database_id = ensure_identity(conn).database_id
    mark_tier(conn, shard.tier, constant=settings.dedicated_constant)
    if conn.dialect.name == "postgresql":
        # Every PostgreSQL shard: on a dedicated one the policies still
        # refuse writes while the tenant is frozen or moved.
        tables = install_rls(conn, column=settings.tenant_column)
        role = _routing_user(shard)
        if role:
            grant_routing_role(conn, role, tables)
    return database_id


# -- the fleet ------------------------------------------------------------------------------


def _run(
    target: object,
    revision: str,
    direction: Literal["upgrade", "downgrade"],
    *,
    jobs: int,
    shards: Sequence[str] | None,
    tier: Tier | str | None,
    alembic_config: str | Path | None,
    wait: bool,
    on_result: Callable[[ShardMigration], None] | None,
) -> FleetRun:
    if jobs < 1:
        raise ConfigurationError(f"jobs must be at least 1, got {jobs}", field="jobs")
    catalog = catalog_of(target)
    settings = catalog.settings
    source = alembic_config if alembic_config is not None else settings.alembic_config
    base = app_config(source)
    _target_heads(script_directory(base), revision)  # a bad revision fails before any database
    chosen = select_shards(catalog, shards, tier)

    results: dict[str, ShardMigration] = {}
    telemetry = watch_migrations(settings)  # metrics and traces; None when off

    def report(outcome: ShardMigration) -> None:
        results[outcome.shard] = outcome
        if telemetry is not None:
            telemetry.migrated(outcome, direction)
        if on_result is not None:
            on_result(outcome)

    # A live move (even one whose process died) owns its shards' schema until it ends.
    busy = _shards_in_moves(catalog)
    for shard in [s for s in chosen if s.name in busy]:
        report(_left_to_move(shard, busy[shard.name]))
    free = [s for s in chosen if s.name not in busy]
    migrate = partial(
        _migrate_from_source,
        source=source,
        revision=revision,
        settings=settings,
        direction=direction,
        wait=wait,
    )
    if jobs == 1 or len(free) <= 1:
        outcomes: Iterable[ShardMigration] = map(migrate, free)
    else:
        outcomes = _migrate_in_processes(free, jobs, migrate)
    for outcome in outcomes:
        report(_record_identity(catalog, outcome))
    return FleetRun(target=revision, results=[results[s.name] for s in chosen])


def _left_to_move(shard: Shard, move_id: int) -> ShardMigration:
    """The result of a shard left alone because live move *move_id* involves it."""
    return ShardMigration(
        shard.name,
        shard.tier,
        None,
        None,
        "locked",
        0.0,
        f"move {move_id} is live on this shard: finish it with `tenantry moves "
        f"resume {move_id}` (or abort it), then migrate",
    )


def _migrate_in_processes(
    shards: Sequence[Shard], jobs: int, migrate: Callable[[Shard], ShardMigration]
) -> Iterator[ShardMigration]:
    """Migrate *shards* in up to *jobs* worker processes; yield each result as it ends
    (a worker that died is a failed result, and the rest go on)."""
    # Alembic keeps its running environment in module globals (alembic.context), so
    # concurrent migrations need a process each. A forkserver, not fork, so that no
    # thread or connection of ours is copied into the workers; with this module
    # preloaded, a worker starts in milliseconds instead of re-importing everything
    # (spawn: ~3 s per worker on a busy 2-core machine).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=min(jobs, len(shards)), mp_context=context) as pool:
        futures = {pool.submit(migrate, shard): shard for shard in shards}
        for future in as_completed(futures):
            shard = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # a worker died: report it, go on with the rest
                outcome = ShardMigration(
                    shard.name, shard.tier, None, None, "failed", 0.0, describe_error(exc)
                )
            yield outcome


def _record_identity(catalog: Catalog, outcome: ShardMigration) -> ShardMigration:
    """Record the shard's database identity in the catalog (shards registered before
    identities get theirs here). Two shard names for one database: the second one
    recorded fails, naming the first."""
    if outcome.database_id is None or not outcome.ok:
        return outcome
    try:
        warning = catalog.record_database_id(outcome.shard, outcome.database_id)
    except DatabaseAlreadyRegistered as exc:
        return replace(outcome, result="failed", error=str(exc))
    except TenantryError as exc:
        warning = f"shard {outcome.shard!r}: its database identity was not recorded: {exc}"
    if warning is None:
        return outcome
    return replace(outcome, warnings=(*outcome.warnings, warning))


def _shards_in_moves(catalog: Catalog) -> dict[str, int]:
    """Shard name -> id of a live move that involves it (read from the move journal)."""
    busy: dict[str, int] = {}
    with catalog.read_transaction() as conn:
        rows = conn.execute(
            sa.select(moves.c.id, moves.c.source, moves.c.target)
            .where(moves.c.ended_at.is_(None))
            .order_by(moves.c.id)
        ).all()
    for move_id, source, target in rows:
        busy.setdefault(source, move_id)
        busy.setdefault(target, move_id)
    return busy


def _migrate_from_source(
    shard: Shard,
    source: str | Path | None,
    revision: str,
    settings: TenantrySettings,
    direction: Literal["upgrade", "downgrade"],
    wait: bool,
) -> ShardMigration:
    return migrate_shard(
        shard, app_config(source), revision, settings=settings, direction=direction, wait=wait
    )


def upgrade(
    target: object,
    revision: str = "head",
    *,
    jobs: int = 4,
    shards: Sequence[str] | None = None,
    tier: Tier | str | None = None,
    alembic_config: str | Path | None = None,
    wait: bool = True,
    on_result: Callable[[ShardMigration], None] | None = None,
) -> FleetRun:
    """Upgrade every shard (or the named ones, or one tier) to *revision*.

    *target* is a Catalog or a Router. At most *jobs* databases at once, one
    connection each. With ``wait=False`` a database another runner holds is left to
    it (result ``locked``).
    """
    return _run(
        target, revision, "upgrade", jobs=jobs, shards=shards, tier=tier,
        alembic_config=alembic_config, wait=wait, on_result=on_result,
    )  # fmt: skip


def downgrade(
    target: object,
    revision: str,
    *,
    jobs: int = 4,
    shards: Sequence[str] | None = None,
    tier: Tier | str | None = None,
    alembic_config: str | Path | None = None,
    wait: bool = True,
    on_result: Callable[[ShardMigration], None] | None = None,
) -> FleetRun:
    """Downgrade every shard (or the named ones, or one tier) to *revision*."""
    return _run(
        target, revision, "downgrade", jobs=jobs, shards=shards, tier=tier,
        alembic_config=alembic_config, wait=wait, on_result=on_result,
    )  # fmt: skip


def _routing_role_warnings(shard: Shard, settings: TenantrySettings) -> list[str]:
    """What ``migrate upgrade`` says about a shared shard's routing role (it never
    refuses: ``shard add`` and the routers do)."""
    try:
        check = inspect_routing_role(shard, settings)
    except TenantryError as exc:
        return [f"shard {shard.name!r}: cannot check its routing role: {exc}"]
    return [line for line in (check.refusal(shard.name), check.caution(shard.name)) if line]
