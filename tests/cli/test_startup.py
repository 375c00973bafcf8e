"""The CLI's start-up: commands load lazily, and a look-up imports only what it needs.

``tenantry route T`` at 100,000 tenants must answer within a second, most of which was
Python importing modules the command never uses (the movers, the router, Alembic,
SQLAlchemy's ORM, rich's progress bars).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from tenantry import Catalog
from tenantry.cli import app, cli

#: Modules a look-up never needs.
HEAVY = (
    "alembic",
    "sqlalchemy.orm",
    "sqlalchemy.ext.asyncio",
    "tenantry.router",
    "tenantry.moves",
    "tenantry.migrations.fleet",
    "tenantry.rebalance.apply",
    "rich.progress",
)

#: Runs the CLI in a fresh interpreter and prints which of HEAVY it imported.
PROBE = """
import json, sys
from tenantry.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = {heavy!r}
print(json.dumps({{"code": code, "loaded": [m for m in heavy if m in sys.modules]}}))
"""


def probe(*args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_lookups_import_no_heavy_module(fleet: Catalog) -> None:
    url = fleet.url
    for args in (
        ["route", "acme"],
        ["tenant", "show", "acme"],
        ["shard", "list"],
        ["shard", "show", "s1"],
    ):
        found = probe("--catalog", url, *args)
        assert found == {"code": 0, "loaded": []}, args
    # and the probe can tell: a command that needs the movers imports them
    assert "tenantry.moves" in probe("--catalog", url, "moves", "list")["loaded"]  # type: ignore[operator]


def test_every_registered_command_loads_under_its_name() -> None:
    assert cli.list_commands(click.Context(cli)) == sorted(app.COMMANDS)
    for name in app.COMMANDS:
        command = app.load_command(name)
        assert command.name == name
    # every command a module of tenantry.cli lists is registered
    folder = Path(app.__file__).parent
    listed = set()
    for path in folder.glob("*.py"):
        if path.stem == "app":
            continue
        module = importlib.import_module(f"tenantry.cli.{path.stem}")
        listed |= {c.name for c in getattr(module, "COMMANDS", [])}
    assert listed == set(app.COMMANDS)


def test_help_lists_every_command_and_an_unknown_one_fails_cleanly() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["--help"]).output
    for name in app.COMMANDS:
        assert f"  {name} " in out
    result = runner.invoke(cli, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output
