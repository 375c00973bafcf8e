"""Reaching a shard as its operations role: the one recipe.

Every part of tenantry that administers a shard (its own tables, residency rows,
moves, sizes, garbage collection, fleet migrations) opens it the same way: a
short-lived engine on the shard's operations URL (``admin_url``, else ``url``),
without a pool, with the settings' connect timeout, disposed on the way out; and,
around the work, driver errors turned into one-line tenantry errors that name the
shard (never its password).

- :func:`operations_engine` — the engine alone; driver errors pass untouched (for
  callers that report them themselves);
- :func:`shard_errors` — driver errors named after the shard, :class:`ShardUnavailable`
  when it cannot be reached and *failed* otherwise; with ``own_only``, an error raised
  on a connection to another database passes on to the block that owns it (a move
  holds one to each end);
- :func:`operator_engine` — both together;
- :func:`operator_transaction` — a write transaction on one connection of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypedDict, Unpack

from sqlalchemy import Connection, Engine
from sqlalchemy.pool import NullPool

from tenantry.errors import ShardUnavailable, TenantryError
from tenantry.shardmap.drivers import WRITE, make_engine, translate_errors
from tenantry.shardmap.model import Shard
from tenantry.shardmap.poolers import require_server

__all__ = [
    "ErrorNaming",
    "operations_engine",
    "operator_engine",
    "operator_transaction",
    "shard_errors",
]


class ErrorNaming(TypedDict, total=False):
    """How :func:`shard_errors` names a block's driver errors (see there)."""

    failed: type[TenantryError]
    own_only: bool


@contextmanager
def operations_engine(
    shard: Shard, *, connect_timeout: float = 5.0, **kwargs: Any
) -> Iterator[Engine]:
    """A short-lived engine (no pool) on *shard*'s operations role, disposed at the
    end; *kwargs* go to :func:`make_engine` (``isolation_level``, say).

    Each of its connections is refused with :class:`~tenantry.errors.PoolerInTheWay`
    when it reaches the server through a connection pooler (one query): operations
    hold sessions only the server keeps."""
    engine = make_engine(
        shard.operations_url, connect_timeout=connect_timeout, poolclass=NullPool, **kwargs
    )
    require_server(engine, shard.name, shard.operations_url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def shard_errors(
    shard: Shard,
    *,
    failed: type[TenantryError] = ShardUnavailable,
    own_only: bool = False,
) -> Iterator[None]:
    """Database errors met in the block as one-line errors naming *shard*.

    Cannot reach it: :class:`ShardUnavailable` (its ``shard`` set); anything else:
    *failed*. With *own_only*, errors known to come from a connection to another
    database are not claimed (see :func:`tenantry.shardmap.drivers.translate_errors`).
    """
    try:
        with translate_errors(
            f"shard {shard.name!r}",
            unavailable=ShardUnavailable,
            failed=failed,
            url=shard.operations_url if own_only else None,
        ):
            yield
    except ShardUnavailable as exc:
        # translate_errors raised it: only out here can it be given the shard's name
        if exc.shard is None:
            exc.shard = shard.name
        raise


@contextmanager
def operator_engine(
    shard: Shard,
    *,
    connect_timeout: float = 5.0,
    failed: type[TenantryError] = ShardUnavailable,
    own_only: bool = False,
    **kwargs: Any,
) -> Iterator[Engine]:
    """:func:`operations_engine` with the block's driver errors named after the shard
    (:func:`shard_errors`)."""
    with (
        operations_engine(shard, connect_timeout=connect_timeout, **kwargs) as engine,
        shard_errors(shard, failed=failed, own_only=own_only),
    ):
        yield engine


@contextmanager
def operator_transaction(
    shard: Shard, *, connect_timeout: float = 5.0, **errors: Unpack[ErrorNaming]
) -> Iterator[Connection]:
    """A write transaction on *shard* as its operations role, committed when the block
    ends; driver errors name the shard (:func:`shard_errors`, given *errors*)."""
    with (
        operator_engine(shard, connect_timeout=connect_timeout, **errors) as engine,
        engine.connect() as conn,
    ):
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            yield conn
