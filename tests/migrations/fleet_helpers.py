"""Helpers of the fleet-migration suite: URLs with a password, SQL peeks, a CLI runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry import Catalog, load_settings
from tenantry.cli import cli

PASSWORD = "S3cretPw"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
COUNTING = SCRIPTS / "counting"
BROKEN = SCRIPTS / "broken"
RAISING = SCRIPTS / "raising"

#: shard name -> (tier, server); the SQLite shard ``lite`` is added when asked for.
LAYOUT = {
    "s1": ("shared", 0),
    "s2": ("shared", 1),
    "d1": ("dedicated", 0),
    "d2": ("dedicated", 1),
    "d3": ("dedicated", 0),
    "d4": ("dedicated", 1),
}
#: Rich wraps tables to the terminal; a wide one keeps every value on one line.
WIDE = {"COLUMNS": "400"}


def with_password(url: str, user: str | None = None) -> str:
    """*url* with :data:`PASSWORD` (and, if given, another user name)."""
    parsed = make_url(url).set(password=PASSWORD)
    if user is not None:
        parsed = parsed.set(username=user)
    return parsed.render_as_string(hide_password=False)


def engine(url: str) -> sa.Engine:
    return sa.create_engine(
        make_url(url).set(drivername="postgresql+psycopg") if url.startswith("postgres") else url,
        poolclass=NullPool,
    )


def query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement run in its own committed transaction."""
    eng = engine(url)
    try:
        with eng.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        eng.dispose()


def tables(url: str) -> set[str]:
    eng = engine(url)
    try:
        with eng.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        eng.dispose()


def revision(url: str) -> str | None:
    """The application's revision in the database (None: no alembic_version or empty)."""
    if "alembic_version" not in tables(url):
        return None
    rows = query(url, "SELECT version_num FROM alembic_version")
    return ",".join(sorted(r[0] for r in rows)) or None


def database_exists(server_url: str, name: str) -> bool:
    return bool(query(server_url, "SELECT 1 FROM pg_database WHERE datname = :d", d=name))


@dataclass
class Fleet:
    """A catalog and the databases of its shards (operations URLs, with passwords)."""

    catalog: Catalog
    catalog_url: str
    urls: dict[str, str] = field(default_factory=dict)

    def revisions(self) -> dict[str, str | None]:
        return {name: revision(url) for name, url in self.urls.items()}

    def tables(self, name: str) -> set[str]:
        return tables(self.urls[name])


def build_fleet(
    make_database: Callable[[int], str],
    folder: Path,
    alembic_config: Path | None,
    *,
    sqlite: bool = True,
) -> Fleet:
    """A catalog in *folder* with the shards of :data:`LAYOUT` (and SQLite ``lite``)."""
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'catalog.db'}"
    config = str(alembic_config) if alembic_config else None
    catalog = Catalog(url, settings=load_settings(catalog_url=url, alembic_config=config))
    catalog.init()
    fleet = Fleet(catalog, url)
    for name, (tier, server) in LAYOUT.items():
        fleet.urls[name] = with_password(make_database(server))
        catalog.add_shard(name, fleet.urls[name], tier=tier)
    if sqlite:
        fleet.urls["lite"] = f"sqlite:///{folder / 'lite.db'}"
        catalog.add_shard("lite", fleet.urls["lite"], tier="dedicated")
    return fleet


# -- the command line -------------------------------------------------------------------


@dataclass
class Cli:
    """Invoke ``tenantry --catalog <url> ...`` in-process; no output may show a password."""

    catalog_url: str
    env: dict[str, str] = field(default_factory=dict)

    def invoke(self, *args: str, status: int = 0, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner(env={**WIDE, **self.env, **(env or {})})
        result = runner.invoke(cli, ["--catalog", self.catalog_url, *args], prog_name="tenantry")
        assert PASSWORD not in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == status, (result.stdout, result.stderr)
        return result

    def __call__(self, *args: str, status: int = 0, env: dict[str, str] | None = None) -> str:
        """Run; check the exit status; return stdout."""
        return self.invoke(*args, status=status, env=env).stdout

    def json(self, *args: str, status: int = 0) -> Any:
        """Run with ``--json``; return the parsed document."""
        out = self(*args, "--json", status=status)
        assert "\x1b[" not in out
        return json.loads(out)

    def error(self, *args: str, status: int = 1, env: dict[str, str] | None = None) -> str:
        """Run a command that must fail cleanly: exit 1 and one ``error:`` line on
        stderr (status 2: click's usage message); return the message."""
        result = self.invoke(*args, status=status, env=env)
        if status == 2:
            assert result.stderr.startswith("Usage: ") and "Error: " in result.stderr
            return result.stderr
        assert result.stdout == ""
        # without the warnings of the suite's unsafe-routing-role override (tests/conftest.py)
        lines = [
            line
            for line in result.stderr.splitlines()
            if "--allow-unsafe-routing-role override" not in line
        ]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ")
        return lines[0]


def table_rows(out: str) -> dict[str, list[str]]:
    """The body rows of a rich table in *out*, by their first cell."""
    rows = [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]
    return {row[0]: row[1:] for row in rows}
