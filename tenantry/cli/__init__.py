"""The ``tenantry`` command line: a thin layer that parses, calls the library, renders.

Commands are registered in :data:`tenantry.cli.app.COMMANDS` and imported when they run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tenantry.cli.app import cli

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="tenantry")
