"""The ``tenantry`` command line: a thin layer that parses, calls the library, renders."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tenantry.cli import (
    bench,
    demo,
    migrate,
    moves,
    rebalance,
    shard,
    shardmap,
    status,
    tenant,
    top,
)
from tenantry.cli.app import cli

__all__ = ["cli", "main"]

for module in (shardmap, shard, tenant, migrate, moves, rebalance, status, top, bench, demo):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="tenantry")
