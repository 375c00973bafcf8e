"""Fence keys: routers sign with the catalog's key, rotation never stops routing, and the
key itself never shows.

The fleet routes through a NOSUPERUSER NOBYPASSRLS role, so every row a routed
transaction sees is admitted by the shard's policies, i.e. by the signature.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select, text

from tenantry.cli import cli
from tenantry.errors import ConfigurationError
from tenantry.shardmap.keys import FenceKey, current_key, install_key
from tenantry.shardmap.operations import operator_transaction

APP_ROLE = "app"  # the routing role of tests/router/conftest.py


def shard_keys(fleet: Any, shard: str) -> list[int]:
    with operator_transaction(fleet.shard(shard)) as conn:
        return list(conn.scalars(text("SELECT key_id FROM tenantry.fence_keys ORDER BY 1")))


def projects_seen(router: Any, tenant: str, app: Any) -> set[str]:
    """The tenant ids of every project row a routed transaction sees (no ORM criteria)."""
    with router.connection(tenant) as conn:
        assert conn.scalar(text("SELECT current_user")) == APP_ROLE
        return set(conn.scalars(select(app.projects.c.tenant_id)))


def test_rotation_keeps_old_and_new_routers_working(pg_fleet: Any, app: Any) -> None:
    old_router = pg_fleet.new_router()
    assert projects_seen(old_router, "acme", app) == {"acme"}
    first = pg_fleet.catalog.fence_key("shared-a")
    assert shard_keys(pg_fleet, "shared-a")[-1] == first.key_id

    rotated = pg_fleet.catalog.rotate_fence_key("shared-a")
    assert rotated.key_id == first.key_id + 1 and rotated.secret != first.secret
    assert pg_fleet.catalog.fence_key("shared-a") == rotated
    # the shard accepts both: the old router still signs with the previous key
    assert shard_keys(pg_fleet, "shared-a") == [first.key_id, rotated.key_id]
    assert old_router._fence_keys["shared-a"] == first
    assert projects_seen(old_router, "acme", app) == {"acme"}
    new_router = pg_fleet.new_router()
    assert projects_seen(new_router, "globex", app) == {"globex"}
    assert new_router._fence_keys["shared-a"] == rotated

    # the next rotation retires the first key: the old router fails one fence, reads
    # the key again and goes on, without the application seeing an error
    third = pg_fleet.catalog.rotate_fence_key("shared-a")
    assert shard_keys(pg_fleet, "shared-a") == [rotated.key_id, third.key_id]
    assert projects_seen(old_router, "acme", app) == {"acme"}
    assert old_router._fence_keys["shared-a"] == third
    with old_router.session("initech") as session:
        assert set(session.scalars(select(app.projects.c.tenant_id))) == {"initech"}


def test_retire_previous_and_a_catalog_behind_the_shard(pg_fleet: Any, app: Any) -> None:
    router = pg_fleet.new_router()
    assert projects_seen(router, "acme", app) == {"acme"}
    key = pg_fleet.catalog.rotate_fence_key("shared-a", retire_previous=True)
    assert shard_keys(pg_fleet, "shared-a") == [key.key_id]
    assert projects_seen(router, "acme", app) == {"acme"}

    # a rotation that reached the shard but not the catalog (a crash between the two):
    # the router learns the key from the shard itself
    with operator_transaction(pg_fleet.shard("shared-a")) as conn:
        newest = install_key(conn, retire_previous=True)
    assert pg_fleet.catalog.fence_key("shared-a") == key  # the catalog is behind
    assert projects_seen(router, "globex", app) == {"globex"}
    assert pg_fleet.catalog.fence_key("shared-a") == newest


def test_a_signature_under_a_made_up_key_admits_nothing(pg_fleet: Any, app: Any) -> None:
    shard = pg_fleet.shard("shared-a")
    real = pg_fleet.catalog.fence_key("shared-a")
    forged = FenceKey(real.key_id, b"\x00" * 32)
    engine = sa.create_engine(shard.url)
    try:
        with engine.connect() as conn:
            pid = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
            for signature in (forged.sign("acme", pid), real.sign("acme", pid + 1), "1:zz", ""):
                with pytest.raises(sa.exc.DBAPIError) as raised:
                    conn.execute(text("SELECT tenantry.fence('acme', :s)"), {"s": signature})
                assert getattr(raised.value.orig, "sqlstate", None) == "28000"
                conn.rollback()
            # the setting the fence would have made, made by hand: nothing is admitted
            conn.execute(text("SELECT set_config('tenantry.tenant_id', 'acme', true)"))
            conn.execute(
                text("SELECT set_config('tenantry.signature', :s, true)"),
                {"s": forged.sign("acme", pid)},
            )
            assert conn.scalar(select(sa.func.count()).select_from(app.projects)) == 0
            assert conn.scalar(text("SELECT tenantry.tenant()")) is None
            conn.rollback()
            # the real key's signature for this connection admits acme's rows only
            assert (
                conn.scalar(
                    text("SELECT tenantry.fence('acme', :s)"), {"s": real.sign("acme", pid)}
                )
                == "active"
            )
            assert set(conn.scalars(select(app.projects.c.tenant_id))) == {"acme"}
    finally:
        engine.dispose()


def test_rotate_key_command_never_shows_the_key(pg_fleet: Any, tmp_path: Any) -> None:
    env = {"TENANTRY_CATALOG_URL": pg_fleet.catalog.url}
    runner = CliRunner()
    out = runner.invoke(cli, ["shard", "rotate-key", "shared-a"], env=env)
    assert out.exit_code == 0, out.output
    key = pg_fleet.catalog.fence_key("shared-a")
    assert f"fence key {key.key_id} in use" in out.output
    doc = runner.invoke(cli, ["shard", "rotate-key", "--all", "--json"], env=env)
    assert doc.exit_code == 0, doc.output
    newest = {s: pg_fleet.catalog.fence_key(s) for s in ("shared-a", "solo")}
    for result in (out, doc):
        for secret in (key.secret, *(k.secret for k in newest.values())):
            assert secret.hex() not in result.output
            assert secret.hex().upper() not in result.output
    assert "secret" not in repr(key) and key.secret.hex() not in repr(key)
    # bad input: one line, non-zero, nothing rotated
    before = pg_fleet.catalog.fence_key("shared-a")
    for args in (["shard", "rotate-key"], ["shard", "rotate-key", "nope"]):
        bad = runner.invoke(cli, args, env=env)
        assert bad.exit_code != 0
        assert "Traceback" not in bad.output
    assert pg_fleet.catalog.fence_key("shared-a") == before


def test_sqlite_shards_have_no_fence_key(fleet_builder: Any) -> None:
    fleet = fleet_builder()
    if fleet.pg:
        with operator_transaction(fleet.add_shard("pg")) as conn:
            assert current_key(conn) is not None
        return
    fleet.add_shard("lite")
    with pytest.raises(ConfigurationError, match="SQLite shards have no"):
        fleet.catalog.rotate_fence_key("lite")


def test_a_router_reads_every_fence_key_in_one_query(
    pg_fleet: Any, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = pg_fleet.catalog.fence_keys()
    assert keys["shared-a"] == pg_fleet.catalog.fence_key("shared-a")
    assert set(keys) >= {"shared-a", "solo"}
    router = pg_fleet.new_router()
    reads: list[str] = []
    real = type(router.catalog).fence_keys

    def counted(self: Any) -> Any:
        reads.append("all")
        return real(self)

    def one_by_one(self: Any, name: str, *, resync: bool = False) -> Any:
        raise AssertionError(f"the key of {name} was read on its own")

    monkeypatch.setattr(type(router.catalog), "fence_keys", counted)
    monkeypatch.setattr(type(router.catalog), "fence_key", one_by_one)
    assert projects_seen(router, "acme", app) == {"acme"}
    assert projects_seen(router, "umbrella", app) == {"umbrella"}
    assert reads == ["all"]
    assert router._fence_keys["solo"] == keys["solo"]
