"""``tenantry tenant import FILE|-``: CSV or JSON Lines from a file or stdin, a one-line
summary (or --json), and a refused line as one ``error:`` line naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from click.testing import CliRunner

from tenantry import Catalog
from tenantry.cli import cli

if TYPE_CHECKING:
    from tests.cli.conftest import Run


def test_import_a_csv_file(run: Run, fleet: Catalog, tmp_path: Path) -> None:
    source = tmp_path / "tenants.csv"
    lines = ["id,shard,tier,pinned", *(f"t{i}" + ",,," for i in range(250))]
    lines += ["vip,s2,shared,true", "solo,d2,dedicated,"]
    source.write_text("\n".join(lines) + "\n")
    version = fleet.map_version()
    out = run("tenant", "import", str(source), "--batch-size", "100")
    assert out.startswith("added 252 tenant(s) in 3 batch(es) ")
    assert f"(map versions {version + 1}-{version + 3})" in out and len(out.splitlines()) == 1
    snap = fleet.snapshot()
    assert len(snap.tenants) == 3 + 252
    assert snap.tenant("vip").pinned and snap.tenant("vip").shard == "s2"
    assert snap.tenant("solo").shard == "d2"


def test_import_jsonl_from_stdin_with_json_output(run: Run, fleet: Catalog) -> None:
    text = "".join(json.dumps({"id": f"j{i}"}) + "\n" for i in range(30))
    result = CliRunner().invoke(
        cli,
        ["--catalog", run.catalog_url or "", "tenant", "import", "-", "--json"],
        input=text,
        prog_name="tenantry",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["added"] == 30 and summary["batches"] == 1
    assert sum(summary["per_shard"].values()) == 30
    assert {f"j{i}" for i in range(30)} <= set(fleet.snapshot().tenants)


def test_a_refused_line_is_one_error_line(run: Run, fleet: Catalog, tmp_path: Path) -> None:
    source = tmp_path / "tenants.jsonl"
    source.write_text('{"id": "new1"}\n{"id": "acme"}\n{"id": "new2"}\n')
    version = fleet.map_version()
    error = run.fail("tenant", "import", str(source))
    assert error.startswith("error: line 2: tenant 'acme' exists already (on shard 's1'); ")
    assert "import again from line 1" in error
    assert fleet.map_version() == version and "new1" not in fleet.snapshot().tenants


def test_an_unreadable_format_is_a_usage_error(run: Run, fleet: Catalog, tmp_path: Path) -> None:
    source = tmp_path / "tenants.txt"
    source.write_text("id\nacme2\n")
    assert "'xml' is not one of" in run.fail(
        "tenant", "import", str(source), "--format", "xml", status=2
    )
    out = run("tenant", "import", str(source), "--format", "csv")
    assert out.startswith("added 1 tenant(s)") and "acme2" in fleet.snapshot().tenants
