"""Secrets stay secret (DESIGN.md, invariant 7): a password in ``url`` or ``admin_url``
never appears in any output, table or JSON, success or error, nor in logs or reprs.

The PostgreSQL test servers trust local connections, so URLs carrying a password still
connect: the shards below are real databases.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from click.testing import Result

from tenantry import Catalog, load_settings

if TYPE_CHECKING:
    from tenantry.testing import DatabaseFactory
    from tests.cli.conftest import Run

PASSWORD = "S3cretPw"
ADMIN_PASSWORD = "AdmS3cret"


def with_password(url: str, password: str) -> str:
    return sa.make_url(url).set(password=password).render_as_string(hide_password=False)


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and ADMIN_PASSWORD not in text, text


def assert_clean_result(result: Result) -> None:
    assert_clean(result.stdout, result.stderr, result.output)


@pytest.fixture
def pg_shard_urls(make_pg_database: DatabaseFactory) -> tuple[str, str]:
    """Routing and operations URLs, with passwords, of one real PostgreSQL database."""
    url = make_pg_database(0)
    return with_password(url, PASSWORD), with_password(url, ADMIN_PASSWORD)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def test_no_output_shows_a_shard_password(
    run: Run,
    pg_shard_urls: tuple[str, str],
    make_pg_database: DatabaseFactory,
    logs: pytest.LogCaptureFixture,
) -> None:
    url, admin_url = pg_shard_urls
    # a database of its own: one database is never registered as two shards
    url2 = with_password(make_pg_database(0), PASSWORD)
    run("init")
    outputs = [
        run("shard", "add", "pg1", url, "--admin-url", admin_url),
        run("shard", "add", "pg2", url2, "--json", "--weight", "2"),
        run("shard", "add", "pg3", url, "--tier", "dedicated", "--no-prepare"),
        run("tenant", "add", "acme", "--shard", "pg1"),
        run("tenant", "add", "globex", "--json"),
        run("tenant", "add", "reg", "--dedicated", "--shard", "pg3", "--json"),
    ]
    for args in (
        ["shard", "list"],
        ["shard", "show", "pg1"],
        ["shard", "show", "pg2"],
        ["route", "acme"],
        ["route", "reg"],
        ["tenant", "show", "acme"],
        ["tenant", "list"],
        ["shard", "set", "pg2", "--weight", "3"],
        ["init"],
    ):
        outputs += [run(*args), run(*args, "--json")]
    outputs.append(run("tenant", "remove", "globex"))
    # the masked URLs are there, so the test would see a leak if there were one
    shown = run.json("shard", "show", "pg1")
    assert shown["url"] == sa.make_url(url).render_as_string(hide_password=True)
    assert ":***@" in shown["url"] and ":***@" in shown["admin_url"]
    assert ":***@" in run.json("route", "acme")["url"]
    assert_clean(*outputs)
    assert_clean(*(r.getMessage() for r in logs.records))


def test_no_error_shows_a_password(
    run: Run, pg_shard_urls: tuple[str, str], logs: pytest.LogCaptureFixture
) -> None:
    url, admin_url = pg_shard_urls
    run("init")
    run("shard", "add", "pg1", url, "--admin-url", admin_url)
    unreachable = f"postgresql://app:{PASSWORD}@127.0.0.1:1/app"
    no_database = f"postgresql://app:{PASSWORD}@127.0.0.1:1"
    messages = [
        run.fail("shard", "add", "pg1", url),  # duplicate
        run.fail("shard", "add", "bad", unreachable),
        run.fail("shard", "add", "bad", "sqlite:///x.db", "--admin-url", unreachable),
        run.fail("shard", "add", "bad", no_database),
        run.fail("shard", "add", "bad", f"mysql://app:{PASSWORD}@127.0.0.1/app"),
        run.fail("shard", "add", "bad", f"garbage {PASSWORD}"),
        run.fail("tenant", "list", catalog=unreachable),
        run.fail("init", catalog=unreachable),
        run.fail("shard", "list", catalog=f"mysql://u:{PASSWORD}@127.0.0.1/x"),
    ]
    run("shard", "add", "gone", unreachable, "--no-prepare")
    messages.append(run.fail("tenant", "add", "acme", "--shard", "gone"))
    assert any(":***@" in m for m in messages)
    assert_clean(*messages)
    assert_clean(*(r.getMessage() for r in logs.records))
    # the usage-error path too
    result = run.invoke("shard", "add", "x", unreachable, "--tier", "gold")
    assert result.exit_code == 2
    assert_clean_result(result)


def test_a_catalog_password_is_never_shown(
    make_run: type[Run], make_pg_database: DatabaseFactory
) -> None:
    catalog_url = with_password(make_pg_database(0), PASSWORD)
    run = make_run(catalog_url)
    out = run("init")
    assert "is ready" in out and ":***@" in out
    assert ":***@" in run.json("init")["catalog"]
    assert_clean(out, run("shard", "list"), run("tenant", "list", "--json"))


def test_reprs_hide_passwords(pg_shard_urls: tuple[str, str], sqlite_url: str) -> None:
    url, admin_url = pg_shard_urls
    with Catalog(sqlite_url, settings=load_settings(catalog_url=sqlite_url)) as catalog:
        catalog.init()
        shard = catalog.add_shard("pg1", url, admin_url=admin_url)
        catalog.add_tenant("acme")
        snap = catalog.snapshot()
        stored = catalog.get_shard("pg1")
    # tenantry keeps the passwords (it must connect) but never renders them
    assert PASSWORD in stored.url and ADMIN_PASSWORD in (stored.admin_url or "")
    assert_clean(
        repr(shard),
        str(shard),
        repr(stored),
        repr(snap),
        repr(dict(snap.shards)),
        repr(snap.shard_of("acme")),
    )
    settings = load_settings(catalog_url=url)
    assert_clean(repr(settings), str(settings))
    with Catalog(url, settings=settings) as catalog:
        assert_clean(repr(catalog))
