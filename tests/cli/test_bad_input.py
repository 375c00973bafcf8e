"""Bad input: one clear ``error:`` line, exit status 1 (usage errors 2), no traceback,
and nothing changed in the catalog or on any shard."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy import make_url

from tenantry import Catalog, load_settings
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.schema import residency

if TYPE_CHECKING:
    from tests.cli.conftest import Run

UNREACHABLE = "postgresql://u:S3cretPw@127.0.0.1:1/x"


def everything(catalog: Catalog) -> tuple[int, list[dict[str, object]], dict[str, set[str]]]:
    """The whole state: version, every record field by field, every residency row."""
    snap = catalog.snapshot()
    records = [dataclasses.asdict(s) for s in snap.shards.values()]
    records += [dataclasses.asdict(t) for t in snap.tenants.values()]
    rows: dict[str, set[str]] = {}
    for shard in snap.shards.values():
        with operator_transaction(shard) as conn:
            rows[shard.name] = {
                f"{r.tenant_id}:{r.state}:{r.map_version}"
                for r in conn.execute(sa.select(residency))
            }
    return snap.version, sorted(records, key=repr), rows


@pytest.fixture(scope="module")
def shared_fleet(
    tmp_path_factory: pytest.TempPathFactory, fleet_builder: Callable[[str, Path], Catalog]
) -> Iterator[Catalog]:
    """One fleet for every refusal below: each test proves it changed nothing."""
    directory = tmp_path_factory.mktemp("fleet")
    with fleet_builder(f"sqlite:///{directory / 'catalog.db'}", directory) as catalog:
        yield catalog


@pytest.fixture
def on_fleet(shared_fleet: Catalog, make_run: type[Run]) -> Iterator[Run]:
    """A runner against the shared fleet; fails the test if the catalog or any
    residency table changed."""
    before = everything(shared_fleet)
    yield make_run(shared_fleet.url)
    assert everything(shared_fleet) == before


REFUSED = {
    # invalid tenant ids
    "empty id": (["tenant", "add", ""], "invalid tenant id ''"),
    "64 chars": (["tenant", "add", "a" * 64], "invalid tenant id 'aaaa"),
    "upper case": (["tenant", "add", "Acme"], "invalid tenant id 'Acme'"),
    "space": (["tenant", "add", "ac me"], "invalid tenant id 'ac me'"),
    "single quote": (["tenant", "add", "acme'"], 'invalid tenant id "acme\'"'),
    "double quote": (["tenant", "add", 'ac"me'], "invalid tenant id 'ac\"me'"),
    "sql injection": (["tenant", "add", "'; drop table x; --"], '"\'; drop table x; --"'),
    "leading dash": (["tenant", "add", "--", "-acme"], "invalid tenant id '-acme'"),
    "newline": (["tenant", "add", "acme\nx"], "invalid tenant id 'acme\\nx'"),
    "invalid id shown": (["tenant", "show", "Acme"], "invalid tenant id 'Acme'"),
    "invalid id routed": (["route", "'; drop table x; --"], "invalid tenant id"),
    "invalid id removed": (["tenant", "remove", "ACME"], "invalid tenant id"),
    "invalid id pinned": (["tenant", "pin", "a b"], "invalid tenant id"),
    # duplicates
    "duplicate tenant": (["tenant", "add", "acme"], "tenant 'acme' exists already"),
    "duplicate tenant elsewhere": (
        ["tenant", "add", "acme", "--shard", "s2"],
        "tenant 'acme' exists already (on shard 's1')",
    ),
    "duplicate shard": (["shard", "add", "s1", "sqlite:///other.db"], "shard 's1' exists already"),
    # unknown names
    "unknown shard": (["tenant", "add", "newco", "--shard", "nope"], "unknown shard 'nope'"),
    "unknown shard shown": (["shard", "show", "nope"], "unknown shard 'nope'"),
    "unknown shard listed": (["tenant", "list", "--shard", "nope"], "unknown shard 'nope'"),
    "unknown shard set": (["shard", "set", "nope", "--weight", "2"], "unknown shard 'nope'"),
    "unknown tenant shown": (["tenant", "show", "ghost"], "unknown tenant 'ghost'"),
    "unknown tenant routed": (["route", "ghost"], "unknown tenant 'ghost'"),
    "unknown tenant removed": (["tenant", "remove", "ghost"], "unknown tenant 'ghost'"),
    "unknown tenant pinned": (["tenant", "pin", "ghost"], "unknown tenant 'ghost'"),
    # tiers
    "dedicated on shared": (
        ["tenant", "add", "newco", "--dedicated", "--shard", "s1"],
        "a dedicated tenant cannot live on shared shard 's1'",
    ),
    "shared on dedicated": (
        ["tenant", "add", "newco", "--shard", "d2"],
        "a shared tenant cannot live on dedicated shard 'd2'",
    ),
    "second on dedicated": (
        ["tenant", "add", "newco", "--dedicated", "--shard", "d1"],
        "dedicated shard 'd1' already holds tenant 'regulated'",
    ),
    "dedicated without shard": (["tenant", "add", "newco", "--dedicated"], "needs its own shard"),
    # shards
    "retire with tenants": (["shard", "set", "s1", "--state", "retired"], "still holds 1 tenant"),
    "retire and reweigh": (
        ["shard", "set", "s1", "--weight", "3", "--state", "retired"],
        "drain it before retiring it",
    ),
    "invalid shard name": (["shard", "add", "S-1", "sqlite:///x.db"], "invalid shard name 'S-1'"),
    "mysql shard": (
        ["shard", "add", "s9", "mysql://u@h/db"],
        "'mysql' databases are not supported",
    ),
    "not a url": (["shard", "add", "s9", "not a url"], "not a database URL"),
    "in-memory shard": (["shard", "add", "s9", "sqlite://"], "in-memory SQLite"),
    "no database": (["shard", "add", "s9", "postgresql://u@127.0.0.1:1"], "names no database"),
    "unreachable shard": (["shard", "add", "s9", UNREACHABLE], "cannot reach shard 's9'"),
    "unreachable admin url": (
        ["shard", "add", "s9", "sqlite:///ok.db", "--admin-url", "sqlite:////proc/no/such.db"],
        "shard 's9'",
    ),
    "mixed url kinds": (
        ["shard", "add", "s9", "sqlite:///ok.db", "--admin-url", UNREACHABLE],
        "same kind of database",
    ),
}


@pytest.mark.parametrize(("args", "expected"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_with_one_line_and_no_change(on_fleet: Run, args: list[str], expected: str) -> None:
    message = on_fleet.fail(*args)
    assert expected in message
    assert "S3cretPw" not in message


USAGE = {
    "leading dash without --": (["tenant", "add", "-acme"], "No such option"),
    "nothing to set": (["shard", "set", "s1"], "nothing to change"),
    "bad tier": (
        ["shard", "add", "s9", "sqlite:///x.db", "--tier", "gold"],
        "'gold' is not one of",
    ),
    "negative weight": (["shard", "add", "s9", "sqlite:///x.db", "--weight", "-1"], "-1"),
    "huge weight": (["shard", "set", "s1", "--weight", "10001"], "10001"),
    "bad state": (["shard", "set", "s1", "--state", "gone"], "'gone' is not one of"),
    "missing url": (["shard", "add", "s9"], "Missing argument 'URL'"),
    "missing id": (["route"], "Missing argument 'ID'"),
    "unknown command": (["tenants"], "No such command 'tenants'"),
}


@pytest.mark.parametrize(("args", "expected"), USAGE.values(), ids=USAGE.keys())
def test_usage_errors_exit_2(on_fleet: Run, args: list[str], expected: str) -> None:
    assert expected in on_fleet.fail(*args, status=2)


def test_unreachable_tenant_shard_is_one_line_and_no_change(run: Run, fleet: Catalog) -> None:
    fleet.add_shard("gone", UNREACHABLE, prepare=False)
    before = fleet.snapshot()
    message = run.fail("tenant", "add", "newco", "--shard", "gone")
    assert "cannot reach shard 'gone'" in message and "S3cretPw" not in message
    assert fleet.snapshot() == before


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (UNREACHABLE, "cannot reach the catalog at postgresql://u:***@127.0.0.1:1/x"),
        ("not a url", "not a database URL"),
        ("mysql://u:S3cretPw@127.0.0.1/x", "'mysql' databases are not supported"),
        ("sqlite://", "in-memory SQLite catalog"),
        ("postgresql://u:S3cretPw@127.0.0.1:1", "cannot reach the catalog"),
    ],
)
@pytest.mark.parametrize("command", [["tenant", "list"], ["init"], ["tenant", "add", "acme"]])
def test_bad_catalog_url(run: Run, url: str, expected: str, command: list[str]) -> None:
    message = run.fail(*command, catalog=url)
    assert expected in message
    assert "S3cretPw" not in message


def test_uninitialised_catalog(run: Run, catalog_url: str) -> None:
    for command in (["tenant", "list"], ["shard", "add", "s1", "sqlite:///s.db"], ["route", "a"]):
        message = run.fail(*command)
        assert message.endswith(
            ": run `tenantry init` first, or set TENANTRY_CATALOG_URL to the fleet's catalog"
        )
        assert message.startswith("error: there is no catalog at ")
    # refusing created no file, so no schema either
    assert not Path(make_url(catalog_url).database or "").exists()
    with Catalog(catalog_url, settings=load_settings(catalog_url=catalog_url)) as catalog:
        assert catalog.revision() is None
    run("init")
    assert run.json("shard", "list") == []  # and nothing was half-added before init
