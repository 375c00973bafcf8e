"""``moves gc``: find tenantry replication objects that no live move owns, and drop them.

A move interrupted and then abandoned (or a bug) could leave a publication, a
replication slot — which holds WAL on the source until the disk fills — or a
subscription behind. Every object of this fleet's moves is named
``tenantry_move_<fleet id>_<move id>`` (the tail's slot and publication add
``_tail``), so the collector lists those on every PostgreSQL shard and drops the ones
whose move is not live. Another fleet's objects (two catalogs whose shards share a
server) carry another fleet id and are never touched. Names without a fleet id, from
moves recorded before fleet ids, are collected only when a move of this catalog
recorded them and is not live. Dry run by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from tenantry.moves import replication as repl
from tenantry.moves.journal import Journal
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.operations import operations_engine

__all__ = ["Leftover", "collect_garbage"]


@dataclass(frozen=True, slots=True)
class Leftover:
    """One replication object no live move owns."""

    shard: str
    kind: str  # publication | slot | subscription
    name: str
    dropped: bool = False
    error: str | None = None


def collect_garbage(catalog: Catalog, *, apply: bool = False) -> list[Leftover]:
    """Every orphaned publication, slot and subscription of this fleet's moves; dropped
    with *apply*."""
    fleet = catalog.fleet_id()
    ours = f"{repl.PREFIX}{fleet}_"
    owned: set[str] = set()
    recorded: set[str] = set()
    for m in Journal(catalog).list():
        recorded |= repl.recorded_names(m.artifacts)
        if m.live:
            owned |= repl.move_names(m.artifacts, m.id, fleet).all()
            owned |= repl.recorded_names(m.artifacts)
    found: list[Leftover] = []
    # Subscriptions first: dropping one releases the slot it was using.
    for kind in ("subscription", "slot", "publication"):
        for shard in catalog.list_shards():
            if shard.backend != "postgresql":
                continue
            try:
                with (
                    operations_engine(
                        shard,
                        connect_timeout=catalog.settings.connect_timeout,
                        isolation_level="AUTOCOMMIT",
                    ) as engine,
                    engine.connect() as conn,
                ):
                    leftovers = repl.find_leftovers(conn)
                    names = {
                        "subscription": leftovers.subscriptions,
                        "slot": leftovers.slots,
                        "publication": leftovers.publications,
                    }[kind]
                    for name in names:
                        if name in owned or not (name.startswith(ours) or name in recorded):
                            continue
                        if not apply:
                            found.append(Leftover(shard.name, kind, name))
                            continue
                        try:
                            {
                                "subscription": repl.drop_subscription,
                                "slot": repl.drop_slot,
                                "publication": repl.drop_publication,
                            }[kind](conn, name)
                            found.append(Leftover(shard.name, kind, name, dropped=True))
                        except sa.exc.SQLAlchemyError as exc:
                            found.append(
                                Leftover(shard.name, kind, name, error=describe_error(exc))
                            )
            except sa.exc.SQLAlchemyError as exc:
                found.append(Leftover(shard.name, kind, "?", error=describe_error(exc)))
    return found
