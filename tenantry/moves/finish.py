"""The steps both modes share after the copy: verify, switch, clean.

``verified``: counts and checksums of every tenant table compared on both ends (an
online move that compared the rows changed since a verified cut inside its freeze
skips it). ``switched``: the tables' shapes compared with those recorded when the move
was planned, then the target made resident, the source marked moved and the catalog
switched, in that order. ``cleaned``: the replication torn down (online), the target
analysed (offline), the tenant's rows deleted at the source, and a demoted tenant's
dedicated database retired or dropped.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Literal

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url

from tenantry.errors import (
    MoveError,
    SchemaContractError,
    TenantryError,
    UnknownShard,
    VerificationFailed,
)
from tenantry.moves.context import MoveContext, identify
from tenantry.moves.copy import delete_tenant_rows, replica_allowed
from tenantry.moves.journal import Move, MoveKind, MoveMode, MoveState
from tenantry.moves.online import advance_sequences
from tenantry.moves.planning import check_droppable
from tenantry.moves.references import missing_references
from tenantry.moves.rollback import teardown
from tenantry.moves.tables import analyze_tables, table_shapes, unindexed_foreign_keys
from tenantry.moves.verify import TableDigest, compare_digests, digest_tenant
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.model import Shard, ShardState, TenantState, Tier
from tenantry.shardmap.residency import Residency, commit_residency

__all__ = ["FinishSteps"]

logger = logging.getLogger("tenantry.moves")


class FinishSteps:
    """The ``verified``, ``switched`` and ``cleaned`` steps of either mode."""

    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    # verify ----------------------------------------------------------------------------

    def verify(self, move: Move) -> None:
        """Compare the tenant's rows on both ends, table by table; and the shared rows
        they reference must be at the target (copies fire no foreign-key triggers)."""
        ctx = self.ctx
        if ctx.carried(move.id).verified_in_freeze:
            return  # verified in full at the cut, the rows changed since in the freeze
        source, target = ctx.shards(move)
        both_pg = source.backend == target.backend == "postgresql"
        method: Literal["sql", "python"] = "sql" if both_pg else "python"
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                with src.begin(), dst.begin():
                    tables = ctx.tables(move.id, "source", src)

                    def digest(conn: Connection) -> dict[str, TableDigest]:
                        return digest_tenant(
                            conn, move.tenant_id, tables, column=ctx.column, method=method
                        )

                    # Both ends at once: half the time the tenant stays frozen.
                    with ThreadPoolExecutor(max_workers=2) as pool:
                        left_future = pool.submit(digest, src)
                        right = digest(dst)
                        left = left_future.result()
                    missing = missing_references(src, dst, move.tenant_id, tables, ctx.column)
        differ = compare_digests(left, right)
        ctx.journal.update(
            move.id,
            stats={
                "verified": {n: {"rows": d.rows, "checksum": d.checksum} for n, d in left.items()}
            },
        )
        if differ or missing:
            why = f"tables differ between source and target: {', '.join(differ)}"
            message = f"verification failed: {why if differ else missing[0]}"
            ctx.journal.update(move.id, state=MoveState.ABORTED, error=message)
            raise VerificationFailed(message, tables=differ)

    # switch ------------------------------------------------------------------------------

    def switch(self, move: Move) -> None:
        """Make the target resident and the source moved, then switch the catalog (a
        resumed switch makes sure both ends say so)."""
        ctx = self.ctx
        source, target = ctx.shards(move)
        # The tenant is frozen: one connection to each end, opened once.
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src, dst = src.execution_options(**WRITE), dst.execution_options(**WRITE)
                version = ctx.catalog.map_version()
                if move.state is MoveState.SWITCHED:
                    # Resumed after the switch committed. Routers with the old map find
                    # the tenant gone from the source, refresh their map and retry.
                    commit_residency(dst, move.tenant_id, Residency.ACTIVE, version)
                    commit_residency(src, move.tenant_id, Residency.MOVED, version)
                else:
                    self._switch(move, target, src, dst, version)
        frozen_at = move.stats.get("frozen_at")
        if frozen_at is not None and "freeze_seconds" not in move.stats:
            ctx.journal.update(
                move.id, stats={"freeze_seconds": round(time.time() - float(frozen_at), 3)}
            )

    def _switch(
        self, move: Move, target: Shard, src: Connection, dst: Connection, version: int
    ) -> None:
        ctx = self.ctx
        self._same_shapes(move, {"source": src, "target": dst})
        if move.mode is MoveMode.ONLINE:
            with src.begin():
                tables = ctx.tables(move.id, "source", src)
            advance_sequences(dst, tables)
        # The target is not routed to until the catalog says so; make it resident
        # first. And the source stops serving before the catalog switches: were it
        # still "frozen" after the switch (a crash right after the commit), routers
        # with the old map would go on reading the copy left behind there. Until the
        # commit they get StaleRoute (retryable); a rollback makes it active again.
        commit_residency(dst, move.tenant_id, Residency.ACTIVE, version)
        commit_residency(src, move.tenant_id, Residency.MOVED, version)
        with ctx.catalog.transaction() as (conn, _version):
            ctx.catalog.set_placement(move.tenant_id, target.name, conn=conn, check=False)
            ctx.catalog.set_tenant_state(conn, move.tenant_id, TenantState.ACTIVE)
            ctx.journal.update(move.id, conn=conn, state=MoveState.SWITCHED)
        ctx.hooks.checkpoint("switched-committed")

    def _same_shapes(self, move: Move, ends: dict[str, Connection]) -> None:
        """Refuse to switch when a tenant table changed on either end since the move
        was planned: DDL run by hand (fleet migrations are locked out) may have changed
        what was copied or compared. The caller's error handling rolls the move back."""
        recorded = move.stats.get("table_shapes") or {}
        for end, conn in ends.items():
            before = recorded.get(end)
            if before is None:
                continue  # a move recorded before shapes were kept
            with conn.begin():
                now = table_shapes(self.ctx.reflect(conn))
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

    def clean(self, move: Move) -> None:
        """Tear down replication, analyse the new home, delete the tenant's rows at the
        source; a demoted tenant's dedicated database is then retired or dropped."""
        ctx = self.ctx
        if move.mode is MoveMode.ONLINE and not move.artifacts.get("replication_dropped"):
            # Before the source is cleaned, or its deletes would replicate to the target.
            teardown(ctx, move)
        if move.mode is MoveMode.OFFLINE and not move.stats.get("analyzed"):
            # Outside the freeze: the new home's statistics, for the application's plans.
            target = ctx.catalog.get_shard(move.target)
            with ctx.admin(target) as engine, engine.begin() as conn:
                analyze_tables(conn, ctx.tables(move.id, "target", conn))
            ctx.journal.update(move.id, stats={"analyzed": True})
        try:
            source = ctx.catalog.get_shard(move.source)
        except UnknownShard:
            return  # dropped already by a previous run of this step
        if move.artifacts.get("dropped_source"):
            self._drop_source(move, source)
            return
        with ctx.admin(source) as engine:
            self._not_the_target(move, source, engine)
            deleted = self._delete_at_source(move, engine)
        ctx.journal.update(move.id, stats={"cleaned_rows": deleted})
        if source.tier is Tier.DEDICATED and move.kind is MoveKind.DEMOTE:
            if move.options.get("drop_source"):
                # Recorded before the database goes, so a crash here finishes the drop.
                ctx.journal.update(move.id, artifacts={"dropped_source": source.operations_url})
                self._drop_source(move, source)
            else:
                with suppress(TenantryError):
                    ctx.catalog.set_shard_state(source.name, ShardState.RETIRED, for_move=move.id)

    def _delete_at_source(self, move: Move, engine: Engine) -> int:
        ctx = self.ctx
        with engine.connect() as conn:
            tables = ctx.tables(move.id, "source", conn)
            for slow in unindexed_foreign_keys(conn, tables):
                logger.warning("%s", slow)
                ctx.observer.note(slow)
            quiet = conn.dialect.name == "postgresql" and replica_allowed(conn)
        return delete_tenant_rows(
            engine,
            move.tenant_id,
            tables,
            column=ctx.column,
            quiet=quiet,
            progress=lambda t, n: ctx.observer.table(t, n, 0, None),
            checkpoint=ctx.hooks.checkpoint,
        )

    def _not_the_target(self, move: Move, source: Shard, engine: Engine) -> None:
        """Cleanup's last check, on its own live connection: the database it is about
        to delete the tenant's rows from is not the move's target (the new home)."""
        try:
            target = self.ctx.catalog.get_shard(move.target)
        except UnknownShard:
            return
        with self.ctx.admin(target) as dst:
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

        ctx = self.ctx
        url = make_url(source.operations_url)
        if source.backend == "postgresql" and database_exists(
            url.set(database="postgres").render_as_string(hide_password=False),
            url.database or "",
            connect_timeout=ctx.settings.connect_timeout,
        ):
            # Checked on the live database just before it goes (not on a resume after
            # it went).
            check_droppable(ctx, move.tenant_id, source, move_id=move.id)
        drop_database(source.operations_url, connect_timeout=ctx.settings.connect_timeout)
        with suppress(UnknownShard):
            ctx.catalog.remove_shard(source.name, for_move=move.id)
        ctx.observer.note(f"dropped database of shard {source.name!r}")
