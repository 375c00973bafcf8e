"""``tenantry status``: the whole fleet on real servers — a dedicated and two shared
PostgreSQL shards on two servers, one shard that cannot be reached, a replication slot
of someone else's, and an online move caught in flight (run in this process and held
at a checkpoint while status looks)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.pool import NullPool
from surveyfleet import SurveyFleet, build_survey_fleet, closed_port

from tenantry import moves
from tenantry.cli import cli
from tenantry.demo import MIGRATIONS
from tenantry.shardmap.scripts import SHARD
from tenantry.survey.status import server_of
from tenantry.testing.server import TempPostgres
from tenantry.urls import mask_url

OTHER_SLOT = "someone_elses_slot"


class AtCheckpoint:
    """Runs *action* once, when the mover reaches checkpoint *name*."""

    def __init__(self, name: str, action: Any) -> None:
        self.name, self.action, self.ran = name, action, False

    def checkpoint(self, name: str) -> None:
        if name == self.name and not self.ran:
            self.ran = True
            self.action()


def _sql(fleet: SurveyFleet, shard: str, statement: str) -> None:
    engine = sa.create_engine(fleet.urls[shard], poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(statement)
    engine.dispose()


@pytest.fixture
def pg_fleet(make_pg_database) -> Iterator[SurveyFleet]:
    built = build_survey_fleet(make_pg_database)
    down = f"postgresql://ops:secret@127.0.0.1:{closed_port()}/gone"
    built.catalog.add_shard("down", down, prepare=False)
    built.urls["down"] = built.catalog.get_shard("down").url
    _sql(built, "s2", f"SELECT pg_create_logical_replication_slot('{OTHER_SLOT}', 'pgoutput')")
    try:
        yield built
    finally:
        for shard in ("s1", "s2"):
            # Slots stop a database from being dropped.
            _sql(
                built,
                shard,
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = current_database() AND NOT active",
            )
        built.catalog.close()


def _status(fleet: SurveyFleet, *args: str) -> tuple[int, str, str]:
    result = CliRunner(env={"COLUMNS": "400", "TENANTRY_ALEMBIC_CONFIG": str(MIGRATIONS)}).invoke(
        cli, ["--catalog", fleet.catalog_url, "status", *args]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def _normal(record: dict[str, Any]) -> dict[str, Any]:
    """*record* with the figures that vary from run to run checked and replaced."""
    out = dict(record)
    for key in ("bytes", "connections"):
        if out.get(key) is not None:
            assert isinstance(out[key], int) and out[key] >= (1 if key == "bytes" else 0), out
            out[key] = key.upper()
    if "slots" in out:
        out["slots"] = [_normal(s) for s in out["slots"]]
    for key in ("lag_bytes", "retained_bytes"):
        if out.get(key) is not None:
            assert isinstance(out[key], int) and out[key] >= 0
            out[key] = "WAL"
    return out


def _shard(
    name: str, tier: str, url: str, tenants: int, slots: list[Any], constant: str | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "tier": tier,
        "state": "active",
        "backend": "postgresql",
        "url": mask_url(url),
        "server": server_of(url),
        "reachable": True,
        "error": None,
        "app_revision": "d0002",
        "app_verdict": "ok",
        "tenantry_revision": SHARD.head,
        "constant_tenant": constant,
        "tenants": tenants,
        "bytes": "BYTES",
        "connections": "CONNECTIONS",
        "slots": slots,
    }


def _slot(name: str, *, active: bool, tenantry: bool, move: int | None) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "logical",
        "active": active,
        "lag_bytes": "WAL",
        "retained_bytes": "WAL",
        "wal_status": "reserved",
        "tenantry": tenantry,
        "move": move,
        "leftover": False,
    }


def test_status_of_a_fleet_with_a_move_in_flight(pg_fleet):
    fleet = pg_fleet
    seen: dict[str, tuple[int, str, str]] = {}

    def look() -> None:
        seen["json"] = _status(fleet, "--json")
        seen["text"] = _status(fleet)

    done = moves.move(
        fleet.catalog, "acme", "s2", mode="online", hooks=AtCheckpoint("online-synced", look)
    )
    assert done.succeeded
    code, out, err = seen["json"]
    assert code == 3, (out, err)  # the unreachable shard needs attention
    doc = json.loads(out)
    fleet_id = fleet.catalog.fleet_id()
    slot = f"tenantry_move_{fleet_id}_{done.id}"

    assert set(doc) == {
        "catalog",
        "map_version",
        "app_head",
        "tenantry_head",
        "ok",
        "attention",
        "shards",
        "servers",
        "moves",
        "seconds",
    }
    assert doc["catalog"] == mask_url(fleet.catalog.url)
    assert (doc["app_head"], doc["tenantry_head"], doc["ok"]) == ("d0002", SHARD.head, False)
    assert isinstance(doc["map_version"], int) and doc["map_version"] > 0
    # Only the unreachable shard needs attention (the move is running, not stopped).
    (attention,) = doc["attention"]
    assert attention.startswith("shard down cannot be reached: ")
    assert "secret" not in out  # the unreachable shard's password

    shards = {s["name"]: s for s in doc["shards"]}
    assert list(shards) == ["d1", "down", "s1", "s2"]
    down = shards.pop("down")
    assert down == {
        "name": "down",
        "tier": "shared",
        "state": "active",
        "backend": "postgresql",
        "url": mask_url(fleet.urls["down"]),
        "server": server_of(fleet.urls["down"]),
        "reachable": False,
        "error": down["error"],
        "app_revision": None,
        "app_verdict": None,
        "tenantry_revision": None,
        "constant_tenant": None,
        "tenants": 0,
        "bytes": None,
        "connections": None,
        "slots": [],
    }
    assert "refused" in down["error"].lower() and "secret" not in down["error"]
    assert {n: _normal(s) for n, s in shards.items()} == {
        # its one tenant is its database's constant (shard revision s0007)
        "d1": _shard("d1", "dedicated", fleet.urls["d1"], 1, [], constant="regulated"),
        # acme is still on s1 while it moves; its move's slot is there, in use.
        "s1": _shard(
            "s1", "shared", fleet.urls["s1"], 2, [_slot(slot, active=True, tenantry=True, move=1)]
        ),
        "s2": _shard(
            "s2",
            "shared",
            fleet.urls["s2"],
            1,
            [_slot(OTHER_SLOT, active=False, tenantry=False, move=None)],
        ),
    }
    # The move's subscription and the status connection itself are not counted on s1 by
    # status; the mover holds connections to both ends.
    assert shards["s1"]["connections"] >= 1

    servers = {v["server"]: v for v in doc["servers"]}
    expected_servers: dict[str, list[str]] = {}
    for name in ("d1", "s1", "s2"):
        expected_servers.setdefault(server_of(fleet.urls[name]), []).append(name)
    assert {k: v["shards"] for k, v in servers.items()} == expected_servers
    for v in servers.values():
        assert set(v) == {
            "server",
            "version",
            "max_connections",
            "reserved_connections",
            "connections",
            "shards",
            "physical_slots",
        }
        assert v["max_connections"] > v["reserved_connections"] >= 0
        assert 1 <= v["connections"] < v["max_connections"]
        assert v["physical_slots"] == []
        assert int(v["version"].split(".")[0]) >= 15

    (move,) = doc["moves"]
    assert isinstance(move["age_seconds"], float) and move["age_seconds"] >= 0
    assert isinstance(move["idle_seconds"], float) and move["idle_seconds"] >= 0
    assert isinstance(move["lag_bytes"], int) and move["lag_bytes"] >= 0
    assert move == {
        "id": done.id,
        "tenant": "acme",
        "kind": "move",
        "mode": "online",
        "source": "s1",
        "target": "s2",
        "state": "copied",
        "step": 2,
        "steps": 6,
        "age_seconds": move["age_seconds"],
        "idle_seconds": move["idle_seconds"],
        "rows": None,
        "bytes": None,
        "lag_bytes": move["lag_bytes"],
        "error": None,
        "next": f"tenantry moves resume {done.id}  (or: tenantry moves abort {done.id})",
        "owner": f"{socket.gethostname()}:{os.getpid()}",
    }

    code, out, err = seen["text"]
    assert code == 3 and err == ""
    assert "needs attention:" in out and "- shard down cannot be reached" in out
    assert "moves in flight" in out and "copied (2/6)" in out
    assert f"{slot} (move {done.id}): " in out
    assert "secret" not in out

    # After the move: none in flight, its slot gone, acme counted on s2.
    code, out, _ = _status(fleet, "--json")
    doc = json.loads(out)
    assert code == 3 and doc["moves"] == []
    shards = {s["name"]: s for s in doc["shards"]}
    assert [x["name"] for x in shards["s1"]["slots"]] == []
    assert (shards["s1"]["tenants"], shards["s2"]["tenants"]) == (1, 2)


def test_a_leftover_slot_and_a_lagging_schema_need_attention(pg_fleet):
    fleet = pg_fleet
    fleet.catalog.remove_shard("down")
    code, out, _ = _status(fleet, "--json")
    assert (code, json.loads(out)["attention"]) == (0, []), out
    leftover = f"tenantry_move_{fleet.catalog.fleet_id()}_999"
    _sql(fleet, "s1", f"SELECT pg_create_logical_replication_slot('{leftover}', 'pgoutput')")
    _sql(fleet, "d1", "UPDATE alembic_version SET version_num = 'd0001'")
    code, out, _ = _status(fleet, "--json")
    doc = json.loads(out)
    assert code == 3
    assert doc["attention"] == [
        "shard d1: schema d0001 is behind (head d0002): run `tenantry migrate upgrade`",
        f"shard s1: replication slot {leftover} belongs to no live move and holds WAL: "
        "run `tenantry moves gc`",
    ]
    (slot,) = next(s for s in doc["shards"] if s["name"] == "s1")["slots"]
    assert (slot["tenantry"], slot["move"], slot["leftover"]) == (True, None, True)
    # Without the app's scripts revisions are shown, not judged: they differ.
    result = CliRunner().invoke(cli, ["--catalog", fleet.catalog_url, "status", "--json"])
    doc = json.loads(result.stdout)
    assert doc["app_head"] is None
    assert {s["app_verdict"] for s in doc["shards"]} == {None}
    assert doc["attention"][-1] == (
        "shards differ in schema revision (d0001, d0002): run `tenantry migrate status`"
    )


def test_status_of_a_sqlite_fleet(run, fleet, tmp_path: Path):
    doc = run.json("status")
    assert doc["ok"] is True and doc["attention"] == [] and doc["servers"] == []
    assert [(s["name"], s["tenants"], s["reachable"]) for s in doc["shards"]] == [
        ("d1", 1, True),
        ("d2", 0, True),
        ("s1", 1, True),
        ("s2", 1, True),
    ]
    assert all(s["bytes"] > 0 and s["connections"] is None for s in doc["shards"])
    # A shard's file gone: reported, not created again by looking.
    (tmp_path / "s2.db").unlink()
    result = run.invoke("status")
    assert result.exit_code == 3
    assert "s2 cannot be reached: no such database file" in result.stdout
    assert not (tmp_path / "s2.db").exists()
    # A retired shard that holds no tenant may be gone: shown, but nothing to do.
    run("shard", "set", "d2", "--state", "retired")
    (tmp_path / "d2.db").unlink()
    doc = json.loads(run.invoke("status", "--json").stdout)
    d2 = next(s for s in doc["shards"] if s["name"] == "d2")
    assert (d2["state"], d2["reachable"]) == ("retired", False)
    assert [line.split(" cannot")[0] for line in doc["attention"]] == ["shard s2"]


def test_many_shards_are_checked_at_once(run):
    """Twelve shards that cannot be reached, each timing out after the connect
    timeout would take 12 x timeout one after the other; at once, about one."""
    run("init")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepts connections, never answers: the connect times out
    port = listener.getsockname()[1]
    try:
        for i in range(12):
            run("shard", "add", f"x{i}", f"postgresql://u@127.0.0.1:{port}/d{i}", "--no-prepare")
        result = run.invoke("status", "--json", "--timeout", "2")
        doc = json.loads(result.stdout)
    finally:
        listener.close()
    assert result.exit_code == 3
    assert [s["reachable"] for s in doc["shards"]] == [False] * 12
    assert doc["seconds"] < 12, doc["seconds"]


def test_a_server_with_fewer_connections_than_databases_needs_attention(run, tmp_path: Path):
    """Routers cannot keep a connection to every database of a server whose usable
    connections are fewer than its databases: each transaction to a database without
    one pays a new server session. status says so, per server, with what to do."""
    server = TempPostgres.start(name="tenantry-few-connections", settings={"max_connections": "8"})
    try:
        admin = sa.create_engine(server.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            usable = conn.scalar(
                sa.text(
                    "SELECT current_setting('max_connections')::int"
                    " - current_setting('superuser_reserved_connections')::int"
                )
            )
            for i in range(usable + 1):
                conn.execute(sa.text(f"CREATE DATABASE few{i}"))
        admin.dispose()
        run("init")
        base = sa.make_url(server.url)
        for i in range(usable + 1):
            url = base.set(database=f"few{i}").render_as_string(hide_password=False)
            run("shard", "add", f"few{i}", url, "--tier", "dedicated", "--no-prepare")
        crowded = run.invoke("status", "--json", "--jobs", "2")
        run("shard", "set", "few0", "--state", "retired")  # holds no tenant: not routed to
        fitting = run.invoke("status", "--json", "--jobs", "2")
    finally:
        server.stop()
    doc = json.loads(crowded.stdout)
    assert crowded.exit_code == 3
    (line,) = [a for a in doc["attention"] if "usable connections (max_connections" in a]
    assert f": {usable + 1} shard databases but {usable} usable connections" in line
    assert "raise max_connections above the number of databases" in line
    # As many routed databases as usable connections: nothing to say about the server.
    doc = json.loads(fitting.stdout)
    assert len(doc["servers"][0]["shards"]) == usable + 1  # the retired one still shown
    assert not [a for a in doc["attention"] if "usable connections" in a], doc["attention"]


def test_status_on_an_80_column_terminal_cuts_no_name_and_drops_nothing(run, fleet):
    """At 3 a.m. in a split terminal: every shard's name whole, nothing cut to an
    ellipsis (cells wrap instead), and no line wider than the terminal."""
    result = run.invoke("status", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stdout
    table = result.stdout[result.stdout.index("shards") :]
    assert "…" not in table
    for name in ("d1", "d2", "s1", "s2"):
        assert f"│ {name} " in table
    assert max(len(line) for line in table.splitlines()) <= 80
