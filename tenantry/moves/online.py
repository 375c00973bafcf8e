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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import (
    FreezeBudgetExceeded,
    FreezeTimeout,
    MoveRefused,
    ReplicationFailed,
    SchemaContractError,
    TenantryError,
    VerificationFailed,
)
from tenantry.moves import replication as repl
from tenantry.moves import tail
from tenantry.moves.hooks import Checkpoints, MoveObserver
from tenantry.moves.journal import Journal, Move
from tenantry.moves.references import (
    ForeignKey,
    Key,
    absent_keys,
    check_references,
    describe_missing,
    referenced_keys,
)
from tenantry.moves.tables import (
    TenantTable,
    analyze_tables,
    check_same_tables,
    quoted_name,
    tenant_tables,
)
from tenantry.moves.verify import TableDigest, compare_digests, digest_tenant, set_local
from tenantry.settings import TenantrySettings
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import WRITE, describe_error
from tenantry.shardmap.model import Shard
from tenantry.shardmap.residency import Residency, commit_residency, write_residency

__all__ = [
    "MoveRunner",
    "OnlineSteps",
    "online_problems",
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


class _OutOfBudget(Exception):
    """This freeze attempt cannot finish within the budget."""


def online_problems(
    source: Connection,
    target: Connection,
    tables: list[TenantTable],
    column: str,
    own_slots: Sequence[str] = (),
) -> list[str]:
    """Why an online move between these two databases cannot run (empty: it can).
    The slots named *own_slots* (a resumed move's own) are not counted against the
    free ones."""
    if source.dialect.name != "postgresql" or target.dialect.name != "postgresql":
        return ["online moves need PostgreSQL on both ends (SQLite has no logical replication)"]
    found = repl.server_facts(source, own_slots).problems("source")
    found += repl.server_facts(target).problems("target")
    found += repl.unpublishable_tables(source, tables, column)
    found += repl.replica_identity_problems(source, tables, column)
    return found


class MoveRunner(Protocol):
    """What the online steps use of the mover that runs them.

    :class:`tenantry.moves.mover.Mover` is the one runner. A protocol, not an import:
    mover.py imports this module, and no import goes back (not even for type checking).
    """

    catalog: Catalog
    settings: TenantrySettings
    journal: Journal
    observer: MoveObserver
    hooks: Checkpoints
    column: str
    schemas: tuple[str, ...]

    def admin(self, shard: Shard) -> AbstractContextManager[Engine]:
        """A short-lived engine on the shard's operations role."""
        ...

    def check_distinct(self, source: Shard, target: Shard, src: Engine, dst: Engine) -> None:
        """Refuse when *src* and *dst* reach one database."""
        ...

    def wait_out(self, conn: Connection, *, timeout: float) -> None:
        """Wait until every transaction that began before the freeze has ended."""
        ...

    def roll_back_failed(self, move: Move, reason: str) -> str | None:
        """Record *reason* and roll *move* back; what stopped the roll back, or None."""
        ...

    def rollback(self, move: Move) -> Move:
        """Roll *move* back."""
        ...


class OnlineSteps:
    """The steps an online move does differently, run by a :class:`MoveRunner` (the
    mover)."""

    def __init__(self, mover: MoveRunner) -> None:
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

    def names(self, move: Move) -> repl.MoveNames:
        """The move's replication objects: as its journal entry recorded them, else
        named with this fleet's id."""
        return repl.move_names(move.artifacts, move.id, self.mover.catalog.fleet_id())

    def _drain(
        self,
        conn: Connection,
        move: Move,
        changed: tail.Tail | None,
        *,
        upto_lsn: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Decode the tail slot into *changed*; a tenant table truncated since the cut
        fails the move (VerificationFailed, rolled back): the subscription does not
        apply a TRUNCATE, and the truncated rows cannot be compared by key."""
        names = self.names(move)
        tail.drain(
            conn, names.tail_slot, names.tail_decoding, changed, upto_lsn=upto_lsn, timeout=timeout
        )
        if changed is not None and changed.truncated:
            truncated = sorted(changed.truncated)
            raise VerificationFailed(
                f"table(s) {', '.join(truncated)} of tenant {move.tenant_id!r} were truncated "
                "on the source after the cut (TRUNCATE removes every tenant's rows and is "
                "not replicated): the move was rolled back; restore the rows, then move again",
                tables=truncated,
            )

    # copied: subscribe and catch up ---------------------------------------------------

    def prepare(self, move: Move) -> None:
        """The ``copied`` step: replicate, catch up, then verify at a cut.

        Replication that fails or stalls stops the move with the reason, rolled back
        when both ends can be reached (nothing was switched), else left live with what
        to run: no move waits without a bound, and none is left live for nothing.
        """
        try:
            self.replicate(move)
        except ReplicationFailed as exc:
            self._stopped(move, exc)
        self.verify_cut(move)

    def _stopped(self, move: Move, exc: ReplicationFailed) -> None:
        mover = self.mover
        if exc.reachable:
            unfinished = mover.roll_back_failed(move, str(exc))
            if unfinished is not None:
                message = (
                    f"{exc}; rolling back failed too ({unfinished}): run `tenantry moves "
                    f"abort {move.id}`"
                )
            else:
                message = f"{exc}; the move was rolled back"
        else:
            message = (
                f"{exc}; nothing was switched: when it is back, run `tenantry moves abort "
                f"{move.id}` (or `tenantry moves resume {move.id}`)"
            )
        mover.journal.update(move.id, error=message)
        raise ReplicationFailed(
            message, reachable=exc.reachable, tenant_id=move.tenant_id, move_id=move.id
        ) from None

    def replicate(self, move: Move) -> None:
        """Create publication, slot and subscription (each recorded first), then wait for
        the initial copy and catch up."""
        mover = self.mover
        names = self.names(move)
        name = names.name
        source, target = self._shards(move)
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src = src.execution_options(isolation_level="AUTOCOMMIT")
                dst = dst.execution_options(isolation_level="AUTOCOMMIT")
                tables = tenant_tables(src, column=mover.column, schemas=mover.schemas)
                own = [name, names.tail_slot]
                problems = online_problems(src, dst, tables, mover.column, own)
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
                watch = _Watch(self, move, source, target, src, dst, name)
                self._wait_sync(move, dst, name, watch)
                # The target's statistics may still say its tables are empty.
                analyze_tables(dst, tables)
                mover.hooks.checkpoint("online-synced")
                self._catch_up(src, name, timeout=mover.settings.freeze_timeout * 10, watch=watch)

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

    def _wait_sync(self, move: Move, dst: Connection, name: str, watch: _Watch) -> None:
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
            watch.check(syncing=True)
            time.sleep(0.1)

    def _catch_up(
        self, src: Connection, slot: str, *, timeout: float, watch: _Watch | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if watch is not None:
                watch.check(syncing=False)  # the source first: its failure names it
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
        names = self.names(move)
        # The tail's own publication (truncate too), even for a move that recorded its
        # tail slot before the tail had one: its cut is taken again here.
        publication = names.tail_publication or f"{names.name}_tail"
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            with src_engine.connect() as plain:
                auto = plain.execution_options(isolation_level="AUTOCOMMIT")
                tables = self._tenant_tables(move, plain)
                # Journal first; the publication before the slot, whose decoding reads
                # the publication as of each change.
                mover.journal.update(move.id, artifacts={"tail_publication": publication})
                if not _exists(auto, "pg_publication", "pubname", publication):
                    repl.create_tail_publication(
                        auto, publication, tables, move.tenant_id, mover.column
                    )
                mover.journal.update(move.id, artifacts={"tail_slot": names.tail_slot})
                tail.create_tail_slot(auto, names.tail_slot)
                auto.commit()
                move = mover.journal.get(move.id)
                began = time.monotonic()
                with _snapshots(src_engine, dst_engine) as (src_snap, dst_snap):
                    cut_lsn = self._cut(move, src_engine, dst_engine, src_snap, dst_snap)
                    # Changes committed before the cut are in the snapshots: drop them.
                    self._drain(plain, move, None, upto_lsn=cut_lsn)
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
        with src_engine.connect() as plain, _snapshots(src_engine, dst_engine) as snaps:
            tables = self._tenant_tables(move, plain)
            cut_lsn = self._cut(move, src_engine, dst_engine, *snaps)
            self._drain(plain, move, changed, upto_lsn=cut_lsn)
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
        with mover.admin(source) as src_engine, mover.admin(target) as dst_engine:
            if changed is not None:
                for _ in range(DEFAULT_FREEZE_ATTEMPTS):
                    with src_engine.connect() as plain:
                        self._drain(plain, move, changed)
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
        try:
            self._drain(src, move, changed, timeout=_left(deadline))
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
        name = self.names(move).name
        with src_engine.connect() as src, dst_engine.connect() as dst:
            src = src.execution_options(**WRITE)
            for attempt in range(1, attempts + 1):
                commit_residency(
                    src, move.tenant_id, Residency.FROZEN, self.mover.catalog.map_version()
                )
                frozen_at = time.time()
                started = time.monotonic()
                deadline = started + budget
                mover.hooks.checkpoint(checkpoint)
                try:
                    try:
                        mover.wait_out(src, timeout=budget)
                    except FreezeTimeout as exc:
                        # Older transactions outlasting the budget: another attempt
                        # would only refuse more of the tenant's writes. Stop now.
                        commit_residency(
                            src, move.tenant_id, Residency.ACTIVE, self.mover.catalog.map_version()
                        )
                        raise FreezeBudgetExceeded(
                            f"{exc}; the tenant was unfrozen and the move was rolled back",
                            tenant_id=move.tenant_id,
                            move_id=move.id,
                        ) from None
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
                except _OutOfBudget as exc:
                    reason = str(exc)
                else:
                    if stay:
                        mover.journal.update(
                            move.id, stats={"frozen_at": frozen_at, "freeze_attempts": attempt}
                        )
                    else:
                        commit_residency(
                            src, move.tenant_id, Residency.ACTIVE, self.mover.catalog.map_version()
                        )
                        held = time.monotonic() - started
                        mover.journal.update(move.id, stats={"cut_freeze_seconds": round(held, 3)})
                    return result
                commit_residency(
                    src, move.tenant_id, Residency.ACTIVE, self.mover.catalog.map_version()
                )
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

    # after the switch ------------------------------------------------------------------------

    def teardown(self, move: Move) -> None:
        """Drop subscription, slot and publication. Before the source is cleaned: its
        deletes must not replicate to the new home."""
        names = self.names(move)
        name = names.name
        tail_publication = names.tail_publication
        catalog = self.mover.catalog
        forget = sa.text("DELETE FROM tenantry_move_sentinel WHERE move_id = :m")
        self._tails.pop(move.id, None)
        self._tables.pop(move.id, None)
        self._references.pop(move.id, None)
        for shard_name, drop in (
            (move.target, lambda c: repl.drop_subscription(c, name)),
            (move.source, lambda c: repl.drop_slot(c, name)),
            (move.source, lambda c: repl.drop_slot(c, names.tail_slot)),
            (move.source, lambda c: repl.drop_publication(c, tail_publication or name)),
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
    moves on the same database do not wait for them (:meth:`MoveRunner.wait_out`).
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


class _Watch:
    """Bounds the waits for logical replication before the freeze.

    Each :meth:`check` stops the move (:class:`ReplicationFailed`) when the source
    cannot be reached, when the subscription's apply or table-sync worker has failed
    since the watch began (``pg_stat_subscription_stats``), naming the cause where the
    tables' comparison finds it, or when nothing has progressed for
    ``move_stall_timeout`` seconds: while *syncing*, the initial copy
    (:func:`~tenantry.moves.replication.sync_progress`); then, the position the
    subscription has confirmed on the source slot.
    """

    def __init__(
        self,
        steps: OnlineSteps,
        move: Move,
        source: Shard,
        target: Shard,
        src: Connection,
        dst: Connection,
        name: str,
    ) -> None:
        self.steps, self.move = steps, move
        self.source, self.target = source, target
        self.src, self.dst, self.name = src, dst, name
        self.stall = steps.mover.settings.move_stall_timeout
        self.errors = repl.subscription_errors(dst, name) or (0, 0)
        self.progress: object = None
        self.since = time.monotonic()

    def _fail(self, message: str, *, reachable: bool = True) -> ReplicationFailed:
        return ReplicationFailed(
            message, reachable=reachable, tenant_id=self.move.tenant_id, move_id=self.move.id
        )

    def check(self, *, syncing: bool) -> None:
        try:
            confirmed = self.src.execute(
                sa.text(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = :n"
                ),
                {"n": self.name},
            ).scalar()
        except sa.exc.DBAPIError as exc:
            if not (exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError)):
                raise
            raise self._fail(
                f"replication stopped: cannot reach the source shard {self.source.name!r} "
                f"({describe_error(exc)})",
                reachable=False,
            ) from None
        errors = repl.subscription_errors(self.dst, self.name) or self.errors
        if errors[0] > self.errors[0] or errors[1] > self.errors[1]:
            worker = "table copy" if errors[1] > self.errors[1] else "apply"
            raise self._fail(
                f"replication stopped: the subscription's {worker} worker failed on the "
                f"target shard {self.target.name!r}: {self._cause()}"
            )
        progress = repl.sync_progress(self.dst, self.name) if syncing else confirmed
        now = time.monotonic()
        if progress != self.progress:
            self.progress, self.since = progress, now
        elif now - self.since > self.stall:
            raise self._fail(
                f"replication made no progress for {self.stall:g}s (TENANTRY_MOVE_STALL_"
                f"TIMEOUT) from shard {self.source.name!r} to shard {self.target.name!r}: "
                f"{self._cause()}"
            )

    def _cause(self) -> str:
        """The tables' comparison, run again: a schema that changed on one end only is
        the usual cause; else the target server's log says it."""
        column, schemas = self.steps.mover.column, self.steps.mover.schemas
        try:
            check_same_tables(
                tenant_tables(self.src, column=column, schemas=schemas),
                tenant_tables(self.dst, column=column, schemas=schemas),
            )
        except SchemaContractError as exc:
            return f"table {exc.table!r}: {exc.reason}"
        except (TenantryError, sa.exc.SQLAlchemyError):
            pass
        return "see the target server's log for the error"
