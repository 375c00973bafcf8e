"""Fixtures of the CLI suite: a runner, a catalog, a small fleet, a table reader.

Every test runs in its own empty working directory with no ``TENANTRY_*`` settings in
the environment, so nothing leaks in from the developer's shell or ``.env``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tenantry import Catalog, Tier, load_settings
from tenantry.cli import cli

#: Rich wraps tables to the terminal; a wide one keeps every value on one line.
WIDE = {"COLUMNS": "400"}
#: Settings the suite sets for every test (tests/conftest.py).
KEPT = ("TENANTRY_TEST_PG_URLS", "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE")


def stderr_of(result: Result) -> str:
    """The command's stderr without the warnings of the suite's unsafe-routing-role
    override (tests/conftest.py): the superuser routes most test shards."""
    return "".join(
        line
        for line in result.stderr.splitlines(keepends=True)
        if "--allow-unsafe-routing-role override" not in line
    )


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key not in KEPT:
            monkeypatch.delenv(key)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@dataclass
class Run:
    """Invoke ``tenantry`` in-process with a catalog; check the outcome."""

    catalog_url: str | None

    def invoke(
        self, *args: str, catalog: str | None = "", env: dict[str, str] | None = None
    ) -> Result:
        url = self.catalog_url if catalog == "" else catalog
        argv = (["--catalog", url] if url is not None else []) + list(args)
        return CliRunner(env={**WIDE, **(env or {})}).invoke(cli, argv, prog_name="tenantry")

    def __call__(
        self, *args: str, catalog: str | None = "", env: dict[str, str] | None = None
    ) -> str:
        """Run a command that must succeed; return its stdout."""
        result = self.invoke(*args, catalog=catalog, env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        assert result.exit_code == 0, (result.stdout, result.stderr)
        assert stderr_of(result) == ""
        return result.stdout

    def json(self, *args: str, catalog: str | None = "") -> Any:
        """Run a command with ``--json``; return the parsed document."""
        out = self(*args, "--json", catalog=catalog)
        assert "\x1b[" not in out  # no colour codes in machine-readable output
        return json.loads(out)

    def fail(
        self,
        *args: str,
        catalog: str | None = "",
        env: dict[str, str] | None = None,
        status: int = 1,
    ) -> str:
        """Run a command that must fail cleanly; return its error message."""
        result = self.invoke(*args, catalog=catalog, env=env)
        # a clean failure is click's SystemExit, never an escaped exception
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == status, (result.stdout, result.stderr)
        assert "Traceback" not in result.output
        if status == 1:
            assert result.stdout == ""
            lines = stderr_of(result).splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith("error: ")
            return lines[0]
        assert result.stderr.startswith("Usage: ") and "Error: " in result.stderr
        return result.stderr


@pytest.fixture
def catalog_url(tmp_path: Path) -> str:
    """A SQLite catalog URL (not yet initialised)."""
    return f"sqlite:///{tmp_path / 'catalog.db'}"


@pytest.fixture
def make_run() -> type[Run]:
    """``make_run(url)``: a runner for another catalog."""
    return Run


@pytest.fixture
def run(catalog_url: str) -> Run:
    """``run(*args)`` invokes ``tenantry --catalog <catalog_url> *args``."""
    return Run(catalog_url)


def build_fleet(catalog_url: str, directory: Path) -> Catalog:
    """Shared shards s1, s2, dedicated d1 (holding ``regulated``) and d2 (empty), and
    shared tenants acme (on s1) and globex (on s2); SQLite files in *directory*."""
    cat = Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url))
    cat.init()
    for name, tier in (
        ("s1", "shared"),
        ("s2", "shared"),
        ("d1", "dedicated"),
        ("d2", "dedicated"),
    ):
        cat.add_shard(name, f"sqlite:///{directory / (name + '.db')}", tier=tier)
    cat.add_tenant("regulated", tier=Tier.DEDICATED, shard="d1")
    cat.add_tenant("acme", shard="s1")
    cat.add_tenant("globex", shard="s2")
    return cat


@pytest.fixture(scope="session")
def fleet_builder() -> Callable[[str, Path], Catalog]:
    """``fleet_builder(catalog_url, directory)``: the fleet below, for wider scopes."""
    return build_fleet


@pytest.fixture
def fleet(catalog_url: str, tmp_path: Path) -> Iterator[Catalog]:
    """The catalog at ``catalog_url``, initialised, with the fleet of build_fleet."""
    with build_fleet(catalog_url, tmp_path) as cat:
        yield cat


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the rich table(s) in *out*, cells stripped."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def table_header(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith("┃"))
    return [cell.strip() for cell in line.strip().strip("┃").split("┃")]


@pytest.fixture
def read_table() -> Callable[[str], list[list[str]]]:
    return table_rows


@pytest.fixture
def read_header() -> Callable[[str], list[str]]:
    return table_header
