"""Statements that say whose they are: sqlcommenter comments, seen by the server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from obshelpers import ObsFleet

from tenantry.demo.models import User
from tenantry.migrations import upgrade
from tenantry.observability import sqlcomment, statement_route
from tenantry.observability.comments import with_comment
from tenantry.testing import TempPostgres, create_database

COMMENT = "/*route='%2Fcharges',tenant='acme'*/"


def activity(fleet: ObsFleet, shard: str, pid: int) -> str:
    """What pg_stat_activity shows as *pid*'s latest statement."""
    with fleet.engine(shard).connect() as conn:
        query = sa.text("SELECT query FROM pg_stat_activity WHERE pid = :p")
        return str(conn.execute(query, {"p": pid}).scalar_one())


def test_format_keys_sorted_values_quoted() -> None:
    assert sqlcomment(tenant="acme", route="/charges") == COMMENT
    assert sqlcomment(tenant="acme", route=None) == "/*tenant='acme'*/"
    assert sqlcomment() == ""
    nasty = sqlcomment(route="x'*/; DROP TABLE users; --\\")
    assert nasty == "/*route='x%27%2A%2F%3B%20DROP%20TABLE%20users%3B%20--%5C'*/"
    assert re.fullmatch(r"/\*route='[A-Za-z0-9_.~%-]*'\*/", nasty)


def test_where_the_comment_goes() -> None:
    c = "/*tenant='a'*/"
    assert with_comment("SELECT 1", c) == "SELECT 1 /*tenant='a'*/"
    assert with_comment("SELECT 1 ;  ", c) == "SELECT 1 /*tenant='a'*/;"
    assert with_comment("SELECT 1 -- why", c) == "SELECT 1 -- why\n/*tenant='a'*/"
    assert with_comment("SELECT 1 /*mine*/", c) == "SELECT 1 /*mine*/"


def test_routed_statements_commented_in_pg_stat_activity(fleet: ObsFleet) -> None:
    fleet.seed("acme", "s1")
    router = fleet.router(statement_comments=True)
    with statement_route("/charges"), router.session("acme") as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert activity(fleet, "s1", pid) == f"SELECT pg_backend_pid() {COMMENT}"
        # a statement with parameters (psycopg's %(name)s): the escapes come through
        users = session.scalars(sa.select(User).where(User.id < 3)).all()
        assert len(users) == 3
        seen = activity(fleet, "s1", pid)
        assert seen.startswith("SELECT users.tenant_id, users.id")
        assert seen.endswith(f" {COMMENT}")
    with statement_route("/charges"), router.connection("acme") as conn:
        # no parameters at all (psycopg then reads no placeholders): "%" stays single
        raw = conn.execution_options(no_parameters=True)
        pid = raw.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        assert activity(fleet, "s1", pid) == f"SELECT pg_backend_pid() {COMMENT}"
    with router.connection("acme") as conn:  # no route set: the tenant only
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert activity(fleet, "s1", pid) == "SELECT pg_backend_pid() /*tenant='acme'*/"


def test_a_hostile_route_cannot_break_or_spoof(fleet: ObsFleet) -> None:
    fleet.seed("acme", "s1")
    router = fleet.router(statement_comments=True)
    hostile = "x'*/ DELETE FROM users; /* tenant='globex'"
    with statement_route(hostile), router.session("acme") as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        seen = activity(fleet, "s1", pid)
    assert seen == f"SELECT pg_backend_pid() {sqlcomment(route=hostile, tenant='acme')}"
    assert re.findall(r"tenant='([^']*)'", seen) == ["acme"]
    with fleet.engine("s1").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 5


def test_off_by_default(fleet: ObsFleet) -> None:
    fleet.add_tenant("acme", "s1")
    router = fleet.router()
    with statement_route("/charges"), router.session("acme") as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert activity(fleet, "s1", pid) == "SELECT pg_backend_pid()"


@pytest.fixture(scope="module")
def logging_server() -> Iterator[TempPostgres]:
    """A throwaway server that logs every statement."""
    server = TempPostgres.start(name="tenantry-comments", settings={"log_statement": "all"})
    try:
        yield server
    finally:
        server.stop()


def test_comments_in_the_server_log(logging_server: TempPostgres, fleet_of: Any) -> None:
    fleet = fleet_of()
    fleet.catalog.add_shard("logged", create_database(logging_server.url))
    assert upgrade(fleet.catalog, jobs=1, shards=["logged"]).ok
    fleet.add_tenant("acme", "logged")
    router = fleet.router(statement_comments=True)
    with statement_route("/charges"), router.session("acme") as session:
        session.execute(sa.text("SELECT 'logged-statement'"))
    log = logging_server.log_file.read_text()
    assert f"statement: SELECT 'logged-statement' {COMMENT}" in log
