"""Waiting out a freeze: the transactions that began before a tenant was frozen.

A transaction that began after the freeze reads ``frozen`` in its fence and is
read-only; one that began earlier may still write. Offline moves, online moves' cuts
and ``tenant remove --purge`` wait them out with :func:`wait_out`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import FreezeTimeout

__all__ = ["SNAPSHOT_APPLICATION", "wait_out"]

#: application_name of the read-only connections that hold an online move's cut
#: snapshots: they cannot write, so no freeze waits for them.
SNAPSHOT_APPLICATION = "tenantry-move-snapshot"

_OLDER = sa.text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend' AND xact_start < :since"
    " AND application_name <> :snapshots"
)
_PREPARED = sa.text(
    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
)


def wait_out(
    conn: Connection, *, timeout: float, note: Callable[[str], None] | None = None
) -> None:
    """Wait until every transaction that began before the freeze has ended.

    The caller has just committed the freeze on *conn*: a transaction that began
    later reads ``frozen`` in its fence and is read-only; one that began earlier may
    still write, and is waited out (the way CREATE INDEX CONCURRENTLY waits). The
    read-only snapshots of online moves' cuts are not waited for. *note* is told once
    what is waited for.

    Prepared transactions (two-phase commit) of the database are waited for too,
    whenever they were prepared: one may hold a write that ``COMMIT PREPARED`` would
    commit behind the copy. A routed transaction cannot be prepared (the fence's
    stamp is a temporary object), so these come from elsewhere; the timeout names
    them. Raises :class:`FreezeTimeout` after *timeout* seconds.
    """
    if conn.dialect.name != "postgresql":
        return  # SQLite: the freeze's write lock outlasted every earlier writer
    with conn.begin():
        since = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    deadline = time.monotonic() + timeout
    noted = note is None
    while True:
        with conn.begin():
            params = {"since": since, "snapshots": SNAPSHOT_APPLICATION}
            older = conn.execute(_OLDER, params).scalar_one()
            prepared = [str(gid) for (gid,) in conn.execute(_PREPARED)]
        if older == 0 and not prepared:
            return
        if time.monotonic() > deadline:
            raise _timed_out(conn, since, older, prepared, timeout)
        if not noted and note is not None:
            waiting = f"waiting for {older} older transaction(s) to end"
            if prepared:
                waiting += f", and {len(prepared)} prepared one(s) to be resolved"
            note(waiting)
            noted = True
        time.sleep(0.01)


def _timed_out(
    conn: Connection, since: Any, older: int, prepared: list[str], timeout: float
) -> FreezeTimeout:
    if prepared:
        return FreezeTimeout(
            f"{len(prepared)} prepared transaction(s) on the source database "
            f"({', '.join(map(repr, prepared[:5]))}) may write the tenant's rows "
            "after the copy: COMMIT PREPARED or ROLLBACK PREPARED them, then retry"
        )
    with conn.begin():
        blockers = _describe_blockers(conn, since)
    return FreezeTimeout(
        f"{older} transaction(s) older than the freeze still running after "
        f"{timeout:g}s on the source database ({blockers}): end them "
        "(pg_terminate_backend) or wait until they have finished, then try again"
    )


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
