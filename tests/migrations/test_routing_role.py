"""Routing roles that row-level security would not bind are refused.

A shared PostgreSQL shard whose routing role (its ``url``) is a superuser, has
BYPASSRLS, owns the tenant tables, is a member of a superuser role, or is the
operations role is refused at ``shard add`` (library and CLI), ``shard create``,
``promote --server`` and when a router first opens its engine. The override (the
setting, the CLI flags) lets each through with a warning every time it is used.
``tenantry shard secure`` turns a superuser-URL shard into a safe one.

Every test here runs without the suite's override (``strict_routing_role``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fleet_helpers import PASSWORD, Cli, database_exists, query, with_password
from sqlalchemy.engine import make_url

from tenantry import (
    AsyncRouter,
    Catalog,
    Router,
    ShardUnavailable,
    UnsafeRoutingRole,
    load_settings,
    migrations,
    moves,
)
from tenantry.demo import MIGRATIONS
from tenantry.migrations import rls
from tenantry.migrations.provision import drop_database
from tenantry.settings import TenantrySettings
from tenantry.shardmap import roles
from tenantry.shardmap.operations import operator_transaction
from tenantry.testing import DatabaseFactory

pytestmark = pytest.mark.strict_routing_role

#: How the test cases make an unsafe routing role; what the refusal says about it.
CASES = ["superuser", "bypassrls", "owner", "member", "operations"]
OVERRIDE = "--allow-unsafe-routing-role override"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    settings = load_settings(
        catalog_url=url, alembic_config=str(MIGRATIONS), allow_unsafe_routing_role=False
    )
    with Catalog(url, settings=settings) as cat:
        cat.init()
        yield cat


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def overrides(logs: pytest.LogCaptureFixture) -> list[str]:
    """The override's warnings logged so far."""
    return [
        r.getMessage()
        for r in logs.records
        if r.name == "tenantry.security"
        and r.levelno == logging.WARNING
        and OVERRIDE in r.getMessage()
    ]


def cli(catalog: Catalog) -> Cli:
    return Cli(catalog.settings.catalog_url, {"TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)})


def state(catalog: Catalog) -> tuple[int, list[Any]]:
    snap = catalog.snapshot()
    return snap.version, sorted(dataclasses.asdict(s) for s in snap.shards.values())


def settings_of(catalog: Catalog, *, allow: bool) -> TenantrySettings:
    return catalog.settings.model_copy(update={"allow_unsafe_routing_role": allow})


@dataclasses.dataclass
class Unsafe:
    """A database whose routing URL is unsafe in one way."""

    url: str  # the routing URL
    admin_url: str | None
    role: str
    problem: str  # what the refusal says


@pytest.fixture
def unsafe(
    make_pg_database: DatabaseFactory, make_role: Callable[..., str], pg_servers: list[str]
) -> Iterator[Callable[[str], Unsafe]]:
    """``unsafe(case)``: a fresh database (server 0) and a routing URL unsafe as *case*."""
    owned: list[str] = []  # databases given to a test role: given back before it is dropped

    def make(case: str) -> Unsafe:
        database = make_pg_database(0)
        admin = with_password(database)
        if case == "superuser":
            role = make_role("SUPERUSER")
            return Unsafe(with_password(database, user=role), admin, role, "is a superuser")
        if case == "bypassrls":
            role = make_role("NOSUPERUSER BYPASSRLS")
            return Unsafe(with_password(database, user=role), admin, role, "has BYPASSRLS")
        if case == "owner":
            role = make_role()
            query(admin, "CREATE TABLE sites (tenant_id text, id int)")
            query(admin, f'ALTER TABLE sites OWNER TO "{role}"')
            return Unsafe(with_password(database, user=role), admin, role, "owns public.sites")
        if case == "member":
            boss, role = make_role("SUPERUSER"), make_role()
            query(pg_servers[0], f'GRANT "{boss}" TO "{role}"')
            problem = f"is a member of superuser or BYPASSRLS role(s) '{boss}'"
            return Unsafe(with_password(database, user=role), admin, role, problem)
        assert case == "operations"
        role = make_role()  # NOSUPERUSER NOBYPASSRLS: only being the operations role is wrong
        query(admin, f'ALTER DATABASE "{make_url(database).database}" OWNER TO "{role}"')
        owned.append(str(make_url(database).database))
        return Unsafe(with_password(database, user=role), None, role, "is the operations role")

    yield make
    for name in owned:
        query(pg_servers[0], f'ALTER DATABASE "{name}" OWNER TO CURRENT_USER')


@pytest.fixture
def routing_role(pg_servers: list[str]) -> Iterator[str]:
    """A fresh name for ``shard secure``'s role; the role is dropped after the test."""
    name = f"rr_{secrets.token_hex(4)}"
    yield name
    if not query(pg_servers[0], "SELECT 1 FROM pg_roles WHERE rolname = :r", r=name):
        return
    databases = query(
        pg_servers[0], "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
    )
    for (database,) in databases:
        url = make_url(pg_servers[0]).set(database=database).render_as_string(hide_password=False)
        query(url, f'DROP OWNED BY "{name}"')
    query(pg_servers[0], f'DROP ROLE "{name}"')


@pytest.fixture
def new_database(pg_servers: list[str]) -> Iterator[Callable[[], str]]:
    """Fresh database names on server 0; whatever exists under them is dropped after."""
    names: list[str] = []

    def make() -> str:
        names.append(f"r_{secrets.token_hex(4)}")
        return names[-1]

    yield make
    for name in names:
        drop_database(make_url(pg_servers[0]).set(database=name).render_as_string(False))


def assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# -- the check itself -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_the_check_names_what_is_wrong(case: str, unsafe: Callable[[str], Unsafe]) -> None:
    made = unsafe(case)
    engine = sa.create_engine(make_url(made.url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            found = roles.check_role(
                conn, operations_role=make_url(made.admin_url or made.url).username
            )
    finally:
        engine.dispose()
    assert found.role == made.role and not found.safe
    assert made.problem in ", ".join(found.problems)


def test_a_routing_role_that_owns_nothing_is_safe(
    pg_url: str, make_role: Callable[..., str]
) -> None:
    app = make_role()
    engine = sa.create_engine(make_url(with_password(pg_url, user=app)))
    try:
        with engine.connect() as conn:
            found = roles.check_role(conn, operations_role="postgres")
    finally:
        engine.dispose()
    assert found.safe and found.problems == [] and found.refusal("s1") is None
    # PUBLIC may create temporary tables in a new database: a caution, not a refusal
    assert found.temporary and found.cautions == ["may create TEMPORARY tables"]


def test_scram_verifier_matches_rfc_7677() -> None:
    # RFC 7677's example exchange: user "user", password "pencil"
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = rls.scram_sha_256("pencil", salt=salt)
    head, keys = verifier.split("$", 1)[1].split("$")
    assert verifier.startswith("SCRAM-SHA-256$4096:") and head.endswith(":W22ZaJ0SNY7soEsUEjb6gQ==")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = (
        f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        f"c=biws,r={nonce}"
    )
    signature = hmac.new(server_key, auth.encode(), "sha256").digest()
    assert base64.b64encode(signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth.encode(), "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key


# -- shard add ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_shard_add_refuses_an_unsafe_routing_role(
    case: str,
    catalog: Catalog,
    unsafe: Callable[[str], Unsafe],
    logs: pytest.LogCaptureFixture,
) -> None:
    made = unsafe(case)
    before = state(catalog)
    with pytest.raises(UnsafeRoutingRole) as info:
        catalog.add_shard("s1", made.url, admin_url=made.admin_url)
    error = info.value
    assert (error.shard, error.role) == ("s1", made.role)
    assert_one_line(
        str(error),
        "shard 's1'",
        f"'{made.role}'",
        made.problem,
        "tenantry shard add s1 URL --secure",
    )
    assert state(catalog) == before  # nothing registered, map version unchanged

    # the CLI: one line, exit 1, nothing registered
    args = ["shard", "add", "s1", made.url] + (
        ["--admin-url", made.admin_url] if made.admin_url else []
    )
    line = cli(catalog).error(*args)
    assert_one_line(line, "error: shard 's1'", made.role, made.problem, "--secure")
    assert state(catalog) == before

    # the override lets it through, with a warning each time it is used
    assert overrides(logs) == []
    shard = catalog.add_shard(
        "s1", made.url, admin_url=made.admin_url, allow_unsafe_routing_role=True
    )
    assert shard.name == "s1"
    (warning,) = overrides(logs)
    assert_one_line(warning, "shard 's1'", made.role, made.problem, "tenantry shard secure s1")
    assert PASSWORD not in warning


def test_the_override_warns_on_the_cli_and_every_time(
    catalog: Catalog, unsafe: Callable[[str], Unsafe], logs: pytest.LogCaptureFixture
) -> None:
    first, second = unsafe("superuser"), unsafe("bypassrls")
    run = cli(catalog)
    flag = run.invoke(
        "shard", "add", "s1", first.url, "--admin-url", str(first.admin_url),
        "--allow-unsafe-routing-role",
    )  # fmt: skip
    (line,) = flag.stderr.splitlines()
    assert line.startswith("warning: shard 's1': the routing role") and OVERRIDE in line
    # the setting does the same as the flag
    env = {"TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE": "1"}
    run = cli(catalog)
    setting = run.invoke(
        "shard", "add", "s2", second.url, "--admin-url", str(second.admin_url), env=env
    )
    (line,) = setting.stderr.splitlines()
    assert line.startswith("warning: shard 's2'") and "has BYPASSRLS" in line
    assert [s.name for s in catalog.list_shards()] == ["s1", "s2"]
    assert len(overrides(logs)) == 2
    assert PASSWORD not in flag.output + setting.output


def test_a_dedicated_shard_and_a_safe_role_pass(
    catalog: Catalog,
    unsafe: Callable[[str], Unsafe],
    pg_url: str,
    make_role: Callable[..., str],
    logs: pytest.LogCaptureFixture,
) -> None:
    made = unsafe("superuser")
    catalog.add_shard("d1", made.url, admin_url=made.admin_url, tier="dedicated")
    app = make_role()
    catalog.add_shard("s1", with_password(pg_url, user=app), admin_url=with_password(pg_url))
    assert [s.name for s in catalog.list_shards()] == ["d1", "s1"]
    assert overrides(logs) == []


# -- shard create --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["superuser", "bypassrls", "member", "operations"])
def test_shard_create_refuses_an_unsafe_routing_role(
    case: str,
    catalog: Catalog,
    make_role: Callable[..., str],
    new_database: Callable[[], str],
    pg_servers: list[str],
) -> None:
    server = with_password(pg_servers[0])
    routing: str | None = None
    if case == "superuser":
        routing = with_password(server, user=make_role("SUPERUSER"))
    elif case == "bypassrls":
        routing = with_password(server, user=make_role("NOSUPERUSER BYPASSRLS"))
    elif case == "member":
        boss, role = make_role("SUPERUSER"), make_role()
        query(server, f'GRANT "{boss}" TO "{role}"')
        routing = with_password(server, user=role)
    name = new_database()
    before = state(catalog)
    with pytest.raises(UnsafeRoutingRole) as info:
        migrations.provision(catalog, name, server, tier="shared", routing_url=routing)
    assert_one_line(str(info.value), f"shard '{name}'")
    assert state(catalog) == before
    assert not database_exists(server, name)  # dropped again, or never made

    args = ["shard", "create", name, "--server", server, "--tier", "shared"]
    line = cli(catalog).error(*args, *(["--routing-url", routing] if routing else []))
    assert_one_line(line, "error: ", f"shard '{name}'")
    if case == "operations":
        assert "is the operations role" in line and "--secure" in line
    assert state(catalog) == before and not database_exists(server, name)


def test_shard_create_with_the_override_and_with_secure(
    catalog: Catalog,
    new_database: Callable[[], str],
    routing_role: str,
    pg_servers: list[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    server = with_password(pg_servers[0])
    loose = new_database()
    result = cli(catalog).invoke(
        "shard", "create", loose, "--server", server, "--tier", "shared",
        "--allow-unsafe-routing-role",
    )  # fmt: skip
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"warning: shard '{loose}'") and OVERRIDE in line

    safe = new_database()
    doc = cli(catalog).json(
        "shard", "create", safe, "--server", server, "--tier", "shared", "--secure",
        "--role", routing_role,
    )  # fmt: skip
    assert doc["url"].startswith(f"postgresql+psycopg://{routing_role}:***@")
    shard = catalog.get_shard(safe)
    assert make_url(shard.url).username == routing_role
    assert shard.admin_url is not None and make_url(shard.admin_url).username == "postgres"
    assert query(shard.url, "SELECT current_user") == [(routing_role,)]
    password = make_url(shard.url).password
    assert password and password not in json.dumps(doc) + logs.text


# -- promote --server ----------------------------------------------------------------------


@pytest.fixture
def shared_fleet(
    catalog: Catalog, make_pg_database: DatabaseFactory, make_role: Callable[..., str]
) -> Callable[[bool], Catalog]:
    """``shared_fleet(superuser)``: shard s1 (routing as the superuser, or as a role of
    its own) holding tenant acme with two chargers, migrated."""

    def make(superuser: bool) -> Catalog:
        url = make_pg_database(0)
        routing = with_password(url) if superuser else with_password(url, user=make_role())
        catalog.add_shard(
            "s1", routing, admin_url=with_password(url), allow_unsafe_routing_role=True
        )
        assert migrations.upgrade(catalog, jobs=1).ok
        catalog.add_tenant("acme", shard="s1")
        query(
            with_password(url),
            "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status) VALUES "
            "('acme', 1, 'a1', 'x', 22, 'available'), ('acme', 2, 'a2', 'x', 50, 'available')",
        )
        return catalog

    return make


def test_promote_refuses_to_route_as_the_operations_role(
    shared_fleet: Callable[[bool], Catalog],
    new_database: Callable[[], str],
    pg_servers: list[str],
    logs: pytest.LogCaptureFixture,
) -> None:
    catalog = shared_fleet(True)  # acme routes as the superuser: derived, it is the operations role
    server = with_password(pg_servers[0])
    database = new_database()
    before = state(catalog)
    with pytest.raises(UnsafeRoutingRole) as info:
        moves.promote(catalog, "acme", server=server, database=database)
    assert_one_line(
        str(info.value), f"shard '{database}'", "is the operations role", "--routing-url"
    )
    assert state(catalog) == before and moves.list_moves(catalog) == []
    assert not database_exists(server, database)
    args = ["promote", "acme", "--server", server, "--database", database, "--json"]
    line = cli(catalog).error(*args)
    assert_one_line(line, "error: ", "is the operations role", "--routing-url")
    assert state(catalog) == before and moves.list_moves(catalog) == []
    assert catalog.get_tenant("acme").shard == "s1"

    # the override lets it through, with its warning
    result = cli(catalog).invoke(
        "promote", "acme", "--server", server, "--database", database,
        "--allow-unsafe-routing-role", "--mode", "offline", "--json",
    )  # fmt: skip
    assert json.loads(result.stdout)["state"] == "cleaned"
    assert [line for line in result.stderr.splitlines() if OVERRIDE in line]
    assert catalog.get_tenant("acme").shard == database


def test_promote_routes_as_the_tenants_routing_role_or_the_one_given(
    shared_fleet: Callable[[bool], Catalog],
    new_database: Callable[[], str],
    pg_servers: list[str],
    make_role: Callable[..., str],
    logs: pytest.LogCaptureFixture,
) -> None:
    catalog = shared_fleet(False)
    app = make_url(catalog.get_shard("s1").url).username
    server = with_password(pg_servers[0])
    first = new_database()
    done = moves.promote(catalog, "acme", server=server, database=first, mode="offline")
    assert done.succeeded
    shard = catalog.get_shard(first)
    assert make_url(shard.url).username == app  # derived: the role acme routed as
    assert shard.admin_url is not None and make_url(shard.admin_url).username == "postgres"
    assert query(shard.admin_url, "SELECT count(*) FROM chargers") == [(2,)]
    # granted; and acme is the new database's constant (shard revision s0007): its only
    # tenant's rows, even without the router's fence
    assert query(shard.url, "SELECT count(*) FROM chargers") == [(2,)]
    assert overrides(logs) == []

    # back to the pool, then out again with a routing role of its own
    moves.demote(catalog, "acme", to="s1", mode="offline")
    other, role = new_database(), make_role()
    moves.promote(
        catalog, "acme", server=server, database=other,
        routing_url=with_password(server, user=role), mode="offline",
    )  # fmt: skip
    assert make_url(catalog.get_shard(other).url).username == role
    assert overrides(logs) == []


# -- the router ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_router_refuses_an_unsafe_routing_role_on_opening_the_engine(
    case: str,
    catalog: Catalog,
    unsafe: Callable[[str], Unsafe],
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = unsafe(case)
    catalog.add_shard("s1", made.url, admin_url=made.admin_url, allow_unsafe_routing_role=True)
    catalog.add_tenant("acme", shard="s1")
    checks: list[str] = []
    real = roles.check_dbapi_role

    def counted(*args: Any, **kwargs: Any) -> roles.RoleCheck:
        found = real(*args, **kwargs)
        checks.append(found.role)
        return found

    monkeypatch.setattr(roles, "check_dbapi_role", counted)

    strict = Router(
        catalog=catalog, settings=settings_of(catalog, allow=False), listen=False, background=False
    )
    try:
        for _ in range(2):  # refused each time, never served
            with pytest.raises(UnsafeRoutingRole) as info, strict.connection("acme"):
                pytest.fail("a connection was served")
            assert_one_line(
                str(info.value), "shard 's1'", made.role, made.problem, "tenantry shard secure s1"
            )
    finally:
        strict.close()
    assert checks == [made.role, made.role]

    checks.clear()
    logs.clear()
    for _ in range(2):  # a warning each time a router opens the engine: once per engine
        loose = Router(
            catalog=catalog,
            settings=settings_of(catalog, allow=True),
            listen=False,
            background=False,
        )
        try:
            for _ in range(3):
                with loose.connection("acme") as conn:
                    assert conn.execute(sa.text("SELECT current_user")).scalar() == made.role
        finally:
            loose.close()
    assert checks == [made.role, made.role]  # one query per engine, not per transaction
    assert len(overrides(logs)) == 2


def test_an_async_router_refuses_too(
    catalog: Catalog, unsafe: Callable[[str], Unsafe], logs: pytest.LogCaptureFixture
) -> None:
    made = unsafe("bypassrls")
    catalog.add_shard("s1", made.url, admin_url=made.admin_url, allow_unsafe_routing_role=True)
    catalog.add_tenant("acme", shard="s1")

    async def current_user(allow: bool) -> str:
        settings = settings_of(catalog, allow=allow)
        router = AsyncRouter(catalog=catalog, settings=settings, listen=False, background=False)
        try:
            async with router.connection("acme") as conn:
                return str((await conn.execute(sa.text("SELECT current_user"))).scalar())
        finally:
            await router.close()

    with pytest.raises(UnsafeRoutingRole, match="has BYPASSRLS"):
        asyncio.run(current_user(False))
    logs.clear()
    assert asyncio.run(current_user(True)) == made.role
    assert len(overrides(logs)) == 1


def test_a_router_on_a_safe_role_checks_once_and_says_nothing(
    catalog: Catalog, pg_url: str, make_role: Callable[..., str], logs: pytest.LogCaptureFixture
) -> None:
    app = make_role()
    catalog.add_shard("s1", with_password(pg_url, user=app), admin_url=with_password(pg_url))
    catalog.add_tenant("acme", shard="s1")
    # adding it cautioned: PUBLIC may create temporary tables there (until migrated)
    (caution,) = [r.getMessage() for r in logs.records if r.name == "tenantry.security"]
    assert_one_line(caution, f"shard 's1': the routing role '{app}' may create TEMPORARY")
    # ...and the shard itself refuses to route as it until that is taken away
    with Router(catalog=catalog, listen=False, background=False) as router:
        with pytest.raises(ShardUnavailable, match="may create temporary tables"):
            with router.connection("acme"):
                pytest.fail("routed as a role that may create temporary tables")
    with operator_transaction(catalog.get_shard("s1")) as conn:
        rls.grant_routing_role(conn, app)  # what migrate upgrade does
    logs.clear()
    with Router(catalog=catalog, listen=False, background=False) as router:
        for _ in range(3):
            with router.connection("acme") as conn:
                assert conn.execute(sa.text("SELECT current_user")).scalar() == app
    assert [r for r in logs.records if r.name == "tenantry.security"] == []


# -- shard secure ---------------------------------------------------------------------------


def test_shard_secure_turns_a_superuser_url_into_a_safe_routing_role(
    catalog: Catalog,
    make_pg_database: DatabaseFactory,
    routing_role: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    url = with_password(make_pg_database(0))
    catalog.add_shard("s1", url, allow_unsafe_routing_role=True)  # one superuser URL
    assert migrations.upgrade(catalog, jobs=1).ok
    for tenant in ("a", "b"):
        catalog.add_tenant(tenant, shard="s1")
    query(
        url,
        "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status) VALUES "
        "('a', 1, 'a1', 'x', 22, 'available'), ('a', 2, 'a2', 'x', 50, 'available'), "
        "('b', 1, 'b1', 'y', 11, 'available')",
    )
    strict = settings_of(catalog, allow=False)
    with Router(catalog=catalog, settings=strict, listen=False, background=False) as router:
        with pytest.raises(UnsafeRoutingRole, match="run `tenantry shard secure s1`"):
            with router.connection("a"):
                pass
    version = catalog.map_version()

    run = cli(catalog)
    result = run.invoke("shard", "secure", "s1", "--role", routing_role, "--json")
    assert result.exit_code == 0, result.output
    (doc,) = json.loads(result.stdout)["secured"]
    assert doc["name"] == "s1" and doc["role"] == routing_role
    assert (doc["role_created"], doc["password"], doc["changed"]) == (True, "generated", True)
    assert doc["url"].startswith(f"postgresql+psycopg://{routing_role}:***@")
    assert doc["admin_url"].startswith("postgresql+psycopg://postgres:***@")
    shard = catalog.get_shard("s1")
    assert make_url(shard.url).username == routing_role
    assert shard.admin_url == url.replace("postgresql://", "postgresql+psycopg://")
    assert catalog.map_version() == version + 1
    password = make_url(shard.url).password
    assert password and len(password) >= 32

    # the role: what routing needs and nothing that bypasses the policies
    (attributes,) = query(
        url,
        "SELECT rolsuper, rolbypassrls, rolcreatedb, rolcreaterole, rolinherit, rolcanlogin"
        " FROM pg_roles WHERE rolname = :r",
        r=routing_role,
    )
    assert attributes == (False, False, False, False, False, True)
    # the server was sent a SCRAM verifier, not the password
    (stored,) = query(url, "SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=routing_role)
    assert stored[0].startswith("SCRAM-SHA-256$4096:") and password not in stored[0]

    # a router now routes as it, and sees only its tenant's rows
    with Router(catalog=catalog, settings=strict, listen=False, background=False) as router:
        for tenant, names in (("a", ["a1", "a2"]), ("b", ["b1"])):
            with router.connection(tenant) as conn:
                assert conn.execute(sa.text("SELECT current_user")).scalar() == routing_role
                found = conn.execute(sa.text("SELECT name FROM chargers ORDER BY name")).scalars()
                assert list(found) == names

    # again: nothing to change, the password kept
    again = run.json("shard", "secure", "s1", "--role", routing_role)
    (doc,) = again["secured"]
    assert (doc["role_created"], doc["password"], doc["changed"]) == (False, "kept", False)
    assert catalog.get_shard("s1") == shard and catalog.map_version() == version + 1
    text = run("shard", "secure", "s1", "--role", routing_role)
    assert f"shard s1 routes as {routing_role} already" in text

    # the migration keeps granting it; nothing to warn about
    upgraded = run.json("migrate", "upgrade")
    assert upgraded["shards"][0]["warnings"] == []
    # the password was never shown nor logged
    assert password not in result.output + json.dumps(again) + text + json.dumps(upgraded)
    assert password not in logs.text


def test_shard_secure_all_and_shard_add_secure_share_one_role(
    catalog: Catalog,
    make_pg_database: DatabaseFactory,
    routing_role: str,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    urls = [with_password(make_pg_database(0)) for _ in range(3)]
    catalog.add_shard("s1", urls[0], allow_unsafe_routing_role=True)
    catalog.add_shard("d1", urls[1], tier="dedicated")
    catalog.add_shard("lite", f"sqlite:///{tmp_path / 'lite.db'}")
    run = cli(catalog)
    doc = run.json("shard", "secure", "--all", "--role", routing_role)
    assert [(d["name"], d["role_created"], d["password"]) for d in doc["secured"]] == [
        ("d1", True, "generated"),
        ("s1", False, "kept"),  # the password the catalog knows for that role
    ]
    passwords = {make_url(catalog.get_shard(n).url).password for n in ("d1", "s1")}
    assert len(passwords) == 1

    # a new shard added with --secure routes as the same role at once
    out = run.json("shard", "add", "s2", urls[2], "--secure", "--role", routing_role)
    assert out["url"].startswith(f"postgresql+psycopg://{routing_role}:***@")
    assert make_url(catalog.get_shard("s2").url).password in passwords
    assert query(catalog.get_shard("s2").url, "SELECT current_user") == [(routing_role,)]

    # SQLite has no roles: one line
    line = run.error("shard", "secure", "lite")
    assert_one_line(line, "error: shard 'lite' is SQLite")
    (password,) = passwords
    assert password not in json.dumps(doc) + json.dumps(out) + logs.text


def test_shard_secure_refuses_the_operations_role_and_foreign_roles(
    catalog: Catalog, make_pg_database: DatabaseFactory, make_role: Callable[..., str]
) -> None:
    url = with_password(make_pg_database(0))
    catalog.add_shard("s1", url, allow_unsafe_routing_role=True)
    run = cli(catalog)
    line = run.error("shard", "secure", "s1", "--role", "postgres")
    assert_one_line(line, "error: shard 's1': 'postgres' is the operations role")
    other = make_role()  # a role tenantry did not make, and that s1 does not route as
    line = run.error("shard", "secure", "s1", "--role", other)
    assert_one_line(line, f"error: role '{other}' exists", "not made by tenantry")
    assert run.error("shard", "secure", status=2)
    assert catalog.get_shard("s1").url == url.replace("postgresql://", "postgresql+psycopg://")
