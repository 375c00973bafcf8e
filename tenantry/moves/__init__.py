"""Moving tenants between shards: journal, copy, verification, the state machine."""

from tenantry.moves.api import abort, demote, get_move, list_moves, move, promote, resume
from tenantry.moves.gc import Leftover, collect_garbage
from tenantry.moves.hooks import MoveObserver, NullObserver
from tenantry.moves.journal import Journal, Move, MoveKind, MoveMode, MoveState
from tenantry.moves.mover import Mover

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
    "abort",
    "collect_garbage",
    "demote",
    "get_move",
    "list_moves",
    "move",
    "promote",
    "resume",
]
