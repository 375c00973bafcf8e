"""``tenantry bench``: run the isolation-tier benchmarks of a source checkout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import click

from tenantry.cli.app import Failure

__all__ = ["COMMANDS", "bench_command", "find_benchmarks"]

_RUNNER = "run_all.py"


def find_benchmarks() -> Path | None:
    """``benchmarks/`` next to the installed package (a source checkout), or None."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    return folder if (folder / _RUNNER).is_file() else None


@click.command("bench")
@click.option("--quick", is_flag=True, help="A smaller run: a few minutes on two cores.")
@click.option(
    "--pg-url",
    "pg_urls",
    multiple=True,
    metavar="URL",
    help="Superuser URL of a running PostgreSQL server (give two; default: start two "
    "throwaway servers).",
)
def bench_command(quick: bool, pg_urls: tuple[str, ...]) -> None:
    """Benchmark shared, dedicated and mixed tiers; write benchmarks/results/report.md."""
    folder = find_benchmarks()
    if folder is None:
        expected = Path(__file__).resolve().parents[2] / "benchmarks"
        raise Failure(
            f"the benchmarks are not installed with the package ({expected} not found): "
            "they run from a source checkout; clone the repository, then run "
            "`pip install -e '.[bench]'` and `tenantry bench` (or `make bench`) there"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise Failure("matplotlib is missing: install the bench extra, `pip install -e '.[bench]'`")
    argv = [sys.executable, str(folder / _RUNNER)]
    if quick:
        argv.append("--quick")
    if pg_urls:
        argv += ["--pg-url", *pg_urls]
    code = subprocess.run(argv, cwd=folder.parent, check=False).returncode
    if code != 0:
        raise Failure(
            f"the benchmarks did not all complete (exit status {code}): see the output "
            f"above and {folder / 'results' / 'report.md'}"
        )


COMMANDS = [bench_command]
