"""Fixtures shared by every test: real PostgreSQL servers, fresh databases, SQLite files.

PostgreSQL comes from :class:`tenantry.testing.PostgresServers`: the servers named in
``TENANTRY_TEST_PG_URLS``, else two throwaway servers started with ``initdb``, else two
Docker containers. With none of these, every test that needs PostgreSQL errors with
one message saying how to provide it; nothing is skipped.

Most tests route shared PostgreSQL shards as the servers' superuser, so the suite runs
with ``TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE=1`` (each use logs its warning). Tests of the
refusal take it away with ``@pytest.mark.strict_routing_role`` (or the
``strict_routing_role`` fixture); the suites' environment cleaners keep it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantry.testing import DatabaseFactory, NoPostgresAvailable, PostgresServers
from tenantry.testing.pgbouncer import NoPgBouncerAvailable, TempPgBouncer

#: The override of the routing-role check, on for the suite (see the module's docstring).
UNSAFE_ROUTING_ROLE = "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE"


#: Test modules that take the longest (tens of seconds each, measured with
#: ``--durations``), run first when pytest-xdist spreads modules over workers
#: (``make test``, whose ``--no-loadscope-reorder`` keeps this order): one started
#: last would leave the other workers idle while it runs.
LONG_MODULES = (
    "moves/test_crash.py",
    "moves/test_online.py",
    "router/test_server_budget.py",
    "moves/test_whole_database.py",
    "test_readme.py",
    "moves/test_generated_schemas.py",
    "router/test_frozen_enforced.py",
    "router/test_engines.py",
    "moves/test_mover.py",
    "moves/test_rebalance.py",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "strict_routing_role: the unsafe-routing-role override is off (refusals are tested)",
    )
    os.environ[UNSAFE_ROUTING_ROLE] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the :data:`LONG_MODULES` first (a stable sort: the
    order within a module and among the others stays); a serial run keeps the usual
    order. Every worker sorts alike, as xdist requires."""
    if not hasattr(config, "workerinput"):
        return
    tests = Path(__file__).parent
    rank = {str(tests / name): n for n, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))


@pytest.fixture
def strict_routing_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """No unsafe-routing-role override: unsafe routing roles are refused."""
    monkeypatch.delenv(UNSAFE_ROUTING_ROLE, raising=False)


@pytest.fixture(autouse=True)
def _no_tenantry_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's TENANTRY_* settings (a catalog URL, say) must not change what the
    tests see; the suite's own stay."""
    kept = ("TENANTRY_TEST_PG_URLS", UNSAFE_ROUTING_ROLE)
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key not in kept:
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _routing_role_override(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("strict_routing_role") is not None:
        request.getfixturevalue("strict_routing_role")


@pytest.fixture(scope="session")
def pg_provider() -> Iterator[PostgresServers]:
    """The session's two PostgreSQL servers and where they came from (``.source``)."""
    servers = PostgresServers(count=2)
    try:
        servers.start()
    except NoPostgresAvailable as exc:
        failure = str(exc)
    else:
        failure = ""
    if failure:
        # The message is the whole story: no traceback, and outside the except block so
        # pytest does not print it twice as a chained exception.
        pytest.fail(failure, pytrace=False)
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def pg_servers(pg_provider: PostgresServers) -> list[str]:
    """Superuser URLs of the ``postgres`` database on two servers.

    When ``TENANTRY_TEST_PG_URLS`` names a single server, both entries are that server:
    tests then still get distinct databases, but not distinct servers.
    """
    return list(pg_provider.urls)


@pytest.fixture(scope="session")
def pgbouncer(pg_servers: list[str]) -> Iterator[TempPgBouncer]:
    """PgBouncer in transaction mode in front of server 0, two server connections per
    (database, user): every tenant shares them. Admits ``postgres`` and ``app``."""
    try:
        bouncer = TempPgBouncer.start(pg_servers[0], users=("postgres", "app"))
    except NoPgBouncerAvailable as exc:
        failure = str(exc)
    else:
        failure = ""
    if failure:
        pytest.fail(f"{failure} (make test installs it where apt-get may)", pytrace=False)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def make_pg_database(pg_servers: list[str]) -> Iterator[DatabaseFactory]:
    """Factory ``(server=0, *, name=None, template=None) -> url`` of fresh databases.

    Every database it created is dropped at teardown.
    """
    with DatabaseFactory(pg_servers) as factory:
        yield factory


@pytest.fixture
def pg_url(make_pg_database: DatabaseFactory) -> str:
    """A fresh, empty database on server 0."""
    return make_pg_database(0)


@pytest.fixture
def pg_url2(make_pg_database: DatabaseFactory) -> str:
    """A fresh, empty database on server 1."""
    return make_pg_database(1)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file of this test's own."""
    return f"sqlite:///{tmp_path / 'tenantry.db'}"


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url
