"""``moves gc``: find tenantry replication objects that no live move owns, and drop them.

A move interrupted and then abandoned (or a bug) could leave a publication, a
replication slot — which holds WAL on the source until the disk fills — or a
subscription behind. Every tenantry object is named ``tenantry_move_<id>``, so the
collector lists those on every PostgreSQL shard and drops the ones whose move is not
live (an online move's tail slot is ``tenantry_move_<id>_tail``). Dry run by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry.moves import replication as repl
from tenantry.moves.journal import Journal
from tenantry.moves.tail import tail_slot_name
from tenantry.shardmap.catalog import Catalog
from tenantry.shardmap.connect import describe_error, make_engine

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
    """Every orphaned tenantry publication, slot and subscription; dropped with *apply*."""
    owned = {
        name
        for m in Journal(catalog).list(live=True)
        for name in (repl.artifact_name(m.id), tail_slot_name(m.id))
    }
    found: list[Leftover] = []
    # Subscriptions first: dropping one releases the slot it was using.
    for kind in ("subscription", "slot", "publication"):
        for shard in catalog.list_shards():
            if shard.backend != "postgresql":
                continue
            engine = make_engine(
                shard.operations_url,
                connect_timeout=catalog.settings.connect_timeout,
                poolclass=NullPool,
                isolation_level="AUTOCOMMIT",
            )
            try:
                with engine.connect() as conn:
                    leftovers = repl.find_leftovers(conn)
                    names = {
                        "subscription": leftovers.subscriptions,
                        "slot": leftovers.slots,
                        "publication": leftovers.publications,
                    }[kind]
                    for name in names:
                        if name in owned:
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
            finally:
                engine.dispose()
    return found
