"""The PostgreSQL layer under every test: servers, fresh databases, the no-server error."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tenantry.testing import (
    URLS_ENV,
    DatabaseFactory,
    NoPostgresAvailable,
    PostgresServers,
    TempPostgres,
    create_database,
    drop_database,
    find_pg_bindir,
)


@contextmanager
def connect(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        # a connected database can be neither dropped without FORCE nor used as template
        engine.dispose()


def scalar(url: str, sql: str) -> object:
    with connect(url) as conn:
        return conn.exec_driver_sql(sql).scalar()


def databases(url: str) -> set[str]:
    """The databases on the server of ``url``."""
    server = make_url(url).set(database="postgres").render_as_string(hide_password=False)
    with connect(server) as conn:
        return set(conn.exec_driver_sql("SELECT datname FROM pg_database").scalars())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- servers ------------------------------------------------------------------------


def test_servers_answer_with_postgresql_15_or_later(pg_servers: list[str]) -> None:
    assert len(pg_servers) == 2
    for url in pg_servers:
        assert make_url(url).drivername == "postgresql+psycopg"
        assert str(scalar(url, "SELECT version()")).startswith("PostgreSQL ")
        assert int(str(scalar(url, "SHOW server_version_num"))) >= 150000


def test_servers_are_configured_for_moves(pg_provider: PostgresServers) -> None:
    assert pg_provider.source in {"env", "initdb", "docker"}
    for url in pg_provider.urls:
        with connect(url) as conn:
            assert conn.exec_driver_sql(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).scalar()
            if pg_provider.source == "env":
                continue  # someone else's servers: their settings are theirs
            show = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("wal_level", "fsync", "max_connections", "max_replication_slots")
            }
        assert show == {
            "wal_level": "logical",
            "fsync": "off",
            "max_connections": "400",
            "max_replication_slots": "32",
        }


def test_the_two_servers_are_distinct(pg_provider: PostgresServers) -> None:
    a, b = pg_provider.urls
    if pg_provider.source == "env" and a == b:
        assert make_url(a).port == make_url(b).port  # one URL given: reused, as documented
        return
    ident = "SELECT system_identifier FROM pg_control_system()"
    assert scalar(a, ident) != scalar(b, ident) or make_url(a).port != make_url(b).port


def test_no_postgresql_gives_one_clear_message() -> None:
    servers = PostgresServers(env={}, bindir=None, docker=False)
    with pytest.raises(NoPostgresAvailable) as caught:
        servers.start()
    message = str(caught.value)
    assert caught.value.tried == (
        f"{URLS_ENV}: not set",
        "initdb: no PostgreSQL server binaries found",
        "Docker: no daemon answers",
    )
    for hint in ("install the PostgreSQL server binaries", f"set {URLS_ENV}", "Docker"):
        assert hint in message
    assert isinstance(caught.value, RuntimeError)


def test_failing_binaries_are_reported_not_hidden(tmp_path: Path) -> None:
    for exe in ("initdb", "pg_ctl", "postgres"):
        (tmp_path / exe).write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
        (tmp_path / exe).chmod(0o755)
    servers = PostgresServers(env={}, bindir=tmp_path, docker=False)
    with (
        pytest.warns(RuntimeWarning, match="throwaway PostgreSQL failed"),
        pytest.raises(NoPostgresAvailable) as caught,
    ):
        servers.start()
    assert caught.value.tried[1].startswith(f"initdb in {tmp_path}: initdb failed")


def test_find_pg_bindir_returns_a_directory_with_the_server_binaries() -> None:
    bindir = find_pg_bindir()
    if bindir is not None:
        assert {"initdb", "pg_ctl", "postgres"} <= {p.name for p in bindir.iterdir()}


def test_env_urls_are_used_as_given_and_reused_in_turn(pg_servers: list[str]) -> None:
    plain = make_url(pg_servers[0]).set(drivername="postgresql")
    env = {URLS_ENV: f" {plain.render_as_string(hide_password=False)} ,"}
    with PostgresServers(2, env=env, bindir=None, docker=False) as servers:
        assert servers.source == "env"
        assert servers.urls == [pg_servers[0], pg_servers[0]]


def test_env_url_that_does_not_answer_is_named_without_its_password() -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{closed_port()}/postgres"
    with pytest.raises(NoPostgresAvailable) as caught:
        PostgresServers(env={URLS_ENV: url}).start()
    assert "does not answer" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_env_url_of_another_database_is_refused() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        PostgresServers(env={URLS_ENV: "mysql://root@127.0.0.1/x"}).start()


def test_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PostgresServers(0)


# -- throwaway servers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bindir() -> Path:
    found = find_pg_bindir()
    if found is None:
        # visible in the -ra summary; the provider itself never skips
        pytest.skip("no PostgreSQL server binaries here: TempPostgres cannot be tested")
    return found


def test_temp_postgres_settings_override_defaults_and_stop_removes_it(bindir: Path) -> None:
    with TempPostgres.start(name="tenantry-test", settings={"wal_level": "replica"}) as server:
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/postgres"
        assert scalar(server.url, "SHOW wal_level") == "replica"
        assert scalar(server.url, "SHOW synchronous_commit") == "off"
        directory = server.directory
    assert not directory.exists()
    with pytest.raises(sa.exc.OperationalError):
        scalar(server.url, "SELECT 1")
    server.stop()  # idempotent


def test_temp_postgres_is_removed_when_its_process_exits_without_stop(bindir: Path) -> None:
    script = (
        "from tenantry.testing import TempPostgres\n"
        "s = TempPostgres.start(name='tenantry-test')\n"
        "print(s.directory, s.port)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    directory, port = Path(out[0]), int(out[1])
    assert not directory.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_temp_postgres_rejects_bad_settings_before_starting() -> None:
    with pytest.raises(ValueError, match="port="):
        TempPostgres.start(settings={"port": "5432"})
    with pytest.raises(ValueError, match="setting name"):
        TempPostgres.start(settings={"wal_level = logical; x": "1"})


# -- databases ------------------------------------------------------------------------


def test_fresh_databases_are_distinct_and_empty(pg_url: str, pg_url2: str) -> None:
    assert make_url(pg_url).database != make_url(pg_url2).database
    assert make_url(pg_url).port != make_url(pg_url2).port or pg_url != pg_url2
    for url in (pg_url, pg_url2):
        with connect(url) as conn:
            assert conn.exec_driver_sql("SELECT current_database()").scalar() == (
                make_url(url).database
            )
            tables = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            ).scalar()
            assert tables == 0


def test_default_names_are_random_t_hex(make_pg_database: DatabaseFactory) -> None:
    names = {make_url(make_pg_database()).database for _ in range(3)}
    assert len(names) == 3
    assert all(n is not None and n.startswith("t_") for n in names)


def test_factory_drops_every_database_it_made(pg_servers: list[str]) -> None:
    with DatabaseFactory(pg_servers) as factory:
        made = [factory(0), factory(1), factory(1)]
        for url in made:
            assert make_url(url).database in databases(url)
            scalar(url, "SELECT 1")
        with pytest.raises(IndexError):
            factory(2)
    for url in made:
        assert make_url(url).database not in databases(url)


def test_create_database_from_a_template(make_pg_database: DatabaseFactory) -> None:
    template = make_pg_database()
    with connect(template) as conn:
        conn.exec_driver_sql("CREATE TABLE t (id int PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1), (2)")
        conn.commit()
    by_url = make_pg_database(template=template)
    by_name = make_pg_database(template=make_url(template).database)
    for url in (by_url, by_name):
        assert scalar(url, "SELECT sum(id) FROM t") == 3


def test_odd_names_are_quoted(pg_servers: list[str]) -> None:
    odd = ['We"ird näme', "it's %s; DROP", "a?b/c#d@e:f", "x" * 63]
    for name in odd:
        url = create_database(pg_servers[0], name)
        try:
            assert make_url(url).database == name
            assert scalar(url, "SELECT current_database()") == name
        finally:
            drop_database(url)
        assert name not in databases(pg_servers[0])


def test_names_postgresql_would_truncate_are_refused(pg_servers: list[str]) -> None:
    with pytest.raises(ValueError, match="63 bytes"):
        create_database(pg_servers[0], "é" * 32)


def test_drop_database_disconnects_sessions_and_ignores_missing(pg_servers: list[str]) -> None:
    url = create_database(pg_servers[0])
    engine = sa.create_engine(url)
    try:
        conn = engine.connect()
        conn.exec_driver_sql("SELECT 1")
        drop_database(url)  # WITH (FORCE) ends the session above
        drop_database(url)
        with pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    assert make_url(url).database not in databases(pg_servers[0])
    with pytest.raises(ValueError, match="system database"):
        drop_database(pg_servers[0])


def test_create_database_is_quick(pg_servers: list[str]) -> None:
    drop_database(create_database(pg_servers[0]))  # the first one warms caches
    started = time.perf_counter()
    url = create_database(pg_servers[0])
    elapsed = time.perf_counter() - started
    drop_database(url)
    assert elapsed < 2.0, f"CREATE DATABASE took {elapsed:.2f}s"


# -- the SQLite/PostgreSQL parametrization ---------------------------------------------


def test_db_url_runs_once_per_backend(db_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.id
    assert make_url(db_url).get_backend_name() == backend
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id integer PRIMARY KEY)")
            conn.exec_driver_sql("INSERT INTO t VALUES (7)")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT id FROM t").scalar() == 7
    finally:
        engine.dispose()


def test_sqlite_url_is_a_file_in_tmp_path(sqlite_url: str, tmp_path: Path) -> None:
    assert sqlite_url == f"sqlite:///{tmp_path / 'tenantry.db'}"
