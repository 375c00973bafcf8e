"""The library's move commands: ``move``, ``promote``, ``demote``, ``resume``, ``abort``.

Each takes a Catalog or a Router first and returns the :class:`Move` record; the CLI
only renders them.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from tenantry.errors import MoveRefused, TenantryError, UnknownShard
from tenantry.moves.journal import Journal, Move, MoveKind, MoveMode
from tenantry.moves.mover import Mover
from tenantry.moves.observers import Checkpoints, MoveObserver
from tenantry.moves.rollback import database_id
from tenantry.shardmap.catalog import Catalog, catalog_of
from tenantry.shardmap.model import Shard, Tenant, Tier
from tenantry.shardmap.roles import same_role_refusal
from tenantry.urls import mask_url, normalize_url, with_database

__all__ = ["abort", "demote", "get_move", "list_moves", "move", "promote", "resume"]


def _mover(target: object, observer: MoveObserver | None, hooks: Checkpoints | None) -> Mover:
    return Mover(catalog_of(target), observer=observer, hooks=hooks)


def _tenant_of_tier(catalog: Catalog, tenant_id: str, tier: Tier) -> Tenant:
    """The tenant, refused (MoveRefused) unless it is of *tier* (what it leaves)."""
    tenant = catalog.get_tenant(tenant_id)
    if tenant.tier is not tier:
        already = "dedicated" if tier is Tier.SHARED else "shared"
        raise MoveRefused(
            f"tenant {tenant_id!r} is {already} already (shard {tenant.shard!r})",
            tenant_id=tenant_id,
        )
    return tenant


def move(
    catalog_or_router: object,
    tenant_id: str,
    to_shard: str,
    *,
    mode: MoveMode | str = "auto",
    max_freeze: float = 1.0,
    observer: MoveObserver | None = None,
    hooks: Checkpoints | None = None,
) -> Move:
    """Move *tenant_id* to shard *to_shard* (any tier to any tier).

    *mode* is ``offline``, ``online`` or ``auto`` (online where both ends allow it);
    *max_freeze* bounds, in seconds, how long an online move holds the tenant's writes.
    """
    mover = _mover(catalog_or_router, observer, hooks)
    options = {"max_freeze": max_freeze}
    planned = mover.plan(tenant_id, to_shard, kind=MoveKind.MOVE, mode=mode, options=options)
    return mover.run(planned.id)


def promote(
    catalog_or_router: object,
    tenant_id: str,
    *,
    to: str | None = None,
    server: str | None = None,
    database: str | None = None,
    routing_url: str | None = None,
    alembic_config: str | Path | None = None,
    mode: MoveMode | str = "auto",
    max_freeze: float = 1.0,
    observer: MoveObserver | None = None,
    hooks: Checkpoints | None = None,
    allow_unsafe_routing_role: bool | None = None,
) -> Move:
    """Move a shared tenant to a dedicated database: shard *to*, or a new database
    provisioned on *server* (named after the tenant unless *database* is given).

    The new shard routes as *routing_url*'s role or, by default, as the role the tenant
    routes as now (its shard's ``url`` user and password) on *server*; never as the
    operations role (*server*'s user): that is refused before anything is created
    (:class:`~tenantry.errors.UnsafeRoutingRole`), unless *allow_unsafe_routing_role*
    (default: the setting), which logs a warning.
    """
    if (to is None) == (server is None):
        raise MoveRefused("promote needs exactly one of --to SHARD or --server URL")
    mover = _mover(catalog_or_router, observer, hooks)
    tenant = _tenant_of_tier(mover.catalog, tenant_id, Tier.SHARED)
    options: dict[str, Any] = {"max_freeze": max_freeze}
    if to is not None:
        planned = mover.plan(tenant_id, to, kind=MoveKind.PROMOTE, mode=mode, options=options)
        return mover.run(planned.id)
    assert server is not None
    name = database or tenant_id
    routing_url = routing_url or _routing_url_for(mover.catalog.get_shard(tenant.shard), server)
    allow = allow_unsafe_routing_role
    same_role_refusal(
        name,
        routing_url or server,
        server,
        allow=mover.catalog.settings.allow_unsafe_routing_role if allow is None else allow,
        fix="pass --routing-url URL of the role the application routes as",
    )
    _refuse_taken(mover.catalog, tenant_id, name, server)
    planned = _promote_into(
        mover, tenant_id, name, server, routing_url, alembic_config, mode, options
    )
    return mover.run(planned.id)


def _refuse_taken(catalog: Catalog, tenant_id: str, name: str, server: str) -> None:
    """Refused before anything is recorded or created: a shard of that name, or a
    database of that name on the server (another shard's, the tenant's own home,
    anyone's). tenantry drops only databases it provably created."""
    from tenantry.migrations.provision import database_exists

    with suppress(UnknownShard):
        catalog.get_shard(name)
        raise MoveRefused(
            f"cannot promote {tenant_id!r} into a new database {name!r}: shard {name!r} "
            f"exists already; use `--to {name}` for an empty dedicated shard, or choose "
            "another --database",
            tenant_id=tenant_id,
        )
    if database_exists(server, name, connect_timeout=catalog.settings.connect_timeout):
        raise MoveRefused(
            f"cannot promote {tenant_id!r} into a new database {name!r}: a database of that "
            f"name exists already on {mask_url(make_url(normalize_url(server)))}; choose "
            "another --database",
            tenant_id=tenant_id,
        )


def _promote_into(
    mover: Mover,
    tenant_id: str,
    name: str,
    server: str,
    routing_url: str | None,
    alembic_config: str | Path | None,
    mode: MoveMode | str,
    options: dict[str, Any],
) -> Move:
    """Plan the promote, then create database *name* on *server* and check the move
    into it (the move aborted if any of that fails); the planned move."""
    from tenantry.migrations.provision import provision

    catalog = mover.catalog
    admin_url = with_database(make_url(normalize_url(server)), name).render_as_string(
        hide_password=False
    )
    # Journal first: the database to be created is recorded before it exists, but as the
    # move's own only once created (its identity, below): an abort drops nothing else.
    provisioned: dict[str, Any] = {"shard": name, "url": admin_url, "database_id": None}
    planned = mover.plan(
        tenant_id,
        name,
        kind=MoveKind.PROMOTE,
        mode=MoveMode.OFFLINE,
        options=options,
        artifacts={"provisioned": provisioned},
        check=False,
    )
    try:
        provision(
            catalog,
            name,
            server,
            tier=Tier.DEDICATED,
            database=name,
            routing_url=routing_url,
            alembic_config=alembic_config,
        )
        created = database_id(mover.ctx, catalog.get_shard(name))
        mover.journal.update(
            planned.id, artifacts={"provisioned": {**provisioned, "database_id": created}}
        )
        mover.planning.check(mover.journal.get(planned.id), mode)
    except TenantryError:
        mover.abort(planned.id)
        raise
    return planned


def _routing_url_for(source: Shard, server: str) -> str | None:
    """The tenant's routing role now (user and password of its shard's URL), on
    *server*; None when its shard is not PostgreSQL or its URL names no user."""
    current = make_url(source.url)
    if current.get_backend_name() != "postgresql" or not current.username:
        return None
    target = make_url(normalize_url(server))
    if target.get_backend_name() != "postgresql":
        return None
    moved = target.set(username=current.username, password=current.password)
    return moved.render_as_string(hide_password=False)


def demote(
    catalog_or_router: object,
    tenant_id: str,
    *,
    to: str | None = None,
    drop_source: bool = False,
    mode: MoveMode | str = "auto",
    max_freeze: float = 1.0,
    observer: MoveObserver | None = None,
    hooks: Checkpoints | None = None,
) -> Move:
    """Move a dedicated tenant into the shared pool: shard *to*, or where the
    consistent-hash ring places it. The emptied dedicated database is kept and marked
    retired, or dropped with *drop_source*."""
    mover = _mover(catalog_or_router, observer, hooks)
    _tenant_of_tier(mover.catalog, tenant_id, Tier.DEDICATED)
    target = to if to is not None else mover.catalog.propose_shard(tenant_id)
    options: dict[str, Any] = {"drop_source": drop_source, "max_freeze": max_freeze}
    planned = mover.plan(tenant_id, target, kind=MoveKind.DEMOTE, mode=mode, options=options)
    return mover.run(planned.id)


def resume(
    catalog_or_router: object,
    move_id: int | None = None,
    *,
    observer: MoveObserver | None = None,
    hooks: Checkpoints | None = None,
) -> list[Move]:
    """Finish one move (or every live one): forward from its state, or its rollback."""
    mover = _mover(catalog_or_router, observer, hooks)
    ids = [move_id] if move_id is not None else [m.id for m in mover.journal.list(live=True)]
    done = []
    for each in sorted(ids):
        done.append(mover.run(each))
    return done


def abort(
    catalog_or_router: object,
    move_id: int,
    *,
    observer: MoveObserver | None = None,
    hooks: Checkpoints | None = None,
) -> Move:
    """Roll back a move that has not switched yet."""
    return _mover(catalog_or_router, observer, hooks).abort(move_id)


def list_moves(catalog_or_router: object, *, live: bool | None = None) -> list[Move]:
    """Moves, newest first."""
    return Journal(catalog_of(catalog_or_router)).list(live=live)


def get_move(catalog_or_router: object, move_id: int) -> Move:
    """One move by id."""
    return Journal(catalog_of(catalog_or_router)).get(move_id)
