"""Fixtures of the fleet-migration suite: a fleet across both servers, roles, a CLI runner.

The fleet is two shared and four dedicated PostgreSQL databases spread over the two
test servers, plus one dedicated SQLite file, registered in a SQLite catalog. Every
PostgreSQL URL carries a password (trust authentication ignores it) so that any output
that leaks it fails the test that printed it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fleet_helpers import PASSWORD, Cli, Fleet, build_fleet, query
from sqlalchemy.engine import make_url

from tenantry.demo import MIGRATIONS
from tenantry.testing import DatabaseFactory


@pytest.fixture(autouse=True)
def _no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """What tenantry and Alembic log in this process never shows a password."""
    caplog.set_level(logging.DEBUG, logger="tenantry")
    caplog.set_level(logging.DEBUG, logger="alembic")
    yield
    assert not [r.getMessage() for r in caplog.records if PASSWORD in r.getMessage()]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TENANTRY_* settings from the developer's shell or a ``.env`` (the suite's
    own, tests/conftest.py, stay)."""
    kept = ("TENANTRY_TEST_PG_URLS", "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE")
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key not in kept:
            monkeypatch.delenv(key)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture
def make_fleet(make_pg_database: DatabaseFactory, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``make_fleet(alembic_config=MIGRATIONS, *, sqlite=True)``: a fresh fleet, at base."""
    fleets: list[Fleet] = []

    def make(alembic_config: Path | None = MIGRATIONS, *, sqlite: bool = True) -> Fleet:
        folder = tmp_path / f"fleet-{len(fleets) + 1}"
        fleets.append(build_fleet(make_pg_database, folder, alembic_config, sqlite=sqlite))
        return fleets[-1]

    yield make
    for fleet in fleets:
        fleet.catalog.close()


@pytest.fixture
def fleet(make_fleet: Callable[..., Fleet]) -> Fleet:
    """Shared s1 (server 0), s2 (server 1); dedicated d1-d4 alternating; SQLite ``lite``.

    The demo app's migrations are its Alembic configuration; every database at base.
    """
    return make_fleet()


@pytest.fixture
def make_role(pg_servers: list[str]) -> Iterator[Callable[[str], str]]:
    """``make_role(attributes)``: a new LOGIN role on server 0; its name.

    Roles are cluster-wide, so each has a random name and is dropped at teardown,
    after what it was granted in any database is revoked (``DROP OWNED BY``).
    """
    made: list[str] = []

    def make(attributes: str = "NOSUPERUSER NOBYPASSRLS") -> str:
        name = f"app_{secrets.token_hex(4)}"
        query(pg_servers[0], f'CREATE ROLE "{name}" LOGIN {attributes}')
        made.append(name)
        return name

    yield make
    if not made:
        return
    databases = [
        r[0]
        for r in query(
            pg_servers[0],
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate",
        )
    ]
    for database in databases:
        url = make_url(pg_servers[0]).set(database=database).render_as_string(hide_password=False)
        for name in made:
            query(url, f'DROP OWNED BY "{name}"')
    for name in made:
        query(pg_servers[0], f'DROP ROLE "{name}"')


@pytest.fixture
def run(fleet: Fleet) -> Cli:
    """The CLI on the ``fleet``'s catalog, with the demo migrations as the Alembic config."""
    return Cli(fleet.catalog_url, {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)})
