"""``tenantry migrate`` on bad input: one ``error:`` line on stderr and exit 1 (usage
errors: click's message and exit 2), no traceback, no password, nothing migrated. And
the ways to name the application's Alembic configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import Cli, Fleet, build_fleet

from tenantry.demo import MIGRATIONS
from tenantry.testing import DatabaseFactory

ALL = ["d1", "d2", "d3", "d4", "lite", "s1", "s2"]


@pytest.fixture(scope="module")
def pristine(pg_servers: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet at base for every refusal: none may migrate anything, so they can share
    it (and the first that does fails, as does every test after it)."""
    with DatabaseFactory(pg_servers) as make:
        fleet = build_fleet(make, tmp_path_factory.mktemp("pristine") / "fleet", MIGRATIONS)
        yield fleet
        fleet.catalog.close()


@pytest.fixture
def refuse(pristine: Fleet) -> Iterator[Cli]:
    yield Cli(pristine.catalog_url, {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)})
    assert pristine.revisions() == dict.fromkeys(ALL)


REFUSED = {
    "unknown revision": (
        ["migrate", "upgrade", "nosuch"],
        "error: unknown revision 'nosuch': see `alembic history`",
    ),
    "unknown downgrade revision": (
        ["migrate", "downgrade", "d0009"],
        "error: unknown revision 'd0009': see `alembic history`",
    ),
    "missing alembic config": (
        ["migrate", "upgrade", "--alembic-config", "/nonexistent/alembic.ini"],
        "error: Alembic configuration '/nonexistent/alembic.ini' not found: give the path of "
        "the application's alembic.ini or its migrations folder",
    ),
    "missing alembic config for status": (
        ["migrate", "status", "--alembic-config", "/nonexistent"],
        "error: Alembic configuration '/nonexistent' not found",
    ),
    "folder without env.py": (
        ["migrate", "upgrade", "--alembic-config", "."],
        "error: {cwd} is not an Alembic script directory (it has no env.py)",
    ),
    "not an ini file": (
        ["migrate", "upgrade", "--alembic-config", "pyproject.toml"],
        "error: cannot read Alembic configuration 'pyproject.toml': ",
    ),
    "ini without scripts": (
        ["migrate", "upgrade", "--alembic-config", "alembic.ini"],
        "error: cannot load Alembic scripts: Path doesn't exist: {cwd}/nowhere",
    ),
    "unknown shard": (
        ["migrate", "upgrade", "--shard", "d1", "--shard", "nope"],
        "error: unknown shard 'nope'",
    ),
    "unknown shard for status": (["migrate", "status", "--shard", "nope"], "error: unknown shard"),
}


@pytest.mark.parametrize(("args", "expected"), REFUSED.values(), ids=REFUSED.keys())
def test_bad_input_is_one_error_line_and_nothing_migrated(
    refuse: Cli, args: list[str], expected: str
) -> None:
    cwd = Path.cwd()
    (cwd / "pyproject.toml").write_text("[tool.alembic]\nscript_location = 'migrations'\n")
    (cwd / "alembic.ini").write_text("[alembic]\nscript_location = nowhere\n")
    message = refuse.error(*args)
    assert message.startswith(expected.format(cwd=os.path.realpath(cwd)))


def test_without_any_alembic_config_the_error_says_how_to_give_one(refuse: Cli) -> None:
    run = Cli(refuse.catalog_url)  # no TENANTRY_ALEMBIC_CONFIG
    for command in (["migrate", "upgrade"], ["migrate", "status"]):
        assert run.error(*command) == (
            "error: no Alembic configuration: pass --alembic-config PATH or set "
            "TENANTRY_ALEMBIC_CONFIG to the application's alembic.ini or migrations folder"
        )


USAGE = {
    "jobs 0": ["migrate", "upgrade", "--jobs", "0"],
    "jobs not a number": ["migrate", "upgrade", "-j", "many"],
    "unknown tier": ["migrate", "upgrade", "--tier", "premium"],
    "downgrade needs a revision": ["migrate", "downgrade"],
    "unknown option": ["migrate", "status", "--jobs", "2"],
    "shard create needs a server": ["shard", "create", "p1"],
}


@pytest.mark.parametrize("args", USAGE.values(), ids=USAGE.keys())
def test_usage_errors_exit_2(refuse: Cli, args: list[str]) -> None:
    refuse.error(*args, status=2)


def test_the_alembic_config_by_option_environment_or_ini(fleet: Fleet, tmp_path: Path) -> None:
    run = Cli(fleet.catalog_url)
    doc = run.json(
        "migrate", "upgrade", "d0001", "--shard", "d1", "--alembic-config", str(MIGRATIONS)
    )
    assert [(s["shard"], s["to"]) for s in doc["shards"]] == [("d1", "d0001")]

    env = {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)}
    out = run("migrate", "upgrade", "--shard", "d2", env=env)
    assert "1 of 1 shard(s) at head" in out

    # an alembic.ini whose script_location is relative: relative to the ini file
    ini = tmp_path / "app" / "alembic.ini"
    ini.parent.mkdir()
    location = os.path.relpath(MIGRATIONS, ini.parent)
    ini.write_text(f"[alembic]\nscript_location = {location}\n")
    out = run("migrate", "upgrade", "--shard", "d3", "--alembic-config", str(ini))
    assert "1 of 1 shard(s) at head" in out

    assert fleet.revisions() == {**dict.fromkeys(ALL), "d1": "d0001", "d2": "d0002", "d3": "d0002"}
    # the option wins over the environment
    out = run(
        "migrate",
        "status",
        "--alembic-config",
        str(ini),
        env={"TENANTRY_ALEMBIC_CONFIG": "/x"},
        status=1,
    )
    assert "out of step (1 behind, 4 unknown)" in out
