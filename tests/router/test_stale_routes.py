"""No stale routes: a router with an old map lands on the tenant's new home, never the old.

The stale router runs in a process of its own (``background=False``: it refreshes only
when a shard's residency fence refuses it). The test process moves the tenant by
hand, as the mover's switch step does: copy the rows, target residency ``active``,
``catalog.set_placement``, source residency ``moved``. Frozen tenants read but never
write. Map changes reach other router processes without a restart: by NOTIFY on
PostgreSQL, by polling on SQLite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text

from tenantry.errors import RoutingError, StaleRoute, TenantFrozen, UnknownTenant
from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.residency import Residency, read_residency, write_residency

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import sqlalchemy as sa
    from tenantry import Router, load_settings

    projects = sa.table("projects", sa.column("tenant_id"), sa.column("id"), sa.column("name"))
    routers = {}

    def where(conn):
        if conn.dialect.name == "postgresql":
            return conn.exec_driver_sql("SELECT current_database()").scalar_one()
        return os.path.realpath(conn.exec_driver_sql("PRAGMA database_list").all()[0][2])

    def run(cmd):
        op, tenant = cmd["op"], cmd.get("tenant")
        if op == "open":
            url = cmd["catalog"]
            router = routers[cmd["router"]] = Router(
                url,
                settings=load_settings(catalog_url=url, poll_interval=cmd["poll"]),
                background=cmd["background"],
                listen=cmd["listen"],
            )
            cache, deadline = router._cache, time.monotonic() + 10
            while cache._thread and cache._listen and not cache.listening:
                assert time.monotonic() < deadline, "no LISTEN connection"
                time.sleep(0.01)
            return {"version": router.snapshot.version}
        router = routers[cmd["router"]]
        before = router.snapshot.version
        if op == "close":
            routers.pop(cmd["router"]).close()
            return {}
        if op == "read":
            with router.connection(tenant) as conn:
                query = sa.select(projects.c.name).where(projects.c.tenant_id == tenant)
                names = sorted(conn.execute(query).scalars())
                return {"where": where(conn), "names": names, "before": before,
                        "after": router.snapshot.version}
        if op == "insert":
            with router.connection(tenant) as conn:
                conn.execute(projects.insert().values(tenant_id=tenant, id=cmd["id"],
                                                      name=cmd["name"]))
                return {"where": where(conn), "before": before}
        if op == "wait":  # for the background refresh alone: no lookups, no refresh()
            end = time.monotonic() + cmd["timeout"]
            while time.monotonic() < end:
                snapshot = router.snapshot
                shard = cmd.get("shard")
                if tenant in snapshot.tenants and (shard is None or shard in snapshot.shards):
                    return {"seen": time.time(), "version": snapshot.version}
                time.sleep(0.005)
            return {"seen": None, "version": router.snapshot.version}
        raise ValueError(op)

    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            reply = run(json.loads(line))
        except Exception as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
    for router in routers.values():
        router.close()
    """
)


class Process:
    """Another Python process holding routers, driven one JSON line at a time."""

    def __init__(self, script: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # the parent's TENANTRY_* settings stay out: only what the test says
            env={k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_")},
        )
        self.pid = self.read()["pid"]
        assert self.pid != os.getpid()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            assert self.proc.stderr is not None
            raise AssertionError(f"router process died: {self.proc.stderr.read()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


class RemoteRouter:
    """A Router in the other process."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.version = 0  # its map version when opened

    def send(self, **command: Any) -> None:
        self.process.send(router=self.name, **command)

    def read(self) -> dict[str, Any]:
        return self.process.read()

    def ask(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.read()


@pytest.fixture(scope="module")
def other_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One Python process for the module (starting Python and tenantry costs ~1 s)."""
    script = tmp_path_factory.mktemp("remote") / "router_worker.py"
    script.write_text(WORKER)
    process = Process(script)
    yield process
    process.close()


@pytest.fixture
def start_router(other_process: Process) -> Iterator[Any]:
    """``start(catalog_url, background=False, listen=True, poll=2.0) -> RemoteRouter``."""
    made: list[RemoteRouter] = []

    def start(
        catalog_url: str, *, background: bool = False, listen: bool = True, poll: float = 2.0
    ) -> RemoteRouter:
        remote = RemoteRouter(other_process, f"r{len(made)}")
        reply = remote.ask(
            op="open", catalog=catalog_url, background=background, listen=listen, poll=poll
        )
        assert "error" not in reply, reply
        remote.version = reply["version"]
        made.append(remote)
        return remote

    yield start
    for remote in made:
        remote.ask(op="close")


def two_shard_fleet(build: Any) -> Any:
    """acme and globex on "old" (server 0); "new" (server 1) empty."""
    fleet = build()
    fleet.add_shard("old", server=0)
    fleet.add_shard("new", server=1)
    fleet.add_tenant("acme", "old")
    fleet.add_tenant("globex", "old")
    return fleet


def move_by_hand(fleet: Any, app: Any, tenant: str, source: str, target: str) -> int:
    """The mover's copy and switch, by hand; return the new map version."""
    tables = [app.projects, app.tasks]
    with (
        operator_transaction(fleet.shard(source)) as src,
        operator_transaction(fleet.shard(target)) as dst,
    ):
        for table in tables:
            rows = src.execute(select(table).where(table.c.tenant_id == tenant)).mappings().all()
            dst.execute(table.insert(), [dict(row) for row in rows])
        # the target's copy gets one more project: a read shows where it was served from
        dst.execute(tables[0].insert().values(tenant_id=tenant, id=3, name=f"{tenant}-moved"))
        write_residency(dst, tenant, Residency.ACTIVE, fleet.catalog.map_version() + 1)
    _, version = fleet.catalog.set_placement(tenant, target)
    fleet.set_residency(tenant, source, Residency.MOVED)
    return int(version)


def test_stale_router_in_another_process_lands_on_the_new_home(
    fleet_builder: Any, start_router: Any, app: Any
) -> None:
    fleet = two_shard_fleet(fleet_builder)
    fresh = fleet.new_router(background=True)  # this process's router: it listens/polls
    stale = start_router(fleet.catalog.url, background=False)
    first = stale.ask(op="read", tenant="acme")
    assert first["where"] == fleet.location("old")
    assert first["names"] == ["acme-p1", "acme-p2"]
    old_version = first["after"]

    version = move_by_hand(fleet, app, "acme", "old", "new")
    assert version > old_version

    moved = stale.ask(op="read", tenant="acme")
    assert moved["before"] == old_version  # its map was stale when the transaction began
    assert moved["where"] == fleet.location("new")  # and it was served by the new home
    assert moved["names"] == ["acme-moved", "acme-p1", "acme-p2"]
    assert moved["after"] >= version

    wrote = stale.ask(op="insert", tenant="acme", id=4, name="acme-p4")
    assert wrote["where"] == fleet.location("new")
    assert ("acme", 4, "acme-p4") in fleet.rows("new")
    assert [r for r in fleet.rows("old") if r[0] == "acme"] == [
        ("acme", 1, "acme-p1"),
        ("acme", 2, "acme-p2"),
    ]  # nothing written at the old home

    # the tenant left behind is still served where it lives
    other = stale.ask(op="read", tenant="globex")
    assert other["where"] == fleet.location("old")
    # and this process's router agrees
    with fresh.connection("acme") as conn:
        names = conn.execute(select(app.projects.c.name).where(app.projects.c.tenant_id == "acme"))
        assert "acme-moved" in names.scalars().all()
    assert fresh.shard_for("acme").name == "new"


def test_every_stale_router_lands_on_the_new_home(
    pg_fleet_builder: Any, start_router: Any, app: Any
) -> None:
    fleet = two_shard_fleet(pg_fleet_builder)
    local = fleet.new_router()  # no background refresh: as stale as the other process's
    remote = start_router(fleet.catalog.url)
    assert remote.ask(op="read", tenant="acme")["where"] == fleet.location("old")
    with local.session("acme") as session:
        assert session.scalar(text("SELECT current_database()")) == fleet.location("old")
    move_by_hand(fleet, app, "acme", "old", "new")

    assert "acme" in local.snapshot.tenants and local.shard_for("acme").name == "old"
    with local.session("acme") as session:
        assert session.scalar(text("SELECT current_database()")) == fleet.location("new")
        session.add(app.Project(id=5, name="acme-p5"))
        session.commit()
    assert local.shard_for("acme").name == "new"
    reply = remote.ask(op="insert", tenant="acme", id=6, name="acme-p6")
    assert reply["where"] == fleet.location("new")
    assert [r[1] for r in fleet.rows("new") if r[0] == "acme"] == [1, 2, 3, 5, 6]
    assert [r[1] for r in fleet.rows("old") if r[0] == "acme"] == [1, 2]


def test_residency_moved_without_a_new_placement_is_refused(fleet: Any, app: Any) -> None:
    # A switch half done (source fenced, catalog not yet switched): fail closed.
    router = fleet.new_router()
    fleet.set_residency("initech", "shared-a", Residency.MOVED)
    with pytest.raises(StaleRoute) as info, router.session("initech"):
        pass  # pragma: no cover
    assert isinstance(info.value, RoutingError)
    assert info.value.shard == "shared-a"
    with pytest.raises(StaleRoute), router.connection("initech") as conn:
        conn.execute(app.projects.insert().values(tenant_id="initech", id=9, name="x"))
    assert [r[1] for r in fleet.rows("shared-a") if r[0] == "initech"] == [1, 2]


def test_removed_tenant_seen_through_a_stale_map_is_unknown(fleet_builder: Any) -> None:
    fleet = fleet_builder()
    fleet.add_shard("only")
    fleet.add_tenant("acme", "only")
    fleet.add_tenant("gone", "only")
    router = fleet.new_router()
    assert router.has_tenant("gone")
    fleet.catalog.remove_tenant("gone")
    assert "gone" in router.snapshot.tenants  # stale
    with pytest.raises(UnknownTenant), router.session("gone"):
        pass  # pragma: no cover
    with router.session("acme") as session:
        assert session.tenant_id == "acme"


# -- frozen tenants -----------------------------------------------------------------------------


def test_frozen_tenant_reads_but_never_writes(fleet: Any, app: Any) -> None:
    router = fleet.new_router()
    fleet.set_residency("globex", "shared-a", Residency.FROZEN)
    with router.session("globex") as session:
        assert session.frozen
        names = session.scalars(select(app.Project.name).order_by(app.Project.id)).all()
        assert names == ["globex-p1", "globex-p2"]
        session.add(app.Project(id=9, name="globex-p9"))
        with pytest.raises(TenantFrozen) as info:
            session.flush()
    assert info.value.retry_after > 0
    assert info.value.tenant_id == "globex"
    assert isinstance(info.value, RoutingError)
    with router.session("globex") as session:
        task = session.get(app.Task, ("globex", 11))
        task.title = "changed"
        with pytest.raises(TenantFrozen):
            session.commit()
    with router.session("globex") as session, pytest.raises(TenantFrozen):
        session.execute(
            text("INSERT INTO projects (tenant_id, id, name) VALUES ('globex', 9, 'x')")
        )
    with router.session("globex") as session, pytest.raises(TenantFrozen):
        session.execute(text("UPDATE tasks SET title = 'x'"))
    with pytest.raises(TenantFrozen), router.connection("globex") as conn:
        conn.execute(app.projects.insert().values(tenant_id="globex", id=9, name="x"))
    with pytest.raises(TenantFrozen), router.connection("globex") as conn:
        conn.exec_driver_sql("DELETE FROM tasks WHERE tenant_id = 'globex'")

    # other tenants of the shard write as usual, on the same pooled connections
    with router.session("acme") as session:
        session.add(app.Project(id=9, name="acme-p9"))
        session.commit()
        assert not session.frozen
    assert [r[1] for r in fleet.rows("shared-a") if r[0] == "globex"] == [1, 2]
    assert len([r for r in fleet.rows("shared-a", "tasks") if r[0] == "globex"]) == 4

    # unfrozen: writes go through again
    fleet.set_residency("globex", "shared-a", Residency.ACTIVE)
    with router.session("globex") as session:
        assert not session.frozen
        session.add(app.Project(id=9, name="globex-p9"))
        session.commit()
    assert ("globex", 9, "globex-p9") in fleet.rows("shared-a")


def test_pooled_connection_is_writable_after_a_frozen_tenant(fleet: Any, app: Any) -> None:
    router = fleet.new_router()
    fleet.set_residency("globex", "shared-a", Residency.FROZEN)
    with router.connection("globex") as conn:
        assert conn.execute(select(sa.func.count()).select_from(app.projects)).scalar() >= 2
    fleet.set_residency("globex", "shared-a", Residency.ACTIVE)
    with router.engine_for("acme").begin() as conn:
        # no read-only transaction, no query_only pragma carried over
        if fleet.pg:
            assert conn.execute(text("SHOW transaction_read_only")).scalar() == "off"
        else:
            assert conn.execute(text("PRAGMA query_only")).scalar() == 0
            conn.execute(text("CREATE TEMPORARY TABLE scratch (x int)"))
            conn.execute(text("INSERT INTO scratch VALUES (1)"))
    with operator_transaction(fleet.shard("shared-a")) as conn:
        assert read_residency(conn, "globex") is Residency.ACTIVE


# -- invalidation across processes ------------------------------------------------------------


def test_new_tenant_reaches_another_process_by_notify(
    pg_fleet_builder: Any, start_router: Any
) -> None:
    fleet = pg_fleet_builder()
    fleet.add_shard("shared-a")
    fleet.add_tenant("acme", "shared-a")
    # polling every 30 s: only LISTEN/NOTIFY can bring the change within a second
    remote = start_router(fleet.catalog.url, background=True, poll=30)
    remote.send(op="wait", tenant="newco", timeout=5)
    time.sleep(0.05)
    fleet.catalog.add_tenant("newco", shard="shared-a")
    committed = time.time()
    seen = remote.read()
    assert seen["seen"] is not None, "the new tenant never reached the other process"
    assert seen["seen"] - committed < 1.0
    routed = remote.ask(op="read", tenant="newco")
    assert routed["where"] == fleet.location("shared-a")
    assert routed["before"] == routed["after"]  # no refresh needed: the map was current


def test_new_tenant_reaches_another_process_by_polling(
    fleet_builder: Any, start_router: Any
) -> None:
    fleet = fleet_builder()
    fleet.add_shard("shared-a")
    fleet.add_tenant("acme", "shared-a")
    # no LISTEN on PostgreSQL either: polling alone
    remote = start_router(fleet.catalog.url, background=True, listen=False, poll=0.1)
    remote.send(op="wait", tenant="newco", timeout=5)
    time.sleep(0.05)
    fleet.catalog.add_tenant("newco", shard="shared-a")
    committed = time.time()
    seen = remote.read()
    assert seen["seen"] is not None
    assert seen["seen"] - committed < 1.0
    assert remote.ask(op="read", tenant="newco")["where"] == fleet.location("shared-a")


def test_new_shard_and_its_tenant_reach_another_process(
    fleet_builder: Any, start_router: Any
) -> None:
    fleet = fleet_builder()
    fleet.add_shard("shared-a")
    fleet.add_tenant("acme", "shared-a")
    remote = start_router(fleet.catalog.url, background=True, poll=0.2)
    remote.send(op="wait", tenant="late", shard="shared-b", timeout=8)
    fleet.add_shard("shared-b", server=1)
    fleet.add_tenant("late", "shared-b")
    committed = time.time()
    seen = remote.read()
    assert seen["seen"] is not None
    assert seen["seen"] - committed < 1.0
    routed = remote.ask(op="read", tenant="late")
    assert routed["where"] == fleet.location("shared-b")
    assert routed["names"] == ["late-p1", "late-p2"]


def test_stale_router_without_background_refresh_routes_a_new_tenant(
    fleet_builder: Any, start_router: Any
) -> None:
    fleet = fleet_builder()
    fleet.add_shard("shared-a")
    fleet.add_tenant("acme", "shared-a")
    remote = start_router(fleet.catalog.url, background=False)
    fleet.add_tenant("newco", "shared-a")
    routed = remote.ask(op="read", tenant="newco")  # unknown to its map: refresh, then route
    assert routed["names"] == ["newco-p1", "newco-p2"]
    assert routed["after"] > routed["before"]
    assert remote.ask(op="read", tenant="nobody")["error"] == "UnknownTenant"
