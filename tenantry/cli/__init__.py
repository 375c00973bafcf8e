"""The ``tenantry`` command line: a thin layer that parses, calls the library, renders."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tenantry.cli import bench, demo, migrate, moves, rebalance, shardmap
from tenantry.cli.app import cli

__all__ = ["cli", "main"]

for module in (shardmap, migrate, moves, rebalance, bench, demo):
    for command in module.COMMANDS:
        cli.add_command(command)
for command in [*migrate.SHARD_COMMANDS, rebalance.DRAIN]:
    shardmap.shard_group.add_command(command)
shardmap.tenant_group.add_command(rebalance.SIZES)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else sys.argv[1:], prog_name="tenantry")
