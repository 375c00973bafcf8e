"""The installed ``tenantry`` console script, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tenantry import Catalog, load_settings


def tenantry(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The console script installed next to this interpreter, as `make` runs it.
    script = Path(sys.executable).with_name("tenantry")
    assert script.is_file(), f"{script} missing: install the project (`make test` does)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    return subprocess.run(
        [str(script), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_script_routes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    with Catalog(url, settings=load_settings(catalog_url=url)) as catalog:
        catalog.init()
        catalog.add_shard("s1", f"sqlite:///{tmp_path / 's1.db'}")
        catalog.add_tenant("acme")
        version = catalog.map_version()

    done = tenantry("--catalog", url, "route", "acme", "--json", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {
        "tenant": "acme",
        "shard": "s1",
        "tier": "shared",
        "url": f"sqlite:///{tmp_path / 's1.db'}",
        "map_version": version,
    }


def test_python_dash_m_runs_the_same_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")}
    done = subprocess.run(
        [sys.executable, "-m", "tenantry", "tenant", "list"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # no --catalog and no settings: the default catalog under ./.tenantry/, not yet made
    assert done.returncode == 1
    assert done.stderr == (
        f"error: there is no catalog at sqlite:///{tmp_path / '.tenantry' / 'catalog.db'}: "
        "run `tenantry init` first, or set TENANTRY_CATALOG_URL to the fleet's catalog\n"
    )
