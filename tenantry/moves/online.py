"""The online steps of a move: logical replication, then a short, budgeted freeze.

Order of an online move: ``planned → copied → frozen → verified → switched →
cleaned``. In ``copied`` the target subscribes to the tenant's rows and catches up
while the tenant keeps writing; then the tenant is verified in full at a *cut* (a short
freeze takes a snapshot on both ends, and the counts and checksums are computed on the
snapshots after the tenant is unfrozen), and a second slot starts collecting the keys
of the rows that change after the cut (:mod:`tenantry.moves.tail`). In ``frozen`` the
tenant is frozen, a sentinel written on the source is awaited on the target — proof
that the target holds every acknowledged write — and only the rows changed since the
cut are compared. If that does not fit in the freeze budget the tenant is unfrozen and
the mover catches up and tries again (a bounded number of times). The freeze therefore
grows with the writes since the cut, not with the tenant's size.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import FreezeTimeout, MoveRefused, VerificationFailed
from tenantry.moves import replication as repl
from tenantry.moves import tail
from tenantry.moves.journal import Move, MoveState
from tenantry.moves.references import (
    ForeignKey,
    Key,
    absent_keys,
    check_references,
    describe_missing,
    referenced_keys,
)
from tenantry.moves.tables import TenantTable, analyze_tables, quoted_name, tenant_tables
from tenantry.moves.verify import TableDigest, compare_digests, digest_tenant, set_local
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
#: More changed rows than this since the cut: check them at a new cut before freezing.
TAIL_ROWS_PER_FREEZE = 20_000
#: Shared rows referenced at the cut, per foreign key, checked again in the final freeze
#: at most (beyond, only those the rows changed since the cut reference).
RECHECKED_REFERENCES = 20_000

_T = TypeVar("_T")

#: application_name of the read-only connections that hold a cut's snapshots.
SNAPSHOT_APPLICATION = "tenantry-move-snapshot"


class FreezeBudgetExceeded(FreezeTimeout):
    """The sentinel never arrived within the freeze budget; the move was rolled back."""


class _OutOfBudget(Exception):
    """This freeze attempt cannot finish within the budget."""


def online_problems(
    source: Connection,
    target: Connection,
    tables: list[TenantTable],
    column: str,
    move_id: int | None = None,
) -> list[str]:
    """Why an online move between these two databases cannot run (empty: it can).
    With *move_id*, that move's own slots are not counted against the free ones."""
    if source.dialect.name != "postgresql" or target.dialect.name != "postgresql":
        return ["online moves need PostgreSQL on both ends (SQLite has no logical replication)"]
    found = repl.server_facts(source, move_id).problems("source")
    found += repl.server_facts(target).problems("target")
    found += repl.replica_identity_problems(source, tables, column)
    return found


class OnlineSteps:
    """The steps an online move does differently, run by a :class:`Mover`."""

    def __init__(self, mover: Mover) -> None:
        self.mover = mover
        # Per move, in this process: the rows changed since the verified cut.
        self._tails: dict[int, tail.Tail] = {}
        self._tables: dict[int, list[TenantTable]] = {}
        self._verified: set[int] = set()
        # Per move: the shared rows the tenant referenced at the cut, by foreign key
        # (None: too many to check again inside the freeze).
        self._references: dict[int, list[tuple[ForeignKey, list[Key] | None]]] = {}

    def _shards(self, move: Move) -> tuple[Shard, Shard]:
        catalog = self.mover.catalog
        return catalog.get_shard(move.source), catalog.get_shard(move.target)

    # copied: subscribe and catch up ---------------------------------------------------

    def prepare(self, move: Move) -> None:
        """The ``copied`` step: replicate, catch up, then verify at a cut."""
        self.replicate(move)
        self.verify_cut(move)

    def replicate(self, move: Move) -> None:
        """Create publication, slot and subscription (each recorded first), then wait for
        the initial copy and catch up."""
        mover, name = self.mover, repl.artifact_name(move.id)
        source, target = self._shards(move)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src = src.execution_options(isolation_level="AUTOCOMMIT")
                dst = dst.execution_options(isolation_level="AUTOCOMMIT")
                tables = tenant_tables(src, column=mover.column, schemas=mover.schemas)
                problems = online_problems(src, dst, tables, mover.column, move.id)
                if problems:
                    raise MoveRefused("cannot move online: " + "; ".join(problems))
                if not _exists(dst, "pg_subscription", "subname", name):
                    # A fresh start at the target: the subscription copies every row. Not
                    # "is it in the journal": a crash between recording the subscription
                    # and creating it leaves it recorded but missing.
                    # The reset deletes the tenant's rows at the target: never at its
                    # home (one database under two shard names).
                    mover.check_distinct(source, target, src_engine, dst_engine)
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
                # The target's statistics may still say its tables are empty.
                analyze_tables(dst, tables)
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

    # copied, then: verify a consistent cut, outside any freeze ---------------------------

    def verify_cut(self, move: Move) -> None:
        """Verify the tenant in full at a cut, with its writes frozen only for the cut.

        The cut is a short, budgeted freeze: once the sentinel proves the target holds
        every acknowledged write, a REPEATABLE READ snapshot is taken on each end and the
        source's WAL position noted, and the tenant is unfrozen. Counts and checksums
        are then computed on the two snapshots while the tenant writes again. What
        changes after the cut is collected from the tail slot, made before the cut, and
        checked inside the final freeze (:meth:`cutover`).
        """
        mover = self.mover
        source, target = self._shards(move)
        slot = tail.tail_slot_name(move.id)
        publication = repl.artifact_name(move.id)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as plain:
                mover.journal.update(move.id, artifacts={"tail_slot": slot})
                tail.create_tail_slot(
                    plain.execution_options(isolation_level="AUTOCOMMIT"), move.id
                )
                tables = self._tenant_tables(move, plain)
                began = time.monotonic()
                with _snapshots(src_engine, dst_engine) as (src_snap, dst_snap):
                    cut_lsn = self._cut(move, src_engine, dst_engine, src_snap, dst_snap)
                    # Changes committed before the cut are in the snapshots: drop them.
                    tail.drain(plain, slot, publication, None, upto_lsn=cut_lsn)
                    self._tails[move.id] = tail.Tail()
                    mover.hooks.checkpoint("online-cut")
                    left, right = _digest_both(
                        src_snap, dst_snap, move.tenant_id, tables, mover.column
                    )
                    # Nor does the apply worker check foreign keys: the shared rows the
                    # tenant's rows reference must be at the target too.
                    missing, checked = check_references(
                        src_snap, dst_snap, move.tenant_id, tables, mover.column
                    )
                    # Checked again in the final freeze, with what changed since.
                    self._references[move.id] = [
                        (key, keys if len(keys) <= RECHECKED_REFERENCES else None)
                        for key, keys in checked
                    ]
        differ = compare_digests(left, right)
        seconds = time.monotonic() - began
        mover.observer.note(
            f"verified {sum(d.rows for d in left.values()):,} rows at the cut in {seconds:.1f}s"
            + (f"; tables differ: {', '.join(differ)}" if differ else "")
        )
        mover.journal.update(
            move.id,
            stats={
                "cut": {"lsn": cut_lsn, "verify_seconds": round(seconds, 3)},
                "verified": {n: {"rows": d.rows, "checksum": d.checksum} for n, d in left.items()},
            },
        )
        if differ:
            raise VerificationFailed(
                "verification failed at the cut: tables differ between source and target: "
                + ", ".join(differ),
                tables=differ,
            )
        if missing:
            raise VerificationFailed(f"verification failed at the cut: {missing[0]}", tables=[])

    def _cut(
        self,
        move: Move,
        src_engine: Engine,
        dst_engine: Engine,
        src_snap: Connection,
        dst_snap: Connection,
    ) -> str:
        """A budgeted freeze that takes a snapshot on both ends and returns the source's
        WAL insert position; the tenant is unfrozen again before it returns."""

        def take(src: Connection, _dst: Connection, _deadline: float) -> str:
            for conn in (src_snap, dst_snap):
                if conn.in_transaction():  # from an attempt that ran out of budget
                    conn.rollback()
                conn.begin()
                conn.execute(sa.text("SELECT pg_current_snapshot()")).one()
            # Every transaction committing after the unfreeze commits past this point.
            with src.begin():
                return str(src.execute(sa.text("SELECT pg_current_wal_insert_lsn()")).scalar())

        return self._budgeted_freeze(
            move, src_engine, dst_engine, take, checkpoint="online-cut-frozen", stay=False
        )

    def _key_cut(self, move: Move, src_engine: Engine, dst_engine: Engine) -> None:
        """Check the rows changed so far at a new cut and start the tail afresh there,
        so that the final freeze never has many rows to compare."""
        mover = self.mover
        changed = self._tails[move.id]
        slot, publication = tail.tail_slot_name(move.id), repl.artifact_name(move.id)
        with src_engine.connect() as plain, _snapshots(src_engine, dst_engine) as snaps:
            tables = self._tenant_tables(move, plain)
            cut_lsn = self._cut(move, src_engine, dst_engine, *snaps)
            tail.drain(plain, slot, publication, changed, upto_lsn=cut_lsn)
            mover.observer.note(f"checking {len(changed):,} changed rows at a new cut")
            differ = tail.compare_tail(*snaps, move.tenant_id, tables, changed, column=mover.column)
        if differ:
            raise VerificationFailed(
                "verification failed: changed rows differ between source and target: "
                + ", ".join(differ),
                tables=differ,
            )
        changed.clear()

    # frozen: the budgeted cut-over --------------------------------------------------------

    def cutover(self, move: Move) -> None:
        """Freeze, wait out older transactions, write the sentinel and await it on the
        target, then compare the rows changed since the cut, all within the freeze
        budget; else unfreeze, catch up and try again.

        A mover resumed here after a crash has no tail in memory: the tenant is frozen
        and the verified step compares every row instead.
        """
        mover = self.mover
        source, target = self._shards(move)
        changed = self._tails.get(move.id)
        slot, publication = tail.tail_slot_name(move.id), repl.artifact_name(move.id)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            if changed is not None:
                for _ in range(DEFAULT_FREEZE_ATTEMPTS):
                    with src_engine.connect() as plain:
                        tail.drain(plain, slot, publication, changed)
                    if len(changed) <= TAIL_ROWS_PER_FREEZE:
                        break
                    self._key_cut(move, src_engine, dst_engine)

            def check(src: Connection, dst: Connection, deadline: float) -> None:
                if changed is None:
                    return
                self._check_tail(move, src, dst, changed, deadline)

            self._budgeted_freeze(
                move, src_engine, dst_engine, check, checkpoint="online-frozen", stay=True
            )
        if changed is not None:
            self._verified.add(move.id)
            mover.journal.update(move.id, stats={"tail_rows": len(changed)})

    def _check_tail(
        self, move: Move, src: Connection, dst: Connection, changed: tail.Tail, deadline: float
    ) -> None:
        """Inside the final freeze: compare the rows changed since the cut, within what is
        left of the budget (else :class:`_OutOfBudget`, and the freeze is retried)."""
        slot, publication = tail.tail_slot_name(move.id), repl.artifact_name(move.id)
        try:
            tail.drain(src, slot, publication, changed, timeout=_left(deadline))
            tables = self._tenant_tables(move, src)
            with src.begin(), dst.begin():
                for conn in (src, dst):
                    set_local(conn, {"statement_timeout": tail.timeout_ms(_left(deadline))})
                differ = tail.compare_tail(
                    src, dst, move.tenant_id, tables, changed, column=self.mover.column
                )
                missing = [] if differ else self._check_references(move, src, dst, changed)
        except sa.exc.OperationalError as exc:
            if not isinstance(exc.orig, psycopg.errors.QueryCanceled):
                raise
            raise _OutOfBudget(
                f"{len(changed):,} changed rows could not be compared within the budget"
            ) from None
        if differ:
            raise VerificationFailed(
                "verification failed: rows changed since the cut differ between source "
                "and target: " + ", ".join(differ),
                tables=differ,
            )
        if missing:
            raise VerificationFailed(f"verification failed: {missing[0]}", tables=[])

    def _check_references(
        self, move: Move, src: Connection, dst: Connection, changed: tail.Tail
    ) -> list[str]:
        """Inside the final freeze: the shared rows referenced at the cut and by the rows
        changed since are all at the target (a reference row may have been deleted at
        the target, a changed row may reference a new one; nothing else checks)."""
        found = []
        for key, at_cut in self._references.get(move.id, []):
            keys = set(at_cut or ())
            rows = tail.changed_table(src, changed, key.child)
            if rows is not None and rows.whole:
                keys |= set(referenced_keys(src, move.tenant_id, key, self.mover.column))
            elif rows is not None:
                keys |= tail.referenced_by_changes(
                    src, move.tenant_id, key.child, rows, key.columns, self.mover.column
                )
            missing = absent_keys(dst, key, sorted(keys))
            if missing:
                found.append(describe_missing(move.tenant_id, key, missing))
        return found

    def verified_in_freeze(self, move_id: int) -> bool:
        """Whether :meth:`cutover` compared the rows changed since a verified cut (in this
        process): then the move needs no full verification inside the freeze."""
        return move_id in self._verified

    def _budgeted_freeze(
        self,
        move: Move,
        src_engine: Engine,
        dst_engine: Engine,
        inside: Callable[[Connection, Connection, float], _T],
        *,
        checkpoint: str,
        stay: bool,
    ) -> _T:
        """Freeze, wait out older transactions, write the sentinel and await it, then run
        *inside* — all within the budget, else unfreeze, catch up and retry (a bounded
        number of times). With *stay* the tenant is left frozen on success."""
        mover = self.mover
        budget = float(move.options.get("max_freeze", DEFAULT_MAX_FREEZE))
        attempts = int(move.options.get("freeze_attempts", DEFAULT_FREEZE_ATTEMPTS))
        name = repl.artifact_name(move.id)
        with src_engine.connect() as src, dst_engine.connect() as dst:
            src = src.execution_options(**WRITE)
            for attempt in range(1, attempts + 1):
                self._set(src, move.tenant_id, Residency.FROZEN)
                frozen_at = time.time()
                started = time.monotonic()
                deadline = started + budget
                mover.hooks.checkpoint(checkpoint)
                try:
                    mover.wait_out(src, timeout=budget)
                    token = uuid.uuid4().hex
                    with src.begin():
                        repl.write_sentinel(src, move.tenant_id, move.id, token)
                    if _left(deadline) <= 0 or not repl.wait_sentinel(
                        dst, move.tenant_id, move.id, token, timeout=_left(deadline)
                    ):
                        raise _OutOfBudget(
                            f"the sentinel did not reach the target within {budget:g}s"
                        )
                    result = inside(src, dst, deadline)
                    if stay and _left(deadline) < 0:
                        raise _OutOfBudget(f"the freeze outlasted its budget of {budget:g}s")
                except (FreezeTimeout, _OutOfBudget) as exc:
                    reason = str(exc)
                else:
                    if stay:
                        mover.journal.update(
                            move.id, stats={"frozen_at": frozen_at, "freeze_attempts": attempt}
                        )
                    else:
                        self._set(src, move.tenant_id, Residency.ACTIVE)
                        held = time.monotonic() - started
                        mover.journal.update(move.id, stats={"cut_freeze_seconds": round(held, 3)})
                    return result
                self._set(src, move.tenant_id, Residency.ACTIVE)
                held = time.monotonic() - started
                mover.observer.note(
                    f"freeze attempt {attempt}: {reason}; unfrozen after {held:.3f}s, catching up"
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
        self._tails.pop(move.id, None)
        self._tables.pop(move.id, None)
        self._references.pop(move.id, None)
        for shard_name, drop in (
            (move.target, lambda c: repl.drop_subscription(c, name)),
            (move.source, lambda c: repl.drop_slot(c, name)),
            (move.source, lambda c: repl.drop_slot(c, tail.tail_slot_name(move.id))),
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

    def advance_sequences(self, move: Move, src: Connection, dst: Connection) -> None:
        """Move the target's sequences past the replicated ids (never backwards)."""
        with dst.begin():
            for table in self._tenant_tables(move, src):
                quoted = quoted_name(dst, table)
                for column, sequence in table.sequences:
                    col = dst.dialect.identifier_preparer.quote(column)
                    dst.execute(
                        sa.text(
                            f"SELECT setval(CAST(:s AS regclass), m, true)"
                            f" FROM (SELECT max({col}) AS m FROM {quoted}) AS x"
                            " WHERE m IS NOT NULL AND m > coalesce("
                            "pg_sequence_last_value(CAST(:s AS regclass)), 0)"
                        ),
                        {"s": sequence},
                    )

    def _tenant_tables(self, move: Move, src: Connection) -> list[TenantTable]:
        """The tenant tables, as reflected at the cut (reflecting takes a few round trips,
        too many for inside the freeze); reflected anew by a resumed mover."""
        tables = self._tables.get(move.id)
        if tables is None:
            tables = tenant_tables(src, column=self.mover.column, schemas=self.mover.schemas)
            src.rollback()
            self._tables[move.id] = tables
        return tables


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


@contextmanager
def _snapshots(src_engine: Engine, dst_engine: Engine) -> Iterator[tuple[Connection, Connection]]:
    """A REPEATABLE READ connection on each end, read-only, for a cut's snapshots.

    Named :data:`SNAPSHOT_APPLICATION`: they cannot write, so the freezes of other
    moves on the same database do not wait for them (:meth:`Mover.wait_out`).
    """
    with src_engine.connect() as src, dst_engine.connect() as dst:
        for conn in (src, dst):
            conn.execute(
                sa.text("SELECT set_config('application_name', :n, false)"),
                {"n": SNAPSHOT_APPLICATION},
            )
            conn.commit()
        yield (
            src.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True),
            dst.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True),
        )


def _digest_both(
    src: Connection, dst: Connection, tenant_id: str, tables: list[TenantTable], column: str
) -> tuple[dict[str, TableDigest], dict[str, TableDigest]]:
    """Counts and checksums of the tenant on both ends at once, each in its snapshot."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        left = pool.submit(digest_tenant, src, tenant_id, tables, column=column)
        right = digest_tenant(dst, tenant_id, tables, column=column)
        return left.result(), right


def _exists(conn: Connection, catalog_table: str, column: str, name: str) -> bool:
    query = f"SELECT 1 FROM {catalog_table} WHERE {column} = :n"
    return conn.execute(sa.text(query), {"n": name}).first() is not None
