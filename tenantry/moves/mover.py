"""The move state machine: planned → frozen → copied → verified → switched → cleaned.

Each state is committed to the catalog's journal before its step acts, and every step
is idempotent, so :meth:`Mover.run` resumes a move from its recorded state after a
crash at any point; :meth:`Mover.abort` rolls back a move that has not switched.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from tenantry.errors import (
    FreezeBudgetExceeded,
    FreezeTimeout,
    MoveError,
    MoveRefused,
    MoveRolledBack,
    ReplicationFailed,
    SchemaContractError,
    ShardNotActive,
    ShardOccupied,
    TenantryError,
    UnknownShard,
    VerificationFailed,
)
from tenantry.migrations.fleet import MIGRATION_LOCK
from tenantry.moves.copy import (
    copy_tenant,
    delete_tenant_rows,
    quiet_triggers,
    replica_allowed,
    user_triggers,
)
from tenantry.moves.hooks import Checkpoints, EnvHooks, MoveObserver, NullObserver
from tenantry.moves.journal import Journal, Move, MoveKind, MoveMode, MoveState
from tenantry.moves.online import SNAPSHOT_APPLICATION, OnlineSteps, online_problems
from tenantry.moves.references import cross_tenant_problems, missing_references, rows_left
from tenantry.moves.tables import (
    TenantTable,
    analyze_tables,
    check_same_tables,
    check_whole_database,
    tenant_tables,
    unindexed_foreign_keys,
)
from tenantry.moves.verify import TableDigest, compare_digests, digest_tenant
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import WRITE, describe_error
from tenantry.shardmap.identity import LiveDatabase, live_database, read_identity
from tenantry.shardmap.model import Shard, ShardState, TenantState, Tier, mask_url
from tenantry.shardmap.operations import operations_engine, operator_engine, shard_errors
from tenantry.shardmap.residency import (
    Residency,
    clear_residency,
    commit_residency,
    read_residency,
    write_residency,
)

__all__ = ["Checkpoints", "Mover"]

logger = logging.getLogger("tenantry.moves")

_MOVE_LOCK_BASE = 0x7E4A0000  # + move id: one advisory lock per move on the catalog
_CLAIM_PATIENCE = 3.0  # seconds a move's claim is retried before "run by another process"


class Mover:
    """Runs moves recorded in *catalog*'s journal."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        observer: MoveObserver | None = None,
        hooks: Checkpoints | None = None,
    ) -> None:
        self.catalog = catalog
        self.settings = catalog.settings
        self.journal = Journal(catalog)
        self.observer: MoveObserver = observer or NullObserver()
        self.hooks: Checkpoints = hooks or EnvHooks()
        self.column = self.settings.tenant_column
        self.schemas = self.settings.move_schemas
        self.online = OnlineSteps(self)

    # -- planning ---------------------------------------------------------------------

    def plan(
        self,
        tenant_id: str,
        target: str,
        *,
        kind: MoveKind = MoveKind.MOVE,
        mode: MoveMode = MoveMode.OFFLINE,
        options: dict[str, Any] | None = None,
        artifacts: dict[str, Any] | None = None,
        check: bool = True,
    ) -> Move:
        """Check that the move can run, then record it as planned. Nothing is frozen."""
        snapshot = self.catalog.snapshot()
        tenant = snapshot.tenant(tenant_id)
        source = snapshot.shard(tenant.shard)
        if check:
            target_shard = snapshot.shard(target)
            self._check_target(tenant_id, source, target_shard, kind)
            self.precheck(source, target_shard, tenant_id)
            if kind is MoveKind.DEMOTE and (options or {}).get("drop_source"):
                self.check_droppable(tenant_id, source, move_id=None)
        return self.journal.create(
            tenant_id,
            source.name,
            target,
            kind=kind,
            mode=mode,
            options=options,
            artifacts=artifacts,
        )

    def _check_target(self, tenant_id: str, source: Shard, target: Shard, kind: MoveKind) -> None:
        if target.name == source.name:
            raise MoveRefused(
                f"tenant {tenant_id!r} lives on shard {source.name!r} already: choose "
                "another target",
                tenant_id=tenant_id,
            )
        if target.state is not ShardState.ACTIVE:
            raise ShardNotActive(
                f"shard {target.name!r} is {target.state.value} and takes no tenants: "
                "choose an active shard",
                tenant_id=tenant_id,
                shard=target.name,
            )
        if kind is MoveKind.PROMOTE and target.tier is not Tier.DEDICATED:
            raise MoveRefused(
                f"promote needs a dedicated target; {target.name!r} is shared",
                tenant_id=tenant_id,
            )
        if kind is MoveKind.DEMOTE and target.tier is not Tier.SHARED:
            raise MoveRefused(
                f"demote needs a shared target; {target.name!r} is dedicated",
                tenant_id=tenant_id,
            )
        if target.tier is Tier.DEDICATED:
            others = [t.id for t in self.catalog.list_tenants(shard=target.name)]
            if others:
                raise ShardOccupied(
                    f"dedicated shard {target.name!r} already holds tenant {others[0]!r}: "
                    "give each dedicated tenant its own shard",
                    tenant_id=tenant_id,
                    shard=target.name,
                )

    def choose_mode(
        self, source: Shard, target: Shard, mode: MoveMode | str
    ) -> tuple[MoveMode, str]:
        """Resolve ``auto`` to online or offline, and say why (online asked for but
        impossible is refused with the reasons)."""
        wanted = str(mode)
        if wanted == MoveMode.OFFLINE.value:
            return MoveMode.OFFLINE, "offline, as asked"
        if source.backend != "postgresql" or target.backend != "postgresql":
            problems = [
                "online moves need PostgreSQL on both ends (SQLite has no logical replication)"
            ]
        else:
            with self.admin(source) as src_engine, self.admin(target) as dst_engine:
                with src_engine.connect() as src, dst_engine.connect() as dst:
                    tables = tenant_tables(src, column=self.column, schemas=self.schemas)
                    problems = online_problems(src, dst, tables, self.column)
        if not problems:
            why = "online, as asked" if wanted == "online" else "online: both ends support it"
            return MoveMode.ONLINE, why
        if wanted == MoveMode.ONLINE.value:
            raise MoveRefused("cannot move online: " + "; ".join(problems))
        return MoveMode.OFFLINE, "offline: " + "; ".join(problems)

    def precheck(
        self, source: Shard, target: Shard, tenant_id: str | None = None
    ) -> list[TenantTable]:
        """Both ends reachable, two different databases, at one migration revision,
        with the same tenant tables, and no foreign key to a tenant table from a table
        that does not move. With *tenant_id*, its rows too: none tied to another
        tenant's through a foreign key, and every row of a table that does not move
        (shared reference data) that they reference present at the target."""
        with self.admin(source) as src, self.admin(target) as dst:
            self.check_distinct(source, target, src, dst)
            with src.connect() as s, dst.connect() as d:
                src_rev, dst_rev = _app_revision(s), _app_revision(d)
                if src_rev != dst_rev:
                    raise MoveRefused(
                        f"shard {target.name!r} is at migration revision {dst_rev or 'none'} "
                        f"but {source.name!r} is at {src_rev or 'none'}: run "
                        "`tenantry migrate upgrade` first"
                    )
                tables = tenant_tables(s, column=self.column, schemas=self.schemas)
                check_whole_database(s, tables, column=self.column)
                for end, conn in ((source, s), (target, d)):
                    triggers = user_triggers(conn, tables)
                    if triggers and not replica_allowed(conn):
                        raise MoveRefused(
                            f"shard {end.name!r} has triggers on tenant tables "
                            f"({', '.join(triggers[:3])}) and its operations role may not "
                            "set session_replication_role, so the copy and the cleanup "
                            "would fire them: GRANT SET ON PARAMETER session_replication_role "
                            "to it, or disable the triggers"
                        )
                check_same_tables(
                    tables, tenant_tables(d, column=self.column, schemas=self.schemas)
                )
                if not sa.inspect(d).has_table("tenantry_residency"):
                    raise MoveRefused(
                        f"shard {target.name!r} lacks tenantry's tables: run "
                        "`tenantry migrate upgrade`"
                    )
                if tenant_id is not None:
                    problems = cross_tenant_problems(s, tenant_id, tables, self.column)
                    problems += missing_references(s, d, tenant_id, tables, self.column)
                    if problems:
                        raise MoveRefused(
                            f"cannot move tenant {tenant_id!r}: {problems[0]}",
                            tenant_id=tenant_id,
                        )
        return tables

    def check_droppable(self, tenant_id: str, source: Shard, *, move_id: int | None) -> None:
        """Refuse to drop *source*'s database while a table with the tenant column, in
        any schema, holds another tenant's row: when planning (*move_id* None,
        MoveRefused), and just before the drop (MoveError: the move waits, resumable),
        when a row of *tenant_id* left by the cleanup refuses it too."""
        if source.backend != "postgresql":
            return
        with self.admin(source) as engine, engine.connect() as conn:
            left = rows_left(conn, tenant_id, self.column, own=move_id is not None)
        if left is None:
            return
        if move_id is None:
            raise MoveRefused(
                f"refusing to drop the database of shard {source.name!r}: {left}; move or "
                "delete those rows first, or demote without --drop-source (the database "
                "is then kept, retired)",
                tenant_id=tenant_id,
            )
        raise MoveError(
            f"refusing to drop the database of shard {source.name!r}: {left}; the tenant "
            f"lives on its new shard already; move or delete those rows, then run "
            f"`tenantry moves resume {move_id}` (the database is kept until then)",
            tenant_id=tenant_id,
            move_id=move_id,
        )

    def check_distinct(self, source: Shard, target: Shard, src: Engine, dst: Engine) -> None:
        """Refuse (MoveRefused) when *src* and *dst* reach one database.

        The identities are read on live connections of the engines the move uses, so
        this holds whatever the catalog says (two shard names for one database, its
        URL spelled two ways): a move between them would delete the tenant's rows.
        """
        left, right = identify(src), identify(dst)
        if left.same_as(right):
            raise MoveRefused(
                f"source and target are the same database (shard {source.name!r} and "
                f"shard {target.name!r}: {left.describe()}): a move would delete the "
                f"tenant's rows; remove the duplicate shard with `tenantry shard remove "
                f"{target.name}`"
            )

    # -- running ------------------------------------------------------------------------

    def run(self, move_id: int) -> Move:
        """Drive the move from its recorded state to the end (this is also resume)."""
        with self._claim(move_id):
            move = self.journal.get(move_id)
            if not move.live:
                return move
            with self._no_migration(move):
                return self._run(move)

    def _run(self, move: Move) -> Move:
        if move.state is MoveState.ABORTED:
            return self.rollback(move)
        try:
            return self._forward(move)
        except (VerificationFailed, FreezeBudgetExceeded) as exc:
            self.journal.update(move.id, state=MoveState.ABORTED, error=str(exc))
            self.rollback(self.journal.get(move.id))
            raise
        except Exception as exc:
            raise self._stopped(move.id, exc) from exc

    def _stopped(self, move_id: int, exc: Exception) -> Exception:
        """Leave a failed move in a clean, explained state; the error to raise.

        The reason goes into the journal. A move that has not switched is rolled back
        (the tenant stays home and writable; nothing of it stays at the target); one
        that has switched stays live where it stopped, to be resumed.
        """
        reason = describe(exc)
        try:
            move = self.journal.get(move_id)
        except TenantryError:
            return _one_line(exc, reason)  # the catalog is out of reach: nothing to record
        if not move.live:
            return _one_line(exc, reason)  # ended already (a step rolled itself back)
        if move.state is MoveState.ABORTED or move.state.order >= MoveState.SWITCHED.order:
            self.journal.update(move.id, error=reason)
            logger.error("move %s stopped in %s: %s", move.id, move.state.value, reason)
            if isinstance(exc, TenantryError):
                return exc
            return MoveError(
                f"move {move.id} stopped ({move.state.value}): {reason}; run `tenantry moves "
                f"resume {move.id}` once that is fixed",
                tenant_id=move.tenant_id,
                move_id=move.id,
            )
        if isinstance(exc, ReplicationFailed) and not exc.reachable:
            return exc  # left live on purpose, saying what to run: an end is out of reach
        unfinished = self.roll_back_failed(move, reason)
        if unfinished is not None:
            return MoveError(
                f"move {move.id} failed: {reason}; the roll back did not finish: "
                f"{unfinished}; run `tenantry moves abort {move.id}` once that is fixed",
                tenant_id=move.tenant_id,
                move_id=move.id,
            )
        return MoveRolledBack(
            f"move {move.id} failed and was rolled back (tenant {move.tenant_id!r} stays on "
            f"{move.source!r}, writable): {reason}",
            tenant_id=move.tenant_id,
            move_id=move.id,
        )

    def roll_back_failed(self, move: Move, reason: str) -> str | None:
        """A step of *move* failed before the switch: record *reason*, then roll the
        move back. None when the roll back finished; else what stopped it (recorded in
        the journal too, and the move stays aborted and live for `moves abort`)."""
        self.journal.update(move.id, state=MoveState.ABORTED, error=reason)
        logger.error("move %s failed in %s, rolling back: %s", move.id, move.state.value, reason)
        self.observer.note(f"failed: {reason}; rolling back")
        try:
            self.rollback(self.journal.get(move.id))
        except Exception as again:
            unfinished = describe(again)
            with suppress(TenantryError):
                self.journal.update(
                    move.id, error=f"{reason}; the roll back did not finish: {unfinished}"
                )
            return unfinished
        return None

    def _steps(self, move: Move) -> list[tuple[MoveState, Callable[[Move], None]]]:
        if move.mode is MoveMode.ONLINE:
            return [
                (MoveState.COPIED, self.online.prepare),
                (MoveState.FROZEN, self.online.cutover),
                (MoveState.VERIFIED, self._verify),
                (MoveState.SWITCHED, self._switch),
                (MoveState.CLEANED, self._clean),
            ]
        return [
            (MoveState.FROZEN, self._freeze),
            (MoveState.COPIED, self._copy),
            (MoveState.VERIFIED, self._verify),
            (MoveState.SWITCHED, self._switch),
            (MoveState.CLEANED, self._clean),
        ]

    def _forward(self, move: Move) -> Move:
        if move.state is MoveState.PLANNED:
            self._check_planned(move)
        steps = self._steps(move)
        order = [MoveState.PLANNED, *(state for state, _ in steps)]
        for state, action in steps:
            if order.index(move.state) > order.index(state):
                continue
            if move.state is not state and state is not MoveState.SWITCHED:
                # Journal first: the state is committed before its step acts.
                self.journal.update(move.id, state=state, error=None)
            self.observer.step(move.id, state.value)
            self.hooks.checkpoint(state.value)
            action(self.journal.get(move.id))
            move = self.journal.get(move.id)
        self.journal.update(move.id, ended=True, stats={"finished_at": time.time()})
        self._follow_size(self.journal.get(move.id))
        self.observer.step(move.id, "done")
        return self.journal.get(move.id)

    def _follow_size(self, move: Move) -> None:
        """The tenant's stored size follows it to its new shard, with the rows copied
        (or verified). Bookkeeping only: a failure here is logged, not raised."""
        from tenantry.moves.sizes import follow_move

        rows = move.stats.get("rows")
        verified = move.stats.get("verified")
        if rows is None and isinstance(verified, dict):
            rows = sum(int(t.get("rows", 0)) for t in verified.values())
        try:
            follow_move(self.catalog, move.tenant_id, move.target, rows)
        except (TenantryError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("move %s: stored size not updated: %s", move.id, describe(exc))

    def _check_planned(self, move: Move) -> None:
        """Before anything is frozen or copied, on the live connections: source and
        target are two databases (even when the plan skipped its checks). A refusal
        ends the move, rolled back (nothing was done)."""
        source = self.catalog.get_shard(move.source)
        target = self.catalog.get_shard(move.target)
        try:
            with self.admin(source) as src, self.admin(target) as dst:
                self.check_distinct(source, target, src, dst)
                # What the tables look like now, to find DDL run by hand during the move.
                with src.connect() as s, dst.connect() as d:
                    shapes = {"source": self._shape(s), "target": self._shape(d)}
                self.journal.update(move.id, stats={"table_shapes": shapes})
        except MoveRefused as exc:
            self.journal.update(move.id, state=MoveState.ABORTED, error=str(exc))
            self.rollback(self.journal.get(move.id))
            raise

    # freeze ------------------------------------------------------------------------------

    def _freeze(self, move: Move) -> None:
        """Freeze the tenant and wait out older transactions. If they outlast the
        freeze timeout the tenant is unfrozen at once and the move ends, rolled back
        (nothing was copied), naming them: retrying would only refuse more of the
        tenant's writes while the same transactions run on."""
        source = self.catalog.get_shard(move.source)
        with self.admin(source) as engine, engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            commit_residency(conn, move.tenant_id, Residency.FROZEN, self.catalog.map_version())
            frozen_at = time.time()
            if "frozen_at" not in move.stats:
                self.journal.update(move.id, stats={"frozen_at": frozen_at})
            if conn.dialect.name != "postgresql":
                return  # SQLite: our write lock already outlasted every writer
            try:
                self.wait_out(conn, timeout=self.settings.freeze_timeout)
                return
            except FreezeTimeout as exc:
                commit_residency(conn, move.tenant_id, Residency.ACTIVE, self.catalog.map_version())
                timeout = exc
        message = f"{timeout}; the tenant was unfrozen and the move ended (nothing was copied)"
        self.observer.note(message)
        self.journal.update(move.id, state=MoveState.ABORTED, error=message)
        self.rollback(self.journal.get(move.id))
        raise FreezeTimeout(message, tenant_id=move.tenant_id, move_id=move.id)

    def wait_out(self, conn: Connection, *, timeout: float) -> None:
        """Wait until every transaction that began before the freeze has ended.

        The caller has just committed the freeze on *conn*: a transaction that began
        later reads ``frozen`` in its fence and is read-only; one that began earlier may
        still write, and is waited out (the way CREATE INDEX CONCURRENTLY waits). The
        read-only snapshots of online moves' cuts are not waited for.

        Prepared transactions (two-phase commit) of the database are waited for too,
        whenever they were prepared: one may hold a write that ``COMMIT PREPARED`` would
        commit behind the copy. A routed transaction cannot be prepared (the fence's
        stamp is a temporary object), so these come from elsewhere; the timeout names
        them.
        """
        if conn.dialect.name != "postgresql":
            return  # SQLite: the freeze's write lock outlasted every earlier writer
        with conn.begin():
            since = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
        deadline = time.monotonic() + timeout
        noted = False
        while True:
            with conn.begin():
                older = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND backend_type = 'client backend' AND xact_start < :since"
                        " AND application_name <> :snapshots"
                    ),
                    {"since": since, "snapshots": SNAPSHOT_APPLICATION},
                ).scalar_one()
                prepared = [
                    str(gid)
                    for (gid,) in conn.execute(
                        sa.text(
                            "SELECT gid FROM pg_prepared_xacts"
                            " WHERE database = current_database() ORDER BY prepared"
                        )
                    )
                ]
            if older == 0 and not prepared:
                return
            if time.monotonic() > deadline:
                if prepared:
                    raise FreezeTimeout(
                        f"{len(prepared)} prepared transaction(s) on the source database "
                        f"({', '.join(map(repr, prepared[:5]))}) may write the tenant's rows "
                        "after the copy: COMMIT PREPARED or ROLLBACK PREPARED them, then retry"
                    )
                with conn.begin():
                    blockers = _describe_blockers(conn, since)
                raise FreezeTimeout(
                    f"{older} transaction(s) older than the freeze still running after "
                    f"{timeout:g}s on the source database ({blockers}): end them "
                    "(pg_terminate_backend) or wait until they have finished, then try again"
                )
            if not noted:
                waiting = f"waiting for {older} older transaction(s) to end"
                if prepared:
                    waiting += f", and {len(prepared)} prepared one(s) to be resolved"
                self.observer.note(waiting)
                noted = True
            time.sleep(0.01)

    # copy ------------------------------------------------------------------------------

    def _copy(self, move: Move) -> None:
        source = self.catalog.get_shard(move.source)
        target = self.catalog.get_shard(move.target)
        started = time.monotonic()
        with self.admin(source) as src_engine, self.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                if src.dialect.name == "postgresql":
                    src = src.execution_options(isolation_level="REPEATABLE READ")
                dst = dst.execution_options(**WRITE)
                with src.begin():
                    if src.dialect.name == "postgresql":
                        src.exec_driver_sql("SET TRANSACTION READ ONLY")
                    tables = tenant_tables(src, column=self.column, schemas=self.schemas)
                    with dst.begin():
                        if dst.dialect.name == "postgresql" and replica_allowed(dst):
                            quiet_triggers(dst)
                        write_residency(
                            dst, move.tenant_id, Residency.INCOMING, self.catalog.map_version()
                        )
                        copies = copy_tenant(
                            src,
                            dst,
                            move.tenant_id,
                            tables,
                            column=self.column,
                            progress=lambda t, r, b: self.observer.table(t, r, b, None),
                            checkpoint=self.hooks.checkpoint,
                        )
        seconds = time.monotonic() - started
        self.journal.update(
            move.id,
            stats={
                "tables": {c.table: {"rows": c.rows, "bytes": c.bytes} for c in copies},
                "rows": sum(c.rows for c in copies),
                "bytes": sum(c.bytes for c in copies),
                "copy_seconds": round(seconds, 3),
            },
        )

    # verify ----------------------------------------------------------------------------

    def _verify(self, move: Move) -> None:
        if self.online.verified_in_freeze(move.id):
            return  # verified in full at the cut, the rows changed since in the freeze
        source = self.catalog.get_shard(move.source)
        target = self.catalog.get_shard(move.target)
        both_pg = source.backend == target.backend == "postgresql"
        method: Literal["sql", "python"] = "sql" if both_pg else "python"
        with self.admin(source) as src_engine, self.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                with src.begin(), dst.begin():
                    tables = tenant_tables(src, column=self.column, schemas=self.schemas)

                    def digest(conn: Connection) -> dict[str, TableDigest]:
                        return digest_tenant(
                            conn, move.tenant_id, tables, column=self.column, method=method
                        )

                    # Both ends at once: half the time the tenant stays frozen.
                    with ThreadPoolExecutor(max_workers=2) as pool:
                        left_future = pool.submit(digest, src)
                        right = digest(dst)
                        left = left_future.result()
                    # Copies and cleanups fire no foreign-key triggers: the shared rows
                    # the tenant's reference must be at the target, checked here.
                    missing = missing_references(src, dst, move.tenant_id, tables, self.column)
        differ = compare_digests(left, right)
        self.journal.update(
            move.id,
            stats={
                "verified": {n: {"rows": d.rows, "checksum": d.checksum} for n, d in left.items()}
            },
        )
        if differ:
            message = (
                f"verification failed: tables differ between source and target: {', '.join(differ)}"
            )
            self.journal.update(move.id, state=MoveState.ABORTED, error=message)
            raise VerificationFailed(message, tables=differ)
        if missing:
            message = f"verification failed: {missing[0]}"
            self.journal.update(move.id, state=MoveState.ABORTED, error=message)
            raise VerificationFailed(message, tables=[])

    # switch ------------------------------------------------------------------------------

    def _switch(self, move: Move) -> None:
        source = self.catalog.get_shard(move.source)
        target = self.catalog.get_shard(move.target)
        # The tenant is frozen: one connection to each end, opened once.
        with self.admin(source) as src_engine, self.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src, dst = src.execution_options(**WRITE), dst.execution_options(**WRITE)
                version = self.catalog.map_version()
                if move.state is not MoveState.SWITCHED:
                    self._same_shapes(move, {"source": src, "target": dst})
                    if move.mode is MoveMode.ONLINE:
                        self.online.advance_sequences(move, src, dst)
                    # The target is not routed to until the catalog says so; make it
                    # resident first. And the source stops serving before the catalog
                    # switches: were it still "frozen" after the switch (a crash right
                    # after the commit), routers with the old map would go on reading
                    # the copy left behind there. Until the commit they get StaleRoute
                    # (retryable); a rollback makes it active again.
                    commit_residency(dst, move.tenant_id, Residency.ACTIVE, version)
                    commit_residency(src, move.tenant_id, Residency.MOVED, version)
                    with self.catalog.transaction() as (conn, _version):
                        self.catalog.set_placement(
                            move.tenant_id, target.name, conn=conn, check=False
                        )
                        self.catalog.set_tenant_state(conn, move.tenant_id, TenantState.ACTIVE)
                        self.journal.update(move.id, conn=conn, state=MoveState.SWITCHED)
                    self.hooks.checkpoint("switched-committed")
                else:
                    # Resumed after the switch committed: make sure both ends say so.
                    # Routers with the old map find the tenant gone from the source,
                    # refresh their map and retry on the target.
                    commit_residency(dst, move.tenant_id, Residency.ACTIVE, version)
                    commit_residency(src, move.tenant_id, Residency.MOVED, version)
        frozen_at = move.stats.get("frozen_at")
        if frozen_at is not None and "freeze_seconds" not in move.stats:
            self.journal.update(
                move.id, stats={"freeze_seconds": round(time.time() - float(frozen_at), 3)}
            )

    def _shape(self, conn: Connection) -> dict[str, list[str]]:
        """Each tenant table's columns and types, and its primary key, as reflected."""
        return {
            table.qualified_name: [
                *(f"{c} {t}" for c, t in zip(table.columns, table.column_types, strict=False)),
                f"PRIMARY KEY ({', '.join(table.primary_key)})",
            ]
            for table in tenant_tables(conn, column=self.column, schemas=self.schemas)
        }

    def _same_shapes(self, move: Move, ends: dict[str, Connection]) -> None:
        """Refuse to switch when a tenant table changed on either end since the move
        began: DDL run by hand (fleet migrations are locked out) may have changed what
        was copied or compared. The caller's error handling rolls the move back."""
        recorded = move.stats.get("table_shapes") or {}
        for end, conn in ends.items():
            before = recorded.get(end)
            if before is None:
                continue  # a move recorded before shapes were kept
            with conn.begin():
                now = self._shape(conn)
            if now == before:
                continue
            changed = sorted(
                name for name in set(now) | set(before) if now.get(name) != before.get(name)
            )
            shard = move.source if end == "source" else move.target
            raise SchemaContractError(
                changed[0],
                f"it changed on shard {shard!r} while the move ran (DDL outside `tenantry "
                "migrate`), so the copy may not match it: the move is not switched; move "
                "the tenant again",
            )

    # clean -------------------------------------------------------------------------------

    def _clean(self, move: Move) -> None:
        if move.mode is MoveMode.ONLINE and not move.artifacts.get("replication_dropped"):
            # Before the source is cleaned, or its deletes would replicate to the target.
            self.online.teardown(move)
        if move.mode is MoveMode.OFFLINE and not move.stats.get("analyzed"):
            # Outside the freeze: the new home's statistics, for the application's plans.
            target = self.catalog.get_shard(move.target)
            with self.admin(target) as engine, engine.begin() as conn:
                analyze_tables(conn, tenant_tables(conn, column=self.column, schemas=self.schemas))
            self.journal.update(move.id, stats={"analyzed": True})
        try:
            source = self.catalog.get_shard(move.source)
        except UnknownShard:
            return  # dropped already by a previous run of this step
        if move.artifacts.get("dropped_source"):
            self._drop_source(move, source)
            return
        with self.admin(source) as engine:
            self._not_the_target(move, source, engine)
            with engine.connect() as conn:
                tables = tenant_tables(conn, column=self.column, schemas=self.schemas)
                for slow in unindexed_foreign_keys(conn, tables):
                    logger.warning("%s", slow)
                    self.observer.note(slow)
                quiet = conn.dialect.name == "postgresql" and replica_allowed(conn)
            deleted = delete_tenant_rows(
                engine,
                move.tenant_id,
                tables,
                column=self.column,
                quiet=quiet,
                progress=lambda t, n: self.observer.table(t, n, 0, None),
                checkpoint=self.hooks.checkpoint,
            )
        self.journal.update(move.id, stats={"cleaned_rows": deleted})
        if source.tier is Tier.DEDICATED and move.kind is MoveKind.DEMOTE:
            if move.options.get("drop_source"):
                # Recorded before the database goes, so a crash here finishes the drop.
                self.journal.update(move.id, artifacts={"dropped_source": source.operations_url})
                self._drop_source(move, source)
            else:
                with suppress(TenantryError):
                    self.catalog.set_shard_state(source.name, ShardState.RETIRED, for_move=move.id)

    def _not_the_target(self, move: Move, source: Shard, engine: Engine) -> None:
        """Cleanup's last check, on its own live connection: the database it is about
        to delete the tenant's rows from is not the move's target (the new home)."""
        try:
            target = self.catalog.get_shard(move.target)
        except UnknownShard:
            target = None
        if target is None:
            return
        with self.admin(target) as dst:
            there = identify(dst)
        here = identify(engine)
        if here.same_as(there):
            message = (
                f"refusing to delete tenant {move.tenant_id!r}'s rows from shard "
                f"{source.name!r}: it is the same database as the move's target "
                f"{target.name!r} ({here.describe()}), the tenant's home; nothing was "
                "deleted"
            )
            logger.error("move %s: %s", move.id, message)
            raise MoveError(message, tenant_id=move.tenant_id, move_id=move.id)

    def _drop_source(self, move: Move, source: Shard) -> None:
        from tenantry.migrations.provision import database_exists, drop_database

        url = make_url(source.operations_url)
        if source.backend == "postgresql" and database_exists(
            url.set(database="postgres").render_as_string(hide_password=False),
            url.database or "",
            connect_timeout=self.settings.connect_timeout,
        ):
            # Checked on the live database just before it goes (not on a resume after
            # it went).
            self.check_droppable(move.tenant_id, source, move_id=move.id)
        drop_database(source.operations_url, connect_timeout=self.settings.connect_timeout)
        with suppress(UnknownShard):
            self.catalog.remove_shard(source.name, for_move=move.id)
        self.observer.note(f"dropped database of shard {source.name!r}")

    # abort -------------------------------------------------------------------------------

    def abort(self, move_id: int) -> Move:
        """Roll back a move that has not switched: target copy deleted, source unfrozen."""
        with self._claim(move_id):
            move = self.journal.get(move_id)
            if not move.live:
                raise MoveError(
                    f"move {move_id} has ended ({move.state.value}); nothing to abort",
                    move_id=move_id,
                )
            if move.state.order >= MoveState.SWITCHED.order and move.state is not MoveState.ABORTED:
                raise MoveError(
                    f"move {move_id} has switched the tenant to {move.target!r} already; it "
                    f"can only be completed: run `tenantry moves resume {move_id}`",
                    move_id=move_id,
                )
            return self.rollback(move)

    def rollback(self, move: Move) -> Move:
        """Roll *move* back: mark it aborted, tear down its replication, delete the
        tenant's rows at the target (and drop a database the move created), and make the
        tenant active at its source again; return the move."""
        if move.state is not MoveState.ABORTED:
            self.journal.update(move.id, state=MoveState.ABORTED)
        self.observer.step(move.id, "aborted")
        if move.artifacts.get("publication") and not move.artifacts.get("replication_dropped"):
            self.online.teardown(move)
        provisioned = move.artifacts.get("provisioned")
        try:
            target: Shard | None = self.catalog.get_shard(move.target)
        except UnknownShard:
            target = None
        source = self.catalog.get_shard(move.source)
        same = target is not None and self._same_database(source, target)
        if same:
            # The "target" is the source database under another name: its rows and
            # residency row are the tenant's own. Nothing to take back there.
            self.observer.note(f"shard {move.target!r} is the source's database: it was kept")
        if target is not None and not same:
            with self.admin(target) as engine:
                with engine.connect() as conn:
                    tables = tenant_tables(conn, column=self.column, schemas=self.schemas)
                    quiet = conn.dialect.name == "postgresql" and replica_allowed(conn)
                delete_tenant_rows(engine, move.tenant_id, tables, column=self.column, quiet=quiet)
                with engine.connect() as conn:
                    conn = conn.execution_options(**WRITE)
                    with conn.begin():
                        if read_residency(conn, move.tenant_id) is not Residency.MOVED:
                            clear_residency(conn, move.tenant_id)
        self._residency(source, move.tenant_id, Residency.ACTIVE)
        with self.catalog.transaction() as (conn, _version):
            self.catalog.set_tenant_state(conn, move.tenant_id, TenantState.ACTIVE)
        if provisioned and not same:
            if self._created_by_move(provisioned):
                from tenantry.migrations.provision import drop_database

                if target is not None:
                    with suppress(TenantryError):
                        self.catalog.remove_shard(target.name, for_move=move.id)
                drop_database(
                    str(provisioned["url"]), connect_timeout=self.settings.connect_timeout
                )
            else:
                self.observer.note(
                    f"database {mask_url(str(provisioned['url']))} was left alone: this move "
                    "did not record creating it (if it did, before a crash, drop it by hand)"
                )
        self.journal.update(move.id, ended=True)
        return self.journal.get(move.id)

    def database_id(self, shard: Shard) -> str | None:
        """The identity of *shard*'s database (None: it has none)."""
        with self.admin(shard) as engine, engine.connect() as conn:
            identity = read_identity(conn)
        return identity.database_id if identity is not None else None

    def _created_by_move(self, provisioned: dict[str, Any]) -> bool:
        """Whether the database a promote recorded is provably the one it created: its
        identity, recorded once it was created, is the live database's."""
        recorded: str | None = provisioned.get("database_id")
        if not recorded:
            return False
        probe = Shard(name=str(provisioned.get("shard", "?")), url=str(provisioned["url"]))
        try:
            return self.database_id(probe) == recorded
        except TenantryError:
            return False  # gone, or unreachable: nothing we may drop

    def _same_database(self, source: Shard, target: Shard) -> bool:
        with self.admin(source) as src, self.admin(target) as dst:
            return identify(src).same_as(identify(dst))

    # plumbing ----------------------------------------------------------------------------

    def _residency(self, shard: Shard, tenant_id: str, state: Residency) -> None:
        with self.admin(shard) as engine:
            commit_residency(engine, tenant_id, state, self.catalog.map_version())

    @contextmanager
    def admin(self, shard: Shard) -> Iterator[Engine]:
        """A short-lived engine on the shard's operations role; errors name the shard
        (those raised on another database's connection pass on to its own block)."""
        with operator_engine(
            shard, connect_timeout=self.settings.connect_timeout, failed=MoveError, own_only=True
        ) as engine:
            yield engine

    @contextmanager
    def _no_migration(self, move: Move) -> Iterator[None]:
        """Hold the migration lock of both shards, shared, while the move runs.

        DDL under a move breaks the copy's schema check and logical replication; fleet
        migrations take the same per-database lock exclusively, so each waits for (or,
        with --no-wait, refuses) the other. A crashed move's journal entry keeps
        migrations off its shards too (see ``tenantry.migrations.fleet``).
        """
        held: list[Connection] = []
        with ExitStack() as stack:  # the engines, disposed after their connections close
            try:
                for name in dict.fromkeys((move.source, move.target)):
                    try:
                        shard = self.catalog.get_shard(name)
                    except UnknownShard:
                        continue
                    if shard.backend != "postgresql":
                        continue
                    engine = stack.enter_context(
                        operations_engine(
                            shard,
                            connect_timeout=self.settings.connect_timeout,
                            isolation_level="AUTOCOMMIT",
                        )
                    )
                    with shard_errors(shard, failed=MoveError):
                        conn = engine.connect()
                        held.append(conn)
                        got = conn.execute(
                            sa.text("SELECT pg_try_advisory_lock_shared(:k)"), {"k": MIGRATION_LOCK}
                        ).scalar()
                    if not got:
                        raise MoveError(
                            f"shard {shard.name!r} is being migrated (`tenantry migrate` holds its "
                            f"lock): run `tenantry moves resume {move.id}` when it has finished",
                            move_id=move.id,
                        )
                yield
            finally:
                for conn in held:
                    with suppress(sa.exc.SQLAlchemyError):
                        conn.close()

    @contextmanager
    def _claim(self, move_id: int) -> Iterator[None]:
        """Only one process runs a given move; a killed owner's claim dies with it."""
        if self.catalog.dialect == "postgresql":
            with self.catalog.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                # A killed owner's session ends when the server notices its socket
                # closed: moments later, not at once. Give it that long.
                deadline = time.monotonic() + _CLAIM_PATIENCE
                while (
                    not (
                        got := conn.execute(
                            sa.text("SELECT pg_try_advisory_lock(:k)"),
                            {"k": _MOVE_LOCK_BASE + move_id},
                        ).scalar()
                    )
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                if not got:
                    raise MoveError(
                        f"move {move_id} is being run by another process", move_id=move_id
                    )
                try:
                    yield
                finally:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MOVE_LOCK_BASE + move_id}
                    )
            return
        path = Path(make_url(self.catalog.url).database or "catalog")
        lock_path = path.with_name(f"{path.name}.move-{move_id}.lock")
        with open(lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MoveError(
                    f"move {move_id} is being run by another process", move_id=move_id
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def identify(engine: Engine) -> LiveDatabase:
    """Which database *engine* (an operations role's) reaches, read on a live
    connection; its identity row is made or repaired first when needed."""
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            return live_database(conn)


def _describe_blockers(conn: Connection, since: Any) -> str:
    """The transactions a freeze waits for: pid, user, application, age and state —
    never their query text, which may hold the application's data."""
    rows = conn.execute(
        sa.text(
            "SELECT pid, usename, application_name,"
            " extract(epoch FROM clock_timestamp() - xact_start)::float8, state"
            " FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend' AND xact_start < :since"
            " AND application_name <> :snapshots"
            " ORDER BY xact_start LIMIT 5"
        ),
        {"since": since, "snapshots": SNAPSHOT_APPLICATION},
    ).all()
    return (
        ", ".join(
            f"pid {pid} (user {user!r}, application {app or ''!r}, running {age:.1f}s, {state})"
            for pid, user, app, age, state in rows
        )
        or "ended meanwhile"
    )


def _app_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) or None


def _one_line(exc: Exception, reason: str) -> Exception:
    return exc if isinstance(exc, TenantryError) else MoveError(reason)


def describe(exc: BaseException) -> str:
    """One line about an error, for the journal."""
    return str(exc) if isinstance(exc, TenantryError) else describe_error(exc)
