"""Seams of the mover: progress for displays, and checkpoints for crash tests.

A crash test runs a move in a subprocess with ``TENANTRY_MOVE_PAUSE=<checkpoint>``:
the mover touches ``TENANTRY_MOVE_PAUSE_FILE`` (if set) when it reaches that point
and then waits, so that the test can kill it there with a real SIGKILL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

__all__ = ["Checkpoints", "EnvHooks", "MoveObserver", "NullObserver"]


class Checkpoints(Protocol):
    """Test seam: called at named points of a move (:class:`EnvHooks` pauses there)."""

    def checkpoint(self, name: str) -> None:
        """Called when the mover reaches the point named *name*."""


class MoveObserver(Protocol):
    """Receives a move's progress (the CLI renders it)."""

    def step(self, move_id: int, state: str) -> None:
        """The move entered *state*."""

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        """Rows and bytes copied so far for *table*."""

    def note(self, message: str) -> None:
        """Something worth telling the operator (waiting, retrying, ...)."""


class NullObserver:
    """An observer that ignores everything."""

    def step(self, move_id: int, state: str) -> None:
        """Ignore a step."""

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        """Ignore a table's progress."""

    def note(self, message: str) -> None:
        """Ignore a note."""


class EnvHooks:
    """Checkpoints driven by ``TENANTRY_MOVE_PAUSE`` (comma-separated names)."""

    def __init__(self) -> None:
        names = os.environ.get("TENANTRY_MOVE_PAUSE", "")
        self._pause = {n.strip() for n in names.split(",") if n.strip()}
        marker = os.environ.get("TENANTRY_MOVE_PAUSE_FILE")
        self._marker = Path(marker) if marker else None

    def checkpoint(self, name: str) -> None:
        """Pause forever at *name* if asked to (a test will kill the process)."""
        if name not in self._pause:
            return
        if self._marker is not None:
            self._marker.write_text(name)
        while True:
            time.sleep(3600)
