"""Rolling a move back, and tearing down an online move's replication.

A move that has not switched can always be rolled back (:func:`rollback`): its
replication torn down (:func:`teardown`), the tenant's rows at the target deleted (a
database the move provably created dropped), and the tenant active at its source
again. :func:`roll_back_failed` does that for a step that failed, and says what
stopped the roll back, if anything did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import TenantryError, UnknownShard
from tenantry.moves import replication as repl
from tenantry.moves.context import MoveContext
from tenantry.moves.copy import delete_tenant_rows, replica_allowed
from tenantry.moves.journal import Move, MoveState
from tenantry.shardmap.drivers import WRITE, describe_error
from tenantry.shardmap.identity import read_identity
from tenantry.shardmap.model import Shard, TenantState, mask_url
from tenantry.shardmap.residency import Residency, clear_residency, read_residency

__all__ = ["database_id", "describe", "roll_back_failed", "rollback", "teardown"]

logger = logging.getLogger("tenantry.moves")


def rollback(ctx: MoveContext, move: Move) -> Move:
    """Roll *move* back: mark it aborted, tear down its replication, delete the
    tenant's rows at the target (and drop a database the move created), and make the
    tenant active at its source again; return the move."""
    if move.state is not MoveState.ABORTED:
        ctx.journal.update(move.id, state=MoveState.ABORTED)
    ctx.observer.step(move.id, "aborted")
    if move.artifacts.get("publication") and not move.artifacts.get("replication_dropped"):
        teardown(ctx, move)
    try:
        target: Shard | None = ctx.catalog.get_shard(move.target)
    except UnknownShard:
        target = None
    source = ctx.catalog.get_shard(move.source)
    same = target is not None and ctx.same_database(source, target)
    if same:
        # The "target" is the source database under another name: its rows and
        # residency row are the tenant's own. Nothing to take back there.
        ctx.observer.note(f"shard {move.target!r} is the source's database: it was kept")
    if target is not None and not same:
        _take_back(ctx, move, target)
    ctx.residency(source, move.tenant_id, Residency.ACTIVE)
    with ctx.catalog.transaction() as (conn, _version):
        ctx.catalog.set_tenant_state(conn, move.tenant_id, TenantState.ACTIVE)
    provisioned = move.artifacts.get("provisioned")
    if provisioned and not same:
        _drop_provisioned(ctx, move, target, provisioned)
    ctx.journal.update(move.id, ended=True)
    ctx.forget(move.id)
    return ctx.journal.get(move.id)


def _take_back(ctx: MoveContext, move: Move, target: Shard) -> None:
    """Delete the tenant's rows at *target*, and its residency row there unless the
    tenant was switched there already (MOVED)."""
    with ctx.admin(target) as engine:
        with engine.connect() as conn:
            tables = ctx.reflect(conn)
            quiet = conn.dialect.name == "postgresql" and replica_allowed(conn)
        delete_tenant_rows(engine, move.tenant_id, tables, column=ctx.column, quiet=quiet)
        with engine.connect() as conn:
            conn = conn.execution_options(**WRITE)
            with conn.begin():
                if read_residency(conn, move.tenant_id) is not Residency.MOVED:
                    clear_residency(conn, move.tenant_id)


def _drop_provisioned(
    ctx: MoveContext, move: Move, target: Shard | None, provisioned: dict[str, Any]
) -> None:
    """Drop the database a promote created, when it provably did."""
    if not _created_by_move(ctx, provisioned):
        ctx.observer.note(
            f"database {mask_url(str(provisioned['url']))} was left alone: this move "
            "did not record creating it (if it did, before a crash, drop it by hand)"
        )
        return
    from tenantry.migrations.provision import drop_database

    if target is not None:
        with suppress(TenantryError):
            ctx.catalog.remove_shard(target.name, for_move=move.id)
    drop_database(str(provisioned["url"]), connect_timeout=ctx.settings.connect_timeout)


def _created_by_move(ctx: MoveContext, provisioned: dict[str, Any]) -> bool:
    """Whether the database a promote recorded is provably the one it created: its
    identity, recorded once it was created, is the live database's."""
    recorded: str | None = provisioned.get("database_id")
    if not recorded:
        return False
    probe = Shard(name=str(provisioned.get("shard", "?")), url=str(provisioned["url"]))
    try:
        return database_id(ctx, probe) == recorded
    except TenantryError:
        return False  # gone, or unreachable: nothing we may drop


def database_id(ctx: MoveContext, shard: Shard) -> str | None:
    """The identity of *shard*'s database (None: it has none)."""
    with ctx.admin(shard) as engine, engine.connect() as conn:
        identity = read_identity(conn)
    return identity.database_id if identity is not None else None


def roll_back_failed(ctx: MoveContext, move: Move, reason: str) -> str | None:
    """A step of *move* failed before the switch: record *reason*, then roll the
    move back. None when the roll back finished; else what stopped it (recorded in
    the journal too, and the move stays aborted and live for `moves abort`)."""
    ctx.journal.update(move.id, state=MoveState.ABORTED, error=reason)
    logger.error("move %s failed in %s, rolling back: %s", move.id, move.state.value, reason)
    ctx.observer.note(f"failed: {reason}; rolling back")
    try:
        rollback(ctx, ctx.journal.get(move.id))
    except Exception as again:
        unfinished = describe(again)
        with suppress(TenantryError):
            ctx.journal.update(
                move.id, error=f"{reason}; the roll back did not finish: {unfinished}"
            )
        return unfinished
    return None


def teardown(ctx: MoveContext, move: Move) -> None:
    """Drop an online move's subscription, slots and publications, and its sentinel
    rows. Before the source is cleaned: its deletes must not replicate to the new
    home."""
    names = repl.move_names(move.artifacts, move.id, ctx.catalog.fleet_id())
    name = names.name
    tail_publication = names.tail_publication
    forget = sa.text("DELETE FROM tenantry_move_sentinel WHERE move_id = :m")
    carried = ctx.carried(move.id)
    carried.tail, carried.references = None, []
    drops: list[tuple[str, Callable[[Connection], object]]] = [
        (move.target, lambda c: repl.drop_subscription(c, name)),
        (move.source, lambda c: repl.drop_slot(c, name)),
        (move.source, lambda c: repl.drop_slot(c, names.tail_slot)),
        (move.source, lambda c: repl.drop_publication(c, tail_publication or name)),
        (move.source, lambda c: repl.drop_publication(c, name)),
        # The sentinel has done its job; leave no trace of the tenant behind.
        (move.source, lambda c: c.execute(forget, {"m": move.id})),
        (move.target, lambda c: c.execute(forget, {"m": move.id})),
    ]
    for shard_name, drop in drops:
        with ctx.admin(ctx.catalog.get_shard(shard_name)) as engine, engine.connect() as conn:
            drop(conn.execution_options(isolation_level="AUTOCOMMIT"))
    ctx.journal.update(move.id, artifacts={"replication_dropped": True})


def describe(exc: BaseException) -> str:
    """One line about an error, for the journal."""
    return str(exc) if isinstance(exc, TenantryError) else describe_error(exc)
