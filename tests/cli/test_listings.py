"""Listings and look-ups as a big fleet needs them: ``tenant list`` streams plain lines
to a pipe and a limited table to a terminal, pages with --limit/--offset/--after, filters,
keeps its JSON valid; ``route``, ``tenant show``, ``shard list`` and ``shard show`` read
what they show, never the whole map."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from tenantry import Catalog, Tier
from tenantry.cli import app
from tenantry.errors import UnknownShard
from tenantry.shardmap.schema import shards

if TYPE_CHECKING:
    from tests.cli.conftest import Run

Rows = Callable[[str], list[list[str]]]

#: What makes the commands take stdout for a terminal (rich reads it), without colour;
#: LINES with COLUMNS keeps rich from taking a dumb terminal for 80 columns wide.
TERMINAL = {"TTY_COMPATIBLE": "1", "TERM": "dumb", "LINES": "50"}


@pytest.fixture
def bigger(fleet: Catalog) -> Catalog:
    """The conftest fleet (acme on s1, globex on s2, regulated on d1) and acme-2 (s1),
    acme_3 (s2, pinned) and beta (s1)."""
    fleet.add_tenant("acme-2", shard="s1")
    fleet.add_tenant("acme_3", shard="s2", pinned=True)
    fleet.add_tenant("beta", shard="s1")
    return fleet


def ids(out: str) -> list[str]:
    """The ids of ``tenant list``'s plain lines."""
    return [line.split("\t")[0] for line in out.splitlines()]


ALL = ["acme", "acme-2", "acme_3", "beta", "globex", "regulated"]


def test_plain_lines_to_a_pipe_one_tenant_each(run: Run, bigger: Catalog) -> None:
    out = run("tenant", "list")
    assert ids(out) == sorted(t.id for t in bigger.list_tenants()) == ALL
    assert out.splitlines()[2] == "acme_3\ts2\tshared\tyes\tactive"
    assert all(len(line.split("\t")) == 5 for line in out.splitlines())


def test_limit_offset_and_after_page_through(run: Run, bigger: Catalog) -> None:
    assert ids(run("tenant", "list", "--limit", "2")) == ALL[:2]
    assert ids(run("tenant", "list", "--offset", "2", "--limit", "3")) == ALL[2:5]
    assert ids(run("tenant", "list", "--after", "acme_3")) == ALL[3:]
    assert ids(run("tenant", "list", "--after", "acme_3", "--offset", "1")) == ALL[4:]
    assert ids(run("tenant", "list", "--after", "zzz")) == []
    assert run("tenant", "list", "--limit", "0") == ""
    # pages of two, each starting after the last id of the one before, cover everything
    seen: list[str] = []
    after: list[str] = []
    while page := ids(run("tenant", "list", "--limit", "2", *after)):
        seen += page
        after = ["--after", page[-1]]
    assert seen == ALL


def test_filters(run: Run, bigger: Catalog) -> None:
    assert ids(run("tenant", "list", "--shard", "s1")) == ["acme", "acme-2", "beta"]
    assert ids(run("tenant", "list", "--tier", "dedicated")) == ["regulated"]
    assert ids(run("tenant", "list", "--pinned")) == ["acme_3"]
    assert "acme_3" not in ids(run("tenant", "list", "--unpinned"))
    assert ids(run("tenant", "list", "--state", "moving")) == []
    # "_" is matched as itself, not as LIKE's any-character
    assert ids(run("tenant", "list", "--prefix", "acme_")) == ["acme_3"]
    assert ids(run("tenant", "list", "--prefix", "acme")) == ["acme", "acme-2", "acme_3"]
    assert ids(run("tenant", "list", "--shard", "s1", "--prefix", "a", "--limit", "1")) == ["acme"]


def test_json_stays_valid_and_jsonl_is_one_object_a_line(run: Run, bigger: Catalog) -> None:
    listed = run.json("tenant", "list")
    assert listed == [t.to_record() for t in bigger.list_tenants()]
    # the streamed list is the very text one json.dumps of it gives
    assert run("tenant", "list", "--json") == json.dumps(listed, indent=2) + "\n"
    assert run.json("tenant", "list", "--limit", "2", "--offset", "1") == listed[1:3]
    assert run.json("tenant", "list", "--prefix", "zz") == []
    lines = run("tenant", "list", "--jsonl", "--shard", "s2").splitlines()
    assert [json.loads(line) for line in lines] == [r for r in listed if r["shard"] == "s2"]


def test_a_terminal_gets_a_limited_table_that_says_how_to_go_on(
    run: Run, bigger: Catalog, read_table: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run("tenant", "list", "--limit", "2", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ALL[:2]
    assert out.splitlines()[-1] == "2 of 6 shown; next page: --after acme-2"
    out = run("tenant", "list", "--shard", "s1", "--after", "acme", "--limit", "1", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ["acme-2"]
    assert out.splitlines()[-1] == "1 of 3 shown; next page: --after acme-2"
    # without --limit: the terminal's default, and a hint to ask for more
    monkeypatch.setattr(app, "TERMINAL_LIMIT", 4)
    out = run("tenant", "list", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ALL[:4]
    assert out.splitlines()[-1] == (
        "4 of 6 shown; next page: --after beta (--limit N for more at once)"
    )
    assert run("tenant", "list", "--limit", "0", env=TERMINAL).splitlines() == [
        "tenants: none",
        "0 of 6 shown",
    ]
    # all of it fits: no hint
    out = run("tenant", "list", "--limit", "6", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ALL and "shown" not in out
    # a pipe still gets every tenant
    assert ids(run("tenant", "list")) == ALL


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--limit", "-1"], 2, "Invalid value for '--limit'"),
        (["--offset", "x"], 2, "Invalid value for '--offset'"),
        (["--prefix", "Acme"], 2, "Invalid value for '--prefix'"),
        (["--state", "asleep"], 2, "Invalid value for '--state'"),
        (["--json", "--jsonl"], 2, "give --json or --jsonl, not both"),
        (["--after", "Not An Id"], 1, "error: invalid tenant id 'Not An Id'"),
        (["--shard", "nope", "--json"], 1, "error: unknown shard 'nope'"),
    ],
)
def test_bad_listing_arguments_fail_cleanly(
    run: Run, bigger: Catalog, args: list[str], status: int, message: str
) -> None:
    # one error line and no half-written output (not even a JSON list's opening)
    assert message in run.fail("tenant", "list", *args, status=status)


def test_shard_show_lists_or_limits_its_tenants(
    run: Run, bigger: Catalog, read_table: Rows
) -> None:
    shown = run.json("shard", "show", "s1")
    assert (shown["tenants"], shown["tenant_ids"]) == (3, ["acme", "acme-2", "beta"])
    assert run("shard", "show", "s1", "--json") == json.dumps(shown, indent=2) + "\n"
    limited = run.json("shard", "show", "s1", "--limit", "1")
    assert (limited["tenants"], limited["tenant_ids"]) == (3, ["acme"])
    assert run.json("shard", "show", "d2")["tenant_ids"] == []
    assert run("shard", "show", "s1").splitlines()[-1] == "tenants: acme, acme-2, beta"
    out = run("shard", "show", "s1", "--limit", "2", env=TERMINAL)
    assert dict(row for row in read_table(out) if len(row) == 2)["tenants"] == "3"
    assert out.splitlines()[-1] == (
        "tenants: acme, acme-2 (and 1 more: `tenantry tenant list --shard s1`)"
    )
    assert run("shard", "show", "d2").splitlines()[-1] == "tenants: none"
    assert "unknown shard 'nope'" in run.fail("shard", "show", "nope", "--json")


def test_lookups_and_shard_list_never_load_the_whole_map(
    run: Run, bigger: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = bigger.map_version()
    counts = {"s1": 3, "s2": 2, "d1": 1, "d2": 0}

    def no_snapshot(self: Catalog) -> None:
        raise AssertionError("the whole map was loaded")

    monkeypatch.setattr(Catalog, "snapshot", no_snapshot)
    monkeypatch.setattr(Catalog, "list_tenants", no_snapshot)
    listed = run.json("shard", "list")
    assert {s["name"]: s["tenants"] for s in listed} == counts
    assert f"map version {version}" in run("shard", "list", env=TERMINAL)
    assert run("shard", "list").splitlines()[0].split("\t")[:5] == [
        "d1",
        "dedicated",
        "active",
        "1",
        "1",
    ]
    assert [s["name"] for s in run.json("shard", "list", "--tier", "dedicated")] == ["d1", "d2"]
    assert run.json("route", "acme_3") == {
        "tenant": "acme_3",
        "shard": "s2",
        "tier": "shared",
        "url": bigger.get_shard("s2").url,
        "map_version": version,
    }
    assert run.json("tenant", "show", "regulated")["tier"] == Tier.DEDICATED.value
    assert run.json("shard", "show", "s2")["tenant_ids"] == ["acme_3", "globex"]
    assert ids(run("tenant", "list", "--shard", "s2")) == ["acme_3", "globex"]
    assert "unknown tenant 'ghost'" in run.fail("route", "ghost")


def test_shard_list_is_limited_on_a_terminal(
    run: Run, fleet: Catalog, read_table: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run("shard", "list", "--limit", "2", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ["d1", "d2"]
    assert out.splitlines()[-1] == "2 of 4 shown: --limit N for more"
    monkeypatch.setattr(app, "TERMINAL_LIMIT", 3)
    out = run("shard", "list", env=TERMINAL)
    assert [row[0] for row in read_table(out)] == ["d1", "d2", "s1"]
    assert out.splitlines()[-1] == "3 of 4 shown: --limit N for more"
    assert "shown" not in run("shard", "list", "--tier", "shared", env=TERMINAL)
    assert [s["name"] for s in run.json("shard", "list", "--limit", "1")] == ["d1"]
    assert len(run("shard", "list").splitlines()) == 4  # a pipe gets every shard


def test_iter_tenants_pages_across_batch_boundaries(bigger: Catalog) -> None:
    every = [t.id for t in bigger.iter_tenants()]
    assert every == ALL
    for size in (1, 2, 4, 5, 6, 7):
        assert [t.id for t in bigger.iter_tenants(batch_size=size)] == ALL
        assert [t.id for t in bigger.iter_tenants(batch_size=size, offset=1, limit=4)] == ALL[1:5]
        assert [t.id for t in bigger.iter_tenants(batch_size=size, after="acme-2")] == ALL[2:]
    assert list(bigger.iter_tenants(limit=0)) == []
    assert [t.to_record() for t in bigger.iter_tenants()] == [
        t.to_record() for t in bigger.list_tenants()
    ]
    assert bigger.count_tenants(shard="s1", pinned=False) == 3
    assert bigger.tenant_counts() == {"s1": 3, "s2": 2, "d1": 1}
    with pytest.raises(ValueError, match="offset and limit"):
        bigger.iter_tenants(limit=-1)


def test_shard_list_marks_a_shard_routed_through_a_pooler(
    run: Run, fleet: Catalog, read_table: Rows
) -> None:
    with fleet.engine.begin() as conn:  # as `shard add --pooled` records it
        conn.execute(shards.update().where(shards.c.name == "s2").values(pooled=True))
    url = fleet.get_shard("s2").url
    lines = {line.split("\t")[0]: line.split("\t") for line in run("shard", "list").splitlines()}
    assert lines["s2"][5] == f"{url} (pooled)" and lines["s1"][5].endswith(".db")
    table = {row[0]: row for row in read_table(run("shard", "list", env=TERMINAL))}
    assert table["s2"][5] == f"{url} (pooled)"
    assert {s["name"]: s["pooled"] for s in run.json("shard", "list")}["s2"] is True


def test_iter_tenant_ids_reads_the_ids_alone(bigger: Catalog) -> None:
    assert list(bigger.iter_tenant_ids()) == ALL
    for size in (1, 2, 3):
        assert list(bigger.iter_tenant_ids(shard="s1", batch_size=size)) == [
            "acme",
            "acme-2",
            "beta",
        ]
        assert list(bigger.iter_tenant_ids(shard="s1", limit=2, batch_size=size)) == [
            "acme",
            "acme-2",
        ]
    assert list(bigger.iter_tenant_ids(prefix="acme")) == ["acme", "acme-2", "acme_3"]
    assert list(bigger.iter_tenant_ids(shard="d2")) == []
    with pytest.raises(UnknownShard):
        bigger.iter_tenant_ids(shard="nope")
