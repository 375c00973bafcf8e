"""Malformed database URLs, wherever a user can give one.

Each gets one ``error:`` line, a non-zero exit, the URL masked and no fragment of the
password — not a traceback (a port that is no number) and not "cannot resolve host
'Tail9@127.0.0.1'" (an unescaped ``@`` in the password). Relative SQLite paths are made
absolute when registered, so the map means the same from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tenantry import Catalog, load_settings
from tenantry.cli import cli
from tenantry.errors import ConfigurationError, InvalidShardUrl
from tenantry.shardmap.model import mask_url

SECRET = "Pw:with@Tail9"
BAD = {
    "port": ("postgresql://u:Pw:withTail9@127.0.0.1:notaport/x", "its port is not a number"),
    "at-in-password": (f"postgresql://u:{SECRET}@127.0.0.1:1/x", "write it as %40"),
    "no-scheme": (f"u:{SECRET}@127.0.0.1/x", "not a database URL"),
    "broken-ipv6": ("postgresql://u:Pw:withTail9@[::1/x", "not a database URL"),
}
FRAGMENTS = ("Pw", "with", "Tail9")


def check(result_output: str, exit_code: int, hint: str) -> None:
    lines = [line for line in result_output.splitlines() if line.strip()]
    assert exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result_output
    assert hint in lines[0], lines[0]
    assert "Traceback" not in result_output
    for fragment in FRAGMENTS:
        assert fragment not in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key != "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE":
            monkeypatch.delenv(key)
    return tmp_path


@pytest.mark.parametrize("case", list(BAD))
def test_catalog_option_and_variable(workdir: Path, case: str) -> None:
    url, hint = BAD[case]
    runner = CliRunner()
    result = runner.invoke(cli, ["--catalog", url, "shard", "list"])
    check(result.output, result.exit_code, hint)
    result = runner.invoke(cli, ["shard", "list"], env={"TENANTRY_CATALOG_URL": url})
    check(result.output, result.exit_code, hint)


@pytest.mark.parametrize("case", list(BAD))
def test_shard_add_and_the_library(workdir: Path, case: str) -> None:
    url, hint = BAD[case]
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    result = runner.invoke(cli, ["shard", "add", "s1", url])
    check(result.output, result.exit_code, hint)
    assert runner.invoke(cli, ["shard", "list", "--json"]).output.strip() == "[]"
    with Catalog(settings=load_settings()) as catalog, pytest.raises(InvalidShardUrl) as info:
        catalog.add_shard("s1", url)
    assert hint in str(info.value)
    assert not any(fragment in str(info.value) for fragment in FRAGMENTS)
    with pytest.raises(ConfigurationError) as bad_catalog:
        Catalog(url)
    assert not any(fragment in str(bad_catalog.value) for fragment in FRAGMENTS)


def test_mask_url_never_shows_a_piece_of_the_password() -> None:
    for url, _hint in BAD.values():
        assert not any(fragment in mask_url(url) for fragment in FRAGMENTS), mask_url(url)
    assert mask_url("postgresql://u:p@h/x") == "postgresql://u:***@h/x"
    assert mask_url("postgresql://u@h/x") == "postgresql://u@h/x"
    assert mask_url("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_relative_sqlite_paths_are_made_absolute(workdir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    result = runner.invoke(cli, ["shard", "add", "s2", "sqlite:///fleet/shared-2.db"])
    assert result.exit_code == 0, result.output
    stored = Catalog(settings=load_settings()).get_shard("s2").url
    assert stored == f"sqlite:///{tmp_path / 'fleet' / 'shared-2.db'}"
    # ... so the map means the same from another directory (the catalog's URL too).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    catalog = Catalog(f"sqlite:///../{'.tenantry/catalog.db'}")
    assert catalog.url == f"sqlite:///{tmp_path / '.tenantry' / 'catalog.db'}"
    assert catalog.get_shard("s2").url == stored
    catalog.close()
