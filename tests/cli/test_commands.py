"""Every ``tenantry`` command through click's CliRunner: tables and ``--json``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tenantry import Catalog, CatalogNotInitialized, MapSnapshot, Tier, load_settings
from tenantry.shardmap.scripts import CATALOG

if TYPE_CHECKING:
    from tests.cli.conftest import Run

Rows = Callable[[str], list[list[str]]]
Header = Callable[[str], list[str]]

#: What makes the commands take stdout for a terminal (rich reads it), without colour;
#: LINES with COLUMNS keeps rich from taking a dumb terminal for 80 columns wide.
TERMINAL = {"TTY_COMPATIBLE": "1", "TERM": "dumb", "LINES": "50"}


def test_a_whole_session_on_sqlite_and_postgresql(
    db_url: str, tmp_path: Path, make_run: type[Run], read_table: Rows, read_header: Header
) -> None:
    run = make_run(db_url)
    assert "is ready (schema" in run("init")
    assert run.json("init") == {"catalog": db_url, "revision": CATALOG.head}

    s1, s2, d1 = (f"sqlite:///{tmp_path / name}.db" for name in ("s1", "s2", "d1"))
    assert run("shard", "add", "s1", s1) == f"added shared shard s1 ({s1})\n"
    added = run.json("shard", "add", "s2", s2, "--weight", "2")
    assert {k: added[k] for k in ("name", "tier", "state", "weight", "url", "tenants")} == {
        "name": "s2",
        "tier": "shared",
        "state": "active",
        "weight": 2,
        "url": s2,
        "tenants": 0,
    }
    assert run("shard", "add", "d1", d1, "--tier", "dedicated").startswith("added dedicated")

    out = run("tenant", "add", "acme")
    assert out.startswith("added shared tenant acme on shard s")
    assert run.json("tenant", "add", "globex", "--shard", "s1", "--pin")["pinned"] is True
    regulated = run.json("tenant", "add", "regulated", "--dedicated", "--shard", "d1")
    assert (regulated["tier"], regulated["shard"]) == ("dedicated", "d1")

    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as catalog:
        snap = catalog.snapshot()
    assert snap.version == 7 and set(snap.tenants) == {"acme", "globex", "regulated"}

    # listings: a table, and the same fields as JSON
    table = run("shard", "list", env=TERMINAL)
    assert f"map version {snap.version}" in table
    assert read_header(table) == ["shard", "tier", "state", "weight", "tenants", "url"]
    listed = run.json("shard", "list")
    assert [r["name"] for r in listed] == ["d1", "s1", "s2"]
    assert read_table(table) == [
        [r["name"], r["tier"], r["state"], str(r["weight"]), str(r["tenants"]), r["url"]]
        for r in listed
    ]
    assert run("shard", "list").splitlines() == [  # plain lines to a pipe
        "\t".join(row) for row in read_table(table)
    ]
    assert sum(r["tenants"] for r in listed) == 3
    assert [r["name"] for r in run.json("shard", "list", "--tier", "dedicated")] == ["d1"]

    tenants = run.json("tenant", "list")
    assert [t["id"] for t in tenants] == ["acme", "globex", "regulated"]
    assert set(tenants[0]) == {"id", "shard", "tier", "pinned", "state", "created_at"}
    table = run("tenant", "list", env=TERMINAL)  # a table on a terminal
    assert read_header(table) == ["tenant", "shard", "tier", "pinned", "state"]
    assert read_table(table) == [
        [t["id"], t["shard"], t["tier"], "yes" if t["pinned"] else "", t["state"]] for t in tenants
    ]
    assert run("tenant", "list").splitlines() == [  # plain lines to a pipe
        "\t".join([t["id"], t["shard"], t["tier"], "yes" if t["pinned"] else "no", t["state"]])
        for t in tenants
    ]
    assert [t["id"] for t in run.json("tenant", "list", "--shard", "d1")] == ["regulated"]

    # show and route: field/value tables with exactly the JSON's fields
    shown = run.json("tenant", "show", "globex")
    assert shown == next(t for t in tenants if t["id"] == "globex")
    assert dict(read_table(run("tenant", "show", "globex"))) == {
        k: str(v) for k, v in shown.items()
    }
    shard = run.json("shard", "show", "d1")
    assert (shard["tenant_ids"], shard["tenants"], shard["tier"]) == (["regulated"], 1, "dedicated")
    out = run("shard", "show", "d1")
    fields = dict(row for row in read_table(out) if len(row) == 2)
    assert fields == {k: "" if v is None else str(v) for k, v in shard.items() if k != "tenant_ids"}
    assert "tenants: regulated" in out

    route = run.json("route", "regulated")
    assert route == {
        "tenant": "regulated",
        "shard": "d1",
        "tier": "dedicated",
        "url": d1,
        "map_version": snap.version,
    }
    assert dict(read_table(run("route", "regulated"))) == {k: str(v) for k, v in route.items()}

    # changes
    assert run("tenant", "pin", "acme") == "tenant acme is pinned\n"
    assert run.json("tenant", "show", "acme")["pinned"] is True
    assert run("tenant", "pin", "acme", "--off") == "tenant acme is not pinned\n"
    assert run("shard", "set", "s2", "--weight", "5") == "shard s2: state active, weight 5\n"
    changed = run.json("shard", "set", "s2", "--state", "draining")
    assert (changed["state"], changed["weight"]) == ("draining", 5)
    removed = run.json("tenant", "remove", "globex")
    assert (removed["id"], removed["shard"]) == ("globex", "s1")
    # no tenant tables in these shards, so no rows to refuse for
    assert run("tenant", "remove", "regulated") == (
        "removed tenant regulated (it had no rows on shard d1)\n"
    )
    assert [t["id"] for t in run.json("tenant", "list")] == ["acme"]
    with Catalog(db_url, settings=load_settings(catalog_url=db_url)) as catalog:
        assert catalog.map_version() == snap.version + 6
        assert catalog.get_shard("s2").weight == 5


def test_empty_listings_say_so(run: Run) -> None:
    run("init")
    assert run.json("shard", "list") == []
    assert run.json("tenant", "list") == []
    assert "none" in run("shard", "list", env=TERMINAL)
    assert run("shard", "list") == ""
    assert run("tenant", "list", env=TERMINAL) == "tenants: none\n"
    assert run("tenant", "list") == ""  # no line to a pipe


def test_init_twice_is_fine(run: Run) -> None:
    first = run.json("init")
    assert run.json("init") == first


def test_shard_add_with_admin_url_and_no_prepare(run: Run, tmp_path: Path) -> None:
    run("init")
    url, admin = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/a-admin.db"
    record = run.json("shard", "add", "s1", url, "--admin-url", admin)
    assert (record["url"], record["admin_url"]) == (url, admin)
    assert (tmp_path / "a-admin.db").exists()
    record = run.json("shard", "add", "s2", "postgresql://app@127.0.0.1:1/app", "--no-prepare")
    assert record["url"] == "postgresql+psycopg://app@127.0.0.1:1/app"
    assert record["admin_url"] is None


def test_route_table_and_json_agree_for_a_ring_placed_tenant(
    run: Run, fleet: Catalog, read_table: Rows
) -> None:
    tenant = run.json("tenant", "add", "initech")
    assert tenant["shard"] in ("s1", "s2") and tenant["shard"] == fleet.get_tenant("initech").shard
    route = run.json("route", "initech")
    assert (route["shard"], route["tier"]) == (tenant["shard"], "shared")
    assert route["url"] == fleet.get_shard(tenant["shard"]).url
    assert route["map_version"] == fleet.map_version()
    rows = dict(read_table(run("route", "initech")))
    assert rows["shard"] == tenant["shard"] and rows["url"] == route["url"]


def test_tenant_list_filters_by_shard(run: Run, fleet: Catalog) -> None:
    assert [t["id"] for t in run.json("tenant", "list", "--shard", "s2")] == ["globex"]
    assert run.json("tenant", "list", "--shard", "d2") == []


def test_shard_set_state_and_retire(run: Run, fleet: Catalog) -> None:
    assert run.json("shard", "set", "d2", "--state", "retired")["state"] == "retired"
    assert run.json("shard", "list", "--state", "retired")[0]["name"] == "d2"
    assert fleet.get_shard("d2").state.value == "retired"
    assert run.json("shard", "set", "d2", "--state", "active", "--weight", "3")["weight"] == 3


def test_dedicated_flag_needs_a_shard(run: Run, fleet: Catalog) -> None:
    message = run.fail("tenant", "add", "newco", "--dedicated")
    assert "needs its own shard" in message and "--tier dedicated" in message
    assert fleet.add_tenant("newco", tier=Tier.DEDICATED, shard="d2").shard == "d2"


def demo_map_is_sound(url: str) -> MapSnapshot:
    """The demo's map: the seed story is there and every placement keeps the rules.

    The demo grows with the project, so this checks what must stay true, not every row.
    """
    from tenantry.demo import DEDICATED_TENANT, SHARED_TENANTS

    with Catalog(url, settings=load_settings(catalog_url=url)) as catalog:
        snap = catalog.snapshot()
    tiers = {name: shard.tier.value for name, shard in snap.shards.items()}
    assert {"shared-1": "shared", "shared-2": "shared", "nordgrid": "dedicated"}.items() <= (
        tiers.items()
    )
    assert {*SHARED_TENANTS, DEDICATED_TENANT} <= set(snap.tenants)
    assert snap.shard_of(DEDICATED_TENANT).name == "nordgrid"
    for tenant in snap.tenants.values():
        assert snap.shard_of(tenant.id).tier is tenant.tier
    for name, tier in tiers.items():
        if tier == "dedicated":
            assert len(snap.tenants_on(name)) <= 1
    return snap


@pytest.mark.strict_routing_role  # as `make demo` runs: no override of the refusals
def test_demo_builds_the_fleet_and_can_run_again(run: Run, make_run: type[Run]) -> None:
    from tenantry.demo import DEDICATED_TENANT, SHARED_TENANTS

    # by default under ./.tenantry-demo/ (the test runs in an empty directory)
    directory = Path.cwd() / ".tenantry-demo"
    url = f"sqlite:///{directory / 'catalog.db'}"
    out = run("demo", catalog=None, env={"COLUMNS": "80"})  # a new user's terminal
    assert "EV-charger operator groups" in out
    assert f"catalog: {url}" in out
    for tenant in (*SHARED_TENANTS, DEDICATED_TENANT):
        assert tenant in out
    first = demo_map_is_sound(url)
    # the router showed isolation, the moves kept every row, the pool was rebalanced
    assert "rows of another group seen: 0" in out
    # what each tenant sees, in 80 columns: every name whole, beside its shard
    census = out[out.index("what each tenant sees") : out.index("rows of another group seen")]
    for tenant in (*SHARED_TENANTS, DEDICATED_TENANT):
        assert re.search(rf"{re.escape(tenant)} +\S +(shared-\d|nordgrid|tinyvolt-db) ", census)
    assert out.count("same data") == 2 and "DATA DIFFERS" not in out
    assert first.shard_of("voltpark").tier.value == "dedicated"
    assert first.shard_of("tinyvolt").tier.value == "shared"
    assert "shared-3" in first.shards and "tinyvolt-db" not in first.shards
    assert {p.name for p in directory.iterdir()} >= {"catalog.db", "shared-1.db", "nordgrid.db"}

    # again, naming the same directory: no error, same tenants
    again = run("demo", "--dir", str(directory), catalog=None)
    assert DEDICATED_TENANT in again
    second = demo_map_is_sound(url)
    assert set(second.tenants) == set(first.tenants)  # nothing lost, nothing added twice
    # the CLI shows the demo's map like any other
    listed = make_run(url).json("tenant", "list")
    assert {t["id"]: t["shard"] for t in listed} == {t.id: t.shard for t in second.tenants.values()}


def test_help_and_version(run: Run) -> None:
    from importlib.metadata import version

    out = run("--help", catalog=None)
    for command in ("init", "shard", "tenant", "route", "demo"):
        assert f"  {command} " in out
    assert "--catalog URL" in out
    assert version("tenantry") in run("--version", catalog=None)
    for group, commands in (
        ("shard", ("add", "list", "show", "set")),
        ("tenant", ("add", "list", "show", "remove", "pin")),
    ):
        out = run(group, "--help", catalog=None)
        assert all(f"  {c} " in out for c in commands)


def test_traceback_flag_lets_the_real_error_through(run: Run) -> None:
    result = run.invoke("--traceback", "tenant", "list")
    assert isinstance(result.exception, CatalogNotInitialized)
    assert result.exit_code == 1
