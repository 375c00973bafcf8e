"""The online steps of a move: logical replication, then a short, budgeted freeze.

Order of an online move: ``planned → copied → frozen → verified → switched →
cleaned``. In ``copied`` the target subscribes to the tenant's rows and catches up
while the tenant keeps writing; in ``frozen`` the tenant is frozen, a sentinel written
on the source is awaited on the target — proof that the target holds every
acknowledged write — and if it does not arrive within the freeze budget the tenant is
unfrozen and the mover catches up and tries again (a bounded number of times).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import FreezeTimeout, MoveRefused
from tenantry.moves import replication as repl
from tenantry.moves.journal import Move, MoveState
from tenantry.moves.tables import TenantTable, tenant_tables
from tenantry.shardmap.connect import WRITE
from tenantry.shardmap.model import Shard
from tenantry.shardmap.residency import Residency, write_residency

if TYPE_CHECKING:
    from tenantry.moves.mover import Mover

__all__ = ["ONLINE_ORDER", "FreezeBudgetExceeded", "OnlineSteps", "online_problems"]

ONLINE_ORDER = [
    MoveState.PLANNED,
    MoveState.COPIED,
    MoveState.FROZEN,
    MoveState.VERIFIED,
    MoveState.SWITCHED,
    MoveState.CLEANED,
]

DEFAULT_MAX_FREEZE = 1.0
DEFAULT_FREEZE_ATTEMPTS = 5
_CAUGHT_UP_BYTES = 64 * 1024


class FreezeBudgetExceeded(FreezeTimeout):
    """The sentinel never arrived within the freeze budget; the move was rolled back."""


def online_problems(
    source: Connection, target: Connection, tables: list[TenantTable], column: str
) -> list[str]:
    """Why an online move between these two databases cannot run (empty: it can)."""
    if source.dialect.name != "postgresql" or target.dialect.name != "postgresql":
        return ["online moves need PostgreSQL on both ends (SQLite has no logical replication)"]
    found = repl.server_facts(source).problems("source")
    found += repl.server_facts(target).problems("target")
    found += repl.replica_identity_problems(source, tables, column)
    return found


class OnlineSteps:
    """The steps an online move does differently, run by a :class:`Mover`."""

    def __init__(self, mover: Mover) -> None:
        self.mover = mover

    def _shards(self, move: Move) -> tuple[Shard, Shard]:
        catalog = self.mover.catalog
        return catalog.get_shard(move.source), catalog.get_shard(move.target)

    # copied: subscribe and catch up ---------------------------------------------------

    def replicate(self, move: Move) -> None:
        """Create publication, slot and subscription (each recorded first), then wait for
        the initial copy and catch up."""
        mover, name = self.mover, repl.artifact_name(move.id)
        source, target = self._shards(move)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src = src.execution_options(isolation_level="AUTOCOMMIT")
                dst = dst.execution_options(isolation_level="AUTOCOMMIT")
                tables = tenant_tables(src, column=mover.column)
                problems = online_problems(src, dst, tables, mover.column)
                if problems:
                    raise MoveRefused("cannot move online: " + "; ".join(problems))
                if not _exists(dst, "pg_subscription", "subname", name):
                    # A fresh start at the target: the subscription copies every row. Not
                    # "is it in the journal": a crash between recording the subscription
                    # and creating it leaves it recorded but missing.
                    self._reset_target(move, target, tables)
                    mover.journal.update(move.id, artifacts={"publication": name})
                    if not _exists(src, "pg_publication", "pubname", name):
                        repl.create_publication(src, name, tables, move.tenant_id, mover.column)
                    mover.journal.update(move.id, artifacts={"slot": name})
                    if not _exists(src, "pg_replication_slots", "slot_name", name):
                        repl.create_slot(src, name)
                    mover.journal.update(move.id, artifacts={"subscription": name})
                    if not _exists(dst, "pg_subscription", "subname", name):
                        repl.create_subscription(
                            dst, name, repl.source_conninfo(source.operations_url), name
                        )
                mover.hooks.checkpoint("online-subscribed")
                self._wait_sync(move, dst, name)
                mover.hooks.checkpoint("online-synced")
                self._catch_up(src, name, timeout=mover.settings.freeze_timeout * 10)

    def _reset_target(self, move: Move, target: Shard, tables: list[TenantTable]) -> None:
        from tenantry.moves.copy import delete_tenant_rows

        with self.mover.admin(target) as engine:
            delete_tenant_rows(engine, move.tenant_id, tables, column=self.mover.column)
            with engine.connect() as conn:
                conn = conn.execution_options(**WRITE)
                with conn.begin():
                    write_residency(conn, move.tenant_id, Residency.INCOMING, 0)
                    conn.execute(
                        sa.text("DELETE FROM tenantry_move_sentinel WHERE tenant_id = :t"),
                        {"t": move.tenant_id},
                    )

    def _wait_sync(self, move: Move, dst: Connection, name: str) -> None:
        noted = -1
        while True:
            pending = repl.sync_pending(dst, name)
            if pending is None:
                raise MoveRefused(f"subscription {name} vanished from the target")
            if pending == 0:
                return
            if pending != noted:
                self.mover.observer.note(f"initial copy: {pending} table(s) still copying")
                noted = pending
            time.sleep(0.1)

    def _catch_up(self, src: Connection, slot: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            lag = repl.lag_bytes(src, slot)
            if lag is not None:
                self.mover.observer.note(f"replication lag: {lag:,} bytes")
            if lag is None or lag <= _CAUGHT_UP_BYTES or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    # frozen: the budgeted cut-over --------------------------------------------------------

    def cutover(self, move: Move) -> None:
        """Freeze, wait out older transactions, write the sentinel and await it on the
        target, all within the freeze budget; else unfreeze, catch up and try again."""
        mover = self.mover
        budget = float(move.options.get("max_freeze", DEFAULT_MAX_FREEZE))
        attempts = int(move.options.get("freeze_attempts", DEFAULT_FREEZE_ATTEMPTS))
        source, target = self._shards(move)
        name = repl.artifact_name(move.id)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src = src.execution_options(**WRITE)
                for attempt in range(1, attempts + 1):
                    self._set(src, move.tenant_id, Residency.FROZEN)
                    frozen_at = time.time()
                    started = time.monotonic()
                    mover.hooks.checkpoint("online-frozen")
                    try:
                        mover.wait_out(src, timeout=budget)
                        token = uuid.uuid4().hex
                        with src.begin():
                            repl.write_sentinel(src, move.tenant_id, move.id, token)
                        left = budget - (time.monotonic() - started)
                        if left > 0 and repl.wait_sentinel(
                            dst, move.tenant_id, move.id, token, timeout=left
                        ):
                            mover.journal.update(
                                move.id,
                                stats={"frozen_at": frozen_at, "freeze_attempts": attempt},
                            )
                            return
                        reason = f"the sentinel did not reach the target within {budget:g}s"
                    except FreezeTimeout as exc:
                        reason = str(exc)
                    self._set(src, move.tenant_id, Residency.ACTIVE)
                    held = time.monotonic() - started
                    mover.observer.note(
                        f"freeze attempt {attempt}: {reason}; unfrozen after {held:.3f}s, "
                        "catching up"
                    )
                    with src_engine.connect() as plain:
                        self._catch_up(
                            plain.execution_options(isolation_level="AUTOCOMMIT"),
                            name,
                            timeout=max(1.0, budget * 5),
                        )
                raise FreezeBudgetExceeded(
                    f"gave up after {attempts} freeze attempts: {reason}; the tenant was "
                    "unfrozen each time and the move was rolled back",
                    tenant_id=move.tenant_id,
                    move_id=move.id,
                )

    def _set(self, conn: Connection, tenant_id: str, state: Residency) -> None:
        with conn.begin():
            write_residency(conn, tenant_id, state, self.mover.catalog.map_version())

    # after the switch ------------------------------------------------------------------------

    def teardown(self, move: Move) -> None:
        """Drop subscription, slot and publication. Before the source is cleaned: its
        deletes must not replicate to the new home."""
        name = repl.artifact_name(move.id)
        catalog = self.mover.catalog
        forget = sa.text("DELETE FROM tenantry_move_sentinel WHERE move_id = :m")
        for shard_name, drop in (
            (move.target, lambda c: repl.drop_subscription(c, name)),
            (move.source, lambda c: repl.drop_slot(c, name)),
            (move.source, lambda c: repl.drop_publication(c, name)),
            # The sentinel has done its job; leave no trace of the tenant behind.
            (move.source, lambda c: c.execute(forget, {"m": move.id})),
            (move.target, lambda c: c.execute(forget, {"m": move.id})),
        ):
            self._on(catalog.get_shard(shard_name), drop)
        self.mover.journal.update(move.id, artifacts={"replication_dropped": True})

    def _on(self, shard: Shard, action: Callable[[Connection], object]) -> None:
        with self.mover.admin(shard) as engine, engine.connect() as conn:
            action(conn.execution_options(isolation_level="AUTOCOMMIT"))

    def advance_sequences(self, move: Move, tables: list[TenantTable]) -> None:
        """Move the target's sequences past the replicated ids (never backwards)."""
        _, target = self._shards(move)
        with self.mover.admin(target) as engine, engine.connect() as conn:
            with conn.begin():
                for table in tables:
                    quoted = conn.dialect.identifier_preparer.quote(table.name)
                    for column, sequence in table.sequences:
                        col = conn.dialect.identifier_preparer.quote(column)
                        conn.execute(
                            sa.text(
                                f"SELECT setval(CAST(:s AS regclass), m, true)"
                                f" FROM (SELECT max({col}) AS m FROM {quoted}) AS x"
                                " WHERE m IS NOT NULL AND m > coalesce("
                                "pg_sequence_last_value(CAST(:s AS regclass)), 0)"
                            ),
                            {"s": sequence},
                        )


def _exists(conn: Connection, catalog_table: str, column: str, name: str) -> bool:
    query = f"SELECT 1 FROM {catalog_table} WHERE {column} = :n"
    return conn.execute(sa.text(query), {"n": name}).first() is not None
