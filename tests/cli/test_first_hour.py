"""Small things a new user meets in the first hour."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tenantry.cli import cli


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key != "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE":
            monkeypatch.delenv(key)
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    for name in ("s1", "s2"):
        assert runner.invoke(cli, ["shard", "add", name, f"sqlite:///{name}.db"]).exit_code == 0
    return runner


def test_shard_remove_refuses_while_tenants_live_there_and_names_them(runner: CliRunner) -> None:
    for tenant in ("acme", "beta"):
        assert runner.invoke(cli, ["tenant", "add", tenant, "--shard", "s1"]).exit_code == 0
    refused = runner.invoke(cli, ["shard", "remove", "s1"])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        "error: shard 's1' still holds 2 tenant(s) (acme, beta): move them away first "
        "(`tenantry move`, or `tenantry shard drain` for a shared shard)"
    ]
    listed = json.loads(runner.invoke(cli, ["shard", "list", "--json"]).output)
    assert [s["name"] for s in listed] == ["s1", "s2"]
    removed = runner.invoke(cli, ["shard", "remove", "s2", "--json"])
    assert removed.exit_code == 0 and json.loads(removed.output)["removed"] is True
    assert Path("s2.db").exists()  # the database is left as it is
    listed = json.loads(runner.invoke(cli, ["shard", "list", "--json"]).output)
    assert [s["name"] for s in listed] == ["s1"]
    unknown = runner.invoke(cli, ["shard", "remove", "nope"])
    assert unknown.exit_code == 1 and "nope" in unknown.output


def test_a_refused_move_prints_only_why(runner: CliRunner) -> None:
    assert runner.invoke(cli, ["tenant", "add", "acme", "--shard", "s1"]).exit_code == 0
    assert runner.invoke(cli, ["shard", "set", "s2", "--state", "retired"]).exit_code == 0
    refused = runner.invoke(cli, ["move", "acme", "--to", "s2"])
    assert refused.exit_code == 1
    lines = [line for line in refused.output.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("error: shard 's2' is retired"), lines


def test_shard_create_says_its_default_tier(runner: CliRunner) -> None:
    shown = runner.invoke(cli, ["shard", "create", "--help"], terminal_width=200)
    assert shown.exit_code == 0
    assert "dedicated unless --tier shared" in " ".join(shown.output.split())
    assert "[default: dedicated]" in shown.output


def test_no_catalog_is_said_and_nothing_is_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TENANTRY_CATALOG_URL and before `tenantry init`, a Router used to create
    an empty .tenantry/catalog.db and then say it has no schema."""
    from tenantry import Router
    from tenantry.errors import CatalogNotInitialized

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("TENANTRY_CATALOG_URL", raising=False)
    with pytest.raises(CatalogNotInitialized) as missing:
        Router().session("acme").__enter__()
    assert str(missing.value) == (
        f"there is no catalog at sqlite:///{empty / '.tenantry' / 'catalog.db'}: run "
        "`tenantry init` first, or set TENANTRY_CATALOG_URL to the fleet's catalog"
    )
    assert list(empty.iterdir()) == []
