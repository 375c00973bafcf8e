"""Moving tenants between shards: journal, copy, verification, the state machine."""

from tenantry.moves.commands import abort, demote, get_move, list_moves, move, promote, resume
from tenantry.moves.gc import Leftover, collect_garbage
from tenantry.moves.journal import Journal, Move, MoveKind, MoveMode, MoveState
from tenantry.moves.mover import Mover
from tenantry.moves.observers import MoveObserver, NullObserver
from tenantry.moves.removal import TenantRemoval, remove_tenant, tenant_row_counts

__all__ = [
    "Journal",
    "Leftover",
    "Move",
    "MoveKind",
    "MoveMode",
    "MoveObserver",
    "MoveState",
    "Mover",
    "NullObserver",
    "TenantRemoval",
    "abort",
    "collect_garbage",
    "demote",
    "get_move",
    "list_moves",
    "move",
    "promote",
    "remove_tenant",
    "resume",
    "tenant_row_counts",
]
