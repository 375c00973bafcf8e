"""Progress of long commands: drawn on a terminal (forced here with rich's
``TTY_COMPATIBLE=1``), never to a pipe and never with ``--json``."""

from __future__ import annotations

import json
import re

from click.testing import Result

from tenantry.demo import MIGRATIONS

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TERMINAL = {"TTY_COMPATIBLE": "1"}
ALEMBIC = {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)}


def _plain(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return ANSI.sub("", result.stdout)


def _progress_lines(out: str) -> list[str]:
    """The lines of a counted progress task: ``done/total unit`` after a bar."""
    return [line for line in out.splitlines() if re.search(r"━.* \d+/\d+ (shards|moves)", line)]


def test_long_commands_show_progress_on_a_terminal_only(run, fleet):
    # migrate upgrade: four shards.
    piped = _plain(run.invoke("migrate", "upgrade", "--jobs", "1", env=ALEMBIC))
    assert _progress_lines(piped) == [] and "4 of 4 shard(s) at head" in piped
    shown = _plain(run.invoke("migrate", "upgrade", "--jobs", "1", env={**ALEMBIC, **TERMINAL}))
    line = _progress_lines(shown)[-1]  # the last frame drawn
    assert "upgrade to head" in line and "4/4 shards" in line
    as_json = run.invoke("migrate", "upgrade", "--json", env={**ALEMBIC, **TERMINAL})
    assert json.loads(as_json.stdout)["ok"] is True  # nothing but the document

    # tenant sizes --refresh: the two shared shards.
    piped = _plain(run.invoke("tenant", "sizes", "--refresh"))
    assert _progress_lines(piped) == [] and "measuring" not in piped
    shown = _plain(run.invoke("tenant", "sizes", "--refresh", env=TERMINAL))
    line = _progress_lines(shown)[-1]  # the last frame drawn
    assert "measuring" in line and "2/2 shards" in line
    as_json = run.invoke("tenant", "sizes", "--refresh", "--json", env=TERMINAL)
    assert {r["tenant"] for r in json.loads(as_json.stdout)} == {"acme", "globex"}

    # shard drain --apply: acme leaves s1 (the moves' own steps are drawn too).
    shown = _plain(run.invoke("shard", "drain", "s1", "--apply", env={**ALEMBIC, **TERMINAL}))
    line = _progress_lines(shown)[-1]  # the last frame drawn
    assert "1/1 moves" in line and "acme: done" in line
    assert "move 1: cleaned" in shown
    # rebalance --apply, piped: the result alone (acme comes back to an undrained s1).
    run("shard", "set", "s1", "--state", "active")
    run("shard", "set", "s2", "--state", "draining")
    piped = _plain(run.invoke("shard", "drain", "s2", "--apply", env=ALEMBIC))
    assert _progress_lines(piped) == [] and "move 2:" not in piped
    assert "2 of 2 planned move(s) done" in piped
