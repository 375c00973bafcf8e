"""The offline steps of a move: freeze the tenant, then copy its rows in one snapshot.

Order of an offline move: ``planned → frozen → copied → verified → switched →
cleaned``. The tenant is read-only from ``frozen`` until the switch; the steps after
the copy are the ones both modes share (:mod:`tenantry.moves.finish`).
"""

from __future__ import annotations

import time

from tenantry.errors import FreezeTimeout
from tenantry.moves.context import MoveContext
from tenantry.moves.copy import copy_tenant, quiet_triggers, replica_allowed
from tenantry.moves.journal import Move, MoveState
from tenantry.moves.rollback import rollback
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.residency import Residency, commit_residency, write_residency

__all__ = ["OfflineSteps"]


class OfflineSteps:
    """The steps an offline move does differently: ``frozen`` and ``copied``."""

    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    def freeze(self, move: Move) -> None:
        """Freeze the tenant and wait out older transactions. If they outlast the
        freeze timeout the tenant is unfrozen at once and the move ends, rolled back
        (nothing was copied), naming them: retrying would only refuse more of the
        tenant's writes while the same transactions run on."""
        ctx = self.ctx
        source = ctx.catalog.get_shard(move.source)
        with ctx.admin(source) as engine, engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            commit_residency(conn, move.tenant_id, Residency.FROZEN, ctx.catalog.map_version())
            frozen_at = time.time()
            if "frozen_at" not in move.stats:
                ctx.journal.update(move.id, stats={"frozen_at": frozen_at})
            if conn.dialect.name != "postgresql":
                return  # SQLite: our write lock already outlasted every writer
            try:
                ctx.wait_out(conn, timeout=ctx.settings.freeze_timeout)
                return
            except FreezeTimeout as exc:
                commit_residency(conn, move.tenant_id, Residency.ACTIVE, ctx.catalog.map_version())
                timeout = exc
        message = f"{timeout}; the tenant was unfrozen and the move ended (nothing was copied)"
        ctx.observer.note(message)
        ctx.journal.update(move.id, state=MoveState.ABORTED, error=message)
        rollback(ctx, ctx.journal.get(move.id))
        raise FreezeTimeout(message, tenant_id=move.tenant_id, move_id=move.id)

    def copy(self, move: Move) -> None:
        """Copy the tenant's rows in one read-only snapshot of the source, into one
        transaction at the target that also marks the tenant incoming there."""
        ctx = self.ctx
        source, target = ctx.shards(move)
        carried = ctx.carried(move.id).tables
        started = time.monotonic()
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                if src.dialect.name == "postgresql":
                    src = src.execution_options(isolation_level="REPEATABLE READ")
                dst = dst.execution_options(**WRITE)
                with src.begin():
                    if src.dialect.name == "postgresql":
                        src.exec_driver_sql("SET TRANSACTION READ ONLY")
                    tables = ctx.tables(move.id, "source", src)
                    with dst.begin():
                        if dst.dialect.name == "postgresql" and replica_allowed(dst):
                            quiet_triggers(dst)
                        write_residency(
                            dst, move.tenant_id, Residency.INCOMING, ctx.catalog.map_version()
                        )
                        copies = copy_tenant(
                            src,
                            dst,
                            move.tenant_id,
                            tables,
                            column=ctx.column,
                            progress=lambda t, r, b: ctx.observer.table(t, r, b, None),
                            checkpoint=ctx.hooks.checkpoint,
                            target_tables=carried.get("target"),
                        )
        seconds = time.monotonic() - started
        ctx.journal.update(
            move.id,
            stats={
                "tables": {c.table: {"rows": c.rows, "bytes": c.bytes} for c in copies},
                "rows": sum(c.rows for c in copies),
                "bytes": sum(c.bytes for c in copies),
                "copy_seconds": round(seconds, 3),
            },
        )
