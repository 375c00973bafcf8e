"""shardmap.operations: the one recipe for reaching a shard as its operations role."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry import MoveError, Shard, ShardUnavailable
from tenantry.shardmap.operations import (
    operations_engine,
    operator_engine,
    operator_transaction,
    shard_errors,
)
from tenantry.shardmap.residency import Residency, commit_residency, read_residency


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_engine_on_the_operations_url_without_a_pool(tmp_path: Path) -> None:
    shard = Shard(
        "s", f"sqlite:///{tmp_path / 'routing.db'}", admin_url=f"sqlite:///{tmp_path / 'ops.db'}"
    )
    with operations_engine(shard, connect_timeout=3) as engine:
        assert engine.url.database == str(tmp_path / "ops.db")
        assert isinstance(engine.pool, NullPool)


def test_unreachable_shard_is_named() -> None:
    shard = Shard("far", f"postgresql://u:secret@127.0.0.1:{_closed_port()}/db")
    with pytest.raises(ShardUnavailable) as info:
        with operator_transaction(shard, connect_timeout=1):
            pass
    assert info.value.shard == "far"
    assert str(info.value).startswith("cannot reach shard 'far'")
    assert "secret" not in str(info.value)


def test_failures_take_the_callers_class(tmp_path: Path) -> None:
    shard = Shard("s", f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(MoveError, match=r"^shard 's' failed"):
        with operator_engine(shard, failed=MoveError) as engine, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM nowhere"))


def test_a_named_error_keeps_its_shard() -> None:
    with pytest.raises(ShardUnavailable) as info:
        with shard_errors(Shard("outer", "sqlite:///x.db")):
            raise ShardUnavailable("cannot reach shard 'inner'", shard="inner")
    assert info.value.shard == "inner"


def test_commit_residency_on_an_engine_or_a_connection(tmp_path: Path) -> None:
    from tenantry.shardmap.schema import residency

    shard = Shard("s", f"sqlite:///{tmp_path / 's.db'}")
    with operator_engine(shard) as engine:
        residency.create(engine)
        commit_residency(engine, "t1", Residency.ACTIVE, 3)
        with engine.connect() as conn:
            commit_residency(conn, "t1", Residency.FROZEN, 4)
        with engine.connect() as conn:
            assert read_residency(conn, "t1") is Residency.FROZEN
