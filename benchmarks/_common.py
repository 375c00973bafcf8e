"""Helpers every benchmark shares: machine facts, percentiles, results files, progress.

Benchmarks live outside the test suite (timed tests are flaky) and import this module by name
(``python benchmarks/<name>.py`` puts ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Shard
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.schema import tenants

__all__ = [
    "RESULTS_DIR",
    "Phases",
    "add_server_options",
    "console",
    "finish",
    "fmt_bytes",
    "fmt_ns",
    "insert_tenant_rows",
    "load_average",
    "machine_info",
    "machine_markdown",
    "markdown_table",
    "percentile",
    "pg_servers",
    "progress",
    "revoke_temporary",
    "summarize",
    "timed",
    "verdict",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Progress and verdicts go to stderr, so stdout stays clean for a pipe; logs and CI
#: output are not wrapped at 80 columns.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)


# -- statistics ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of *values*, interpolated linearly (numpy's default).

    *values* need not be sorted; an empty sequence gives NaN.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


#: What summarize() gives unless told: count, p50, p90, p99, mean, min and max.
SUMMARY = ("n", "p50", "p90", "p99", "mean", "min", "max")


def summarize(
    values: Sequence[float], *, scale: float = 1.0, stats: Sequence[str] = SUMMARY
) -> dict[str, float]:
    """The *stats* of *values*, in that order, each but ``n`` divided by *scale*: ``n``,
    ``pNN`` (a percentile), ``median``, ``mean``, ``min``, ``max``. No values: ``{"n": 0}``.
    """
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    figures: dict[str, Callable[[], float]] = {
        "median": lambda: statistics.median(ordered),
        "mean": lambda: statistics.fmean(ordered),
        "min": lambda: ordered[0],
        "max": lambda: ordered[-1],
    }
    out: dict[str, float] = {}
    for stat in stats:
        if stat == "n":
            out[stat] = len(ordered)
        elif stat in figures:
            out[stat] = figures[stat]() / scale
        else:  # pNN
            out[stat] = percentile(ordered, float(stat.removeprefix("p"))) / scale
    return out


def verdict(value: float, target: float, *, higher_is_better: bool = False) -> str:
    """``PASS`` when *value* meets *target*, else ``MISS`` (NaN is a miss)."""
    if math.isnan(value):
        return "MISS"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def fmt_ns(ns: float) -> str:
    """A duration in the unit that reads best: ``850 ns``, ``12.3 µs``, ``4.56 ms``, ``1.2 s``."""
    if math.isnan(ns):
        return "n/a"
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.3g} µs" if ns < 10_000 else f"{ns / 1_000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.3g} ms"
    return f"{ns / 1_000_000_000:.3g} s"


def fmt_bytes(value: float | None) -> str:
    """A size in the binary unit that reads best: ``512 B``, ``1.5 KiB``, ... ``2.0 TiB``."""
    if value is None:
        return "n/a"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


# -- machine ---------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _meminfo(field: str) -> int | None:
    """A number of /proc/meminfo (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_bytes() -> int | None:
    kib = _meminfo("MemTotal")
    return kib * 1024 if kib is not None else None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def _postgres_version(url: str) -> str | None:
    engine = sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg"),
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW server_version").scalar_one())
    except sa.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(pg_urls: Sequence[str] = ()) -> dict[str, Any]:
    """What a reader needs to judge the figures: hardware, load, and software versions."""
    import psycopg

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    memory = _memory_bytes()
    pg_versions = sorted({v for v in map(_postgres_version, pg_urls) if v})
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        # PostgreSQL's default huge_pages = try puts a server's shared memory in huge
        # pages when the kernel has them reserved: fewer page faults and a cheaper exit
        # for every new server session
        "huge_pages_reserved": _meminfo("HugePages_Total"),
        "load_average": load_average(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlalchemy": sa.__version__,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "postgresql": ", ".join(pg_versions) or None,
        "tenantry": _version("tenantry"),
        "git": _git_commit(),
        "argv": sys.argv[1:],
    }


def machine_markdown(info: Mapping[str, Any]) -> str:
    """The machine facts as a two-column Markdown table."""
    rows = [[key, "" if value is None else str(value)] for key, value in info.items()]
    return markdown_table(["", ""], rows)


# -- PostgreSQL ----------------------------------------------------------------------


@contextmanager
def pg_servers(urls: Sequence[str] | None, count: int = 1) -> Iterator[list[str]]:
    """Superuser URLs of *count* servers: the given ones (reused in turn), else started.

    Servers this starts (throwaway, via :class:`tenantry.testing.PostgresServers`) are
    stopped when the block ends.
    """
    if urls:
        yield [urls[i % len(urls)] for i in range(count)]
        return
    from tenantry.testing import PostgresServers

    with PostgresServers(count=count, name="tenantry-bench") as servers:
        yield list(servers.urls)


# -- output ----------------------------------------------------------------------------


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None
) -> str:
    """A GitHub Markdown table; *align* is one letter per column (``l``, ``r``, ``c``)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(rule[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _no_nan(value: Any) -> Any:
    # JSON has no NaN; null says "not measured" without breaking strict parsers.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def write_results(
    name: str, data: Mapping[str, Any], markdown: str, out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(
        json.dumps(_no_nan(dict(data)), indent=2, default=_json_default, allow_nan=False) + "\n"
    )
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def progress() -> Progress:
    """A rich progress bar on stderr: description, bar, count, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class Phases:
    """Wall time of each phase of a benchmark, for its report:
    ``with phase("load"): ...`` prints the name and records the seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        console.print(f"[bold]{name}[/]")
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)


# -- command line ----------------------------------------------------------------------


def add_server_options(
    parser: argparse.ArgumentParser, *, default: str = "start throwaway ones"
) -> None:
    """``--pg-url URL ...`` (superuser URLs of running servers) and ``--out DIR``."""
    parser.add_argument(
        "--pg-url",
        nargs="+",
        action="extend",
        metavar="URL",
        help=f"superuser URL(s) of running PostgreSQL servers (default: {default})",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")


def timed(
    run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """``run(args)``, with its wall time as ``duration_s``."""
    started = time.monotonic()
    data = run(args)
    data["duration_s"] = round(time.monotonic() - started, 1)
    return data


def finish(
    name: str,
    data: dict[str, Any],
    markdown: str,
    out_dir: Path,
    summary: Callable[[dict[str, Any]], None],
    *,
    also: str = "",
) -> None:
    """Write the results, print *summary* of them, then what was written (*also*: more)."""
    json_path, md_path = write_results(name, data, markdown, out_dir)
    summary(data)
    written = f"{json_path}, {md_path} and {also}" if also else f"{json_path} and {md_path}"
    console.print(f"wrote {written} ({data['duration_s']} s)")


# -- shards and catalog ----------------------------------------------------------------


def revoke_temporary(url: str) -> None:
    """Take TEMPORARY on *url*'s database from PUBLIC, as ``grant_routing_role`` does: the
    shard's fence refuses a routing role that may create temporary tables, and every new
    database (a template's copy too) gives PUBLIC that right."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            database = sa.make_url(url).database
            conn.exec_driver_sql(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
    finally:
        engine.dispose()


def insert_tenant_rows(catalog: Catalog, placement: Mapping[str, Shard], now: datetime) -> None:
    """The catalog rows of many tenants (tenant id: shard) in one transaction, active and
    unpinned, for tenants whose shards hold their residency rows already: ``add_tenant``
    one by one opens a connection to the shard for each."""
    with catalog.transaction() as (conn, _version):
        conn.execute(
            tenants.insert(),
            [
                {
                    "id": t,
                    "shard": s.name,
                    "tier": s.tier.value,
                    "pinned": False,
                    "state": "active",
                    "created_at": now,
                }
                for t, s in placement.items()
            ],
        )
