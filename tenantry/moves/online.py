"""The online steps of a move: logical replication, then a short, budgeted freeze.

Order of an online move: ``planned → copied → frozen → verified → switched →
cleaned``. In ``copied`` the target subscribes to the tenant's rows and catches up
while the tenant keeps writing; then the tenant is verified in full at a *cut* (a short
freeze takes a snapshot on both ends, and the counts and checksums are computed on the
snapshots after the tenant is unfrozen), and a second slot starts collecting the keys
of the rows that change after the cut (:mod:`tenantry.moves.tail_decoder`). In ``frozen`` the
tenant is frozen, a sentinel written on the source is awaited on the target — proof
that the target holds every acknowledged write — and only the rows changed since the
cut are compared. If that does not fit in the freeze budget the tenant is unfrozen and
the mover catches up and tries again (a bounded number of times). The freeze therefore
grows with the writes since the cut, not with the tenant's size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import psycopg
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from tenantry.errors import MoveRefused, ReplicationFailed, VerificationFailed
from tenantry.moves import replication as repl
from tenantry.moves import tail_decoder
from tenantry.moves.budget import (
    DEFAULT_FREEZE_ATTEMPTS,
    OutOfBudget,
    budgeted_freeze,
    catch_up,
    snapshots,
    take_cut,
)
from tenantry.moves.budget import left as _left
from tenantry.moves.context import MoveContext
from tenantry.moves.freeze import SNAPSHOT_APPLICATION
from tenantry.moves.journal import Move
from tenantry.moves.references import (
    absent_keys,
    check_references,
    describe_missing,
    referenced_keys,
)
from tenantry.moves.rollback import roll_back_failed
from tenantry.moves.tables import TenantTable, analyze_tables, quoted_name
from tenantry.moves.verify import TableDigest, compare_digests, digest_tenant, set_local
from tenantry.moves.watch import Watch
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.model import Shard
from tenantry.shardmap.residency import Residency, write_residency

__all__ = [
    "SNAPSHOT_APPLICATION",
    "OnlineSteps",
    "advance_sequences",
    "online_problems",
]

#: More changed rows than this since the cut: check them at a new cut before freezing.
TAIL_ROWS_PER_FREEZE = 20_000
#: Seconds between two records of the initial copy's progress in the journal.
PROGRESS_EVERY = 2.0
#: Shared rows referenced at the cut, per foreign key, checked again in the final freeze
#: at most (beyond, only those the rows changed since the cut reference).
RECHECKED_REFERENCES = 20_000


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


class OnlineSteps:
    """The steps an online move does differently: ``copied`` (:meth:`prepare`) and
    ``frozen`` (:meth:`cutover`). What a step learns for a later one (the tail, the
    references at the cut) is carried in the :class:`MoveContext`."""

    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    def _source_tables(self, move: Move, src: Connection) -> list[TenantTable]:
        """The tenant tables, as carried (reflecting takes a few round trips, too many
        for inside the freeze); reflected anew by a mover that did not plan the move."""
        carried = self.ctx.carried(move.id).tables
        if "source" not in carried:
            carried["source"] = self.ctx.reflect(src)
            src.rollback()
        return carried["source"]

    def names(self, move: Move) -> repl.MoveNames:
        """The move's replication objects: as its journal entry recorded them, else
        named with this fleet's id."""
        return repl.move_names(move.artifacts, move.id, self.ctx.catalog.fleet_id())

    def _drain(
        self,
        conn: Connection,
        move: Move,
        changed: tail_decoder.Tail | None,
        *,
        upto_lsn: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Decode the tail slot into *changed*; a tenant table truncated since the cut
        fails the move (VerificationFailed, rolled back): the subscription does not
        apply a TRUNCATE, and the truncated rows cannot be compared by key."""
        names = self.names(move)
        tail_decoder.drain(
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
        ctx = self.ctx
        if exc.reachable:
            unfinished = roll_back_failed(ctx, move, str(exc))
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
        ctx.journal.update(move.id, error=message)
        raise ReplicationFailed(
            message, reachable=exc.reachable, tenant_id=move.tenant_id, move_id=move.id
        ) from None

    def replicate(self, move: Move) -> None:
        """Create publication, slot and subscription (each recorded first), then wait for
        the initial copy and catch up."""
        ctx = self.ctx
        names = self.names(move)
        name = names.name
        source, target = ctx.shards(move)
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
            with src_engine.connect() as src, dst_engine.connect() as dst:
                src = src.execution_options(isolation_level="AUTOCOMMIT")
                dst = dst.execution_options(isolation_level="AUTOCOMMIT")
                tables = self._source_tables(move, src)
                own = [name, names.tail_slot]
                problems = online_problems(src, dst, tables, ctx.column, own)
                if problems:
                    raise MoveRefused("cannot move online: " + "; ".join(problems))
                if not _exists(dst, "pg_subscription", "subname", name):
                    # A fresh start at the target: the subscription copies every row. Not
                    # "is it in the journal": a crash between recording the subscription
                    # and creating it leaves it recorded but missing.
                    # The reset deletes the tenant's rows at the target: never at its
                    # home (one database under two shard names).
                    ctx.check_distinct(source, target, src_engine, dst_engine)
                    self._reset_target(move, target, tables)
                    ctx.journal.update(move.id, artifacts={"publication": name})
                    if not _exists(src, "pg_publication", "pubname", name):
                        repl.create_publication(src, name, tables, move.tenant_id, ctx.column)
                    ctx.journal.update(move.id, artifacts={"slot": name})
                    if not _exists(src, "pg_replication_slots", "slot_name", name):
                        repl.create_slot(src, name)
                    ctx.journal.update(move.id, artifacts={"subscription": name})
                    if not _exists(dst, "pg_subscription", "subname", name):
                        repl.create_subscription(
                            dst, name, repl.source_conninfo(source.operations_url), name
                        )
                ctx.hooks.checkpoint("online-subscribed")
                watch = Watch(ctx, move, source, target, src, dst, name)
                self._wait_sync(move, dst, name, watch)
                # The target's statistics may still say its tables are empty.
                analyze_tables(dst, tables)
                ctx.hooks.checkpoint("online-synced")
                catch_up(ctx, src, name, timeout=ctx.settings.freeze_timeout * 10, watch=watch)

    def _reset_target(self, move: Move, target: Shard, tables: list[TenantTable]) -> None:
        from tenantry.moves.copy import delete_tenant_rows

        with self.ctx.admin(target) as engine:
            delete_tenant_rows(engine, move.tenant_id, tables, column=self.ctx.column)
            with engine.connect() as conn:
                conn = conn.execution_options(**WRITE)
                with conn.begin():
                    write_residency(conn, move.tenant_id, Residency.INCOMING, 0)
                    conn.execute(
                        sa.text("DELETE FROM tenantry_move_sentinel WHERE tenant_id = :t"),
                        {"t": move.tenant_id},
                    )

    def _wait_sync(self, move: Move, dst: Connection, name: str, watch: Watch) -> None:
        """Wait out the subscription's initial copy, telling the observer each table's
        rows and bytes as its table-sync worker copies them, and recording the totals
        in the journal (``copied_rows``, ``copied_bytes``: what was seen copying, at
        most every :data:`PROGRESS_EVERY` seconds) for ``tenantry status``."""
        noted = -1
        copied: dict[str, tuple[int, int]] = {}
        recorded = (0, 0)
        last_record = time.monotonic()
        while True:
            pending = repl.sync_pending(dst, name)
            if pending is None:
                raise MoveRefused(f"subscription {name} vanished from the target")
            for table, (rows, size) in repl.copy_progress(dst, name).items():
                if copied.get(table) != (rows, size):
                    copied[table] = (rows, size)
                    self.ctx.observer.table(table, rows, size, None)
            totals = (sum(r for r, _ in copied.values()), sum(b for _, b in copied.values()))
            now = time.monotonic()
            if totals != recorded and (pending == 0 or now - last_record >= PROGRESS_EVERY):
                self.ctx.journal.update(
                    move.id, stats={"copied_rows": totals[0], "copied_bytes": totals[1]}
                )
                recorded, last_record = totals, now
            if pending == 0:
                return
            if pending != noted:
                self.ctx.observer.note(f"initial copy: {pending} table(s) still copying")
                noted = pending
            watch.check(syncing=True)
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
        ctx = self.ctx
        source, target = ctx.shards(move)
        carried = ctx.carried(move.id)
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
            with src_engine.connect() as plain:
                # The tables again, as they are at the cut: the ones the freezes use.
                tables = carried.tables["source"] = ctx.reflect(plain)
                plain.rollback()
                move = self._start_tail(move, plain, tables)
                began = time.monotonic()
                with snapshots(src_engine, dst_engine) as (src_snap, dst_snap):
                    cut_lsn = take_cut(ctx, move, src_engine, dst_engine, src_snap, dst_snap)
                    # Changes committed before the cut are in the snapshots: drop them.
                    self._drain(plain, move, None, upto_lsn=cut_lsn)
                    carried.tail = tail_decoder.Tail()
                    ctx.hooks.checkpoint("online-cut")
                    left, right = _digest_both(
                        src_snap, dst_snap, move.tenant_id, tables, ctx.column
                    )
                    # Nor does the apply worker check foreign keys: the shared rows the
                    # tenant's rows reference must be at the target too.
                    missing, checked = check_references(
                        src_snap, dst_snap, move.tenant_id, tables, ctx.column
                    )
                    # Checked again in the final freeze, with what changed since.
                    carried.references = [
                        (key, keys if len(keys) <= RECHECKED_REFERENCES else None)
                        for key, keys in checked
                    ]
        self._record_cut(move, cut_lsn, time.monotonic() - began, (left, right), missing)

    def _record_cut(
        self,
        move: Move,
        cut_lsn: str,
        seconds: float,
        digests: tuple[dict[str, TableDigest], dict[str, TableDigest]],
        missing: list[str],
    ) -> None:
        """Record the cut's verification, and fail the move when the ends differed."""
        left, right = digests
        differ = compare_digests(left, right)
        self.ctx.observer.note(
            f"verified {sum(d.rows for d in left.values()):,} rows at the cut in {seconds:.1f}s"
            + (f"; tables differ: {', '.join(differ)}" if differ else "")
        )
        self.ctx.journal.update(
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

    def _key_cut(self, move: Move, src_engine: Engine, dst_engine: Engine) -> None:
        """Check the rows changed so far at a new cut and start the tail afresh there,
        so that the final freeze never has many rows to compare."""
        ctx = self.ctx
        changed = ctx.carried(move.id).tail
        assert changed is not None
        with src_engine.connect() as plain, snapshots(src_engine, dst_engine) as snaps:
            tables = self._source_tables(move, plain)
            cut_lsn = take_cut(ctx, move, src_engine, dst_engine, *snaps)
            self._drain(plain, move, changed, upto_lsn=cut_lsn)
            ctx.observer.note(f"checking {len(changed):,} changed rows at a new cut")
            differ = tail_decoder.compare_tail(
                *snaps, move.tenant_id, tables, changed, column=ctx.column
            )
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
        ctx = self.ctx
        source, target = ctx.shards(move)
        changed = ctx.carried(move.id).tail
        with ctx.admin(source) as src_engine, ctx.admin(target) as dst_engine:
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

            budgeted_freeze(
                ctx, move, src_engine, dst_engine, check, checkpoint="online-frozen", stay=True
            )
        if changed is not None:
            ctx.carried(move.id).verified_in_freeze = True
            ctx.journal.update(move.id, stats={"tail_rows": len(changed)})

    def _check_tail(
        self,
        move: Move,
        src: Connection,
        dst: Connection,
        changed: tail_decoder.Tail,
        deadline: float,
    ) -> None:
        """Inside the final freeze: compare the rows changed since the cut, within what is
        left of the budget (else :class:`OutOfBudget`, and the freeze is retried)."""
        try:
            self._drain(src, move, changed, timeout=_left(deadline))
            tables = self._source_tables(move, src)
            with src.begin(), dst.begin():
                for conn in (src, dst):
                    set_local(conn, {"statement_timeout": tail_decoder.timeout_ms(_left(deadline))})
                differ = tail_decoder.compare_tail(
                    src, dst, move.tenant_id, tables, changed, column=self.ctx.column
                )
                missing = [] if differ else self._check_references(move, src, dst, changed)
        except sa.exc.OperationalError as exc:
            if not isinstance(exc.orig, psycopg.errors.QueryCanceled):
                raise
            raise OutOfBudget(
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
        self, move: Move, src: Connection, dst: Connection, changed: tail_decoder.Tail
    ) -> list[str]:
        """Inside the final freeze: the shared rows referenced at the cut and by the rows
        changed since are all at the target (a reference row may have been deleted at
        the target, a changed row may reference a new one; nothing else checks)."""
        found = []
        for key, at_cut in self.ctx.carried(move.id).references:
            keys = set(at_cut or ())
            rows = tail_decoder.changed_table(src, changed, key.child)
            if rows is not None and rows.whole:
                keys |= set(referenced_keys(src, move.tenant_id, key, self.ctx.column))
            elif rows is not None:
                keys |= tail_decoder.referenced_by_changes(
                    src, move.tenant_id, key.child, rows, key.columns, self.ctx.column
                )
            missing = absent_keys(dst, key, sorted(keys))
            if missing:
                found.append(describe_missing(move.tenant_id, key, missing))
        return found

    def _start_tail(self, move: Move, plain: Connection, tables: list[TenantTable]) -> Move:
        """Create the tail's publication and slot, each recorded first; the move as
        recorded now."""
        ctx, names = self.ctx, self.names(move)
        # The tail's own publication (truncate too), even for a move that recorded its
        # tail slot before the tail had one: its cut is taken again here.
        publication = names.tail_publication or f"{names.name}_tail"
        auto = plain.execution_options(isolation_level="AUTOCOMMIT")
        # Journal first; the publication before the slot, whose decoding reads the
        # publication as of each change.
        ctx.journal.update(move.id, artifacts={"tail_publication": publication})
        if not _exists(auto, "pg_publication", "pubname", publication):
            repl.create_publication(
                auto, publication, tables, move.tenant_id, ctx.column, truncate=True
            )
        ctx.journal.update(move.id, artifacts={"tail_slot": names.tail_slot})
        tail_decoder.create_tail_slot(auto, names.tail_slot)
        auto.commit()
        return ctx.journal.get(move.id)


def advance_sequences(dst: Connection, tables: list[TenantTable]) -> None:
    """Move the target's sequences past the replicated ids (never backwards)."""
    with dst.begin():
        for table in tables:
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
