"""The shard's fence function itself (shard revision s0006's body): what it accepts, what
it refuses and how, and that s0007 and s0006 go down to s0005's body and up again.

Raw statements as the routing role ``app`` (NOSUPERUSER NOBYPASSRLS), so whatever a
signature admits is admitted by the shard's policies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tenantry.shardmap.operations import operator_transaction
from tenantry.shardmap.scripts import ALEMBIC_LOCK, SHARD
from tenantry.urls import libpq_conninfo

MALFORMED = "tenantry: a malformed fence signature"
NOT_VERIFIED = "does not verify here"
HEX = "ab" * 32


@pytest.fixture
def raw(pg_fleet: Any) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection to shard "shared-a" as the routing role (the fence makes
    the connection's stamp)."""
    with psycopg.connect(libpq_conninfo(pg_fleet.shard("shared-a").url)) as conn:
        yield conn


def _fence(conn: psycopg.Connection[Any], tenant: str | None, signature: str | None) -> Any:
    try:
        return conn.execute("SELECT tenantry.fence(%s, %s)", (tenant, signature)).fetchone()
    finally:
        conn.rollback()


def _refused(conn: psycopg.Connection[Any], tenant: str | None, signature: str | None) -> str:
    """The message of the fence's refusal, which must be SQLSTATE 28000."""
    with pytest.raises(psycopg.Error) as raised:
        _fence(conn, tenant, signature)
    assert raised.value.sqlstate == "28000", (signature, raised.value)
    return str(raised.value)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        ":",
        "1:",
        ":" + HEX,  # no key id
        "1" + HEX,  # no colon
        "1:" + HEX[:-1],  # 63 hex digits
        "1:" + HEX + "a",  # 65
        "1:" + HEX.upper(),  # upper case
        "1234567890:" + HEX,  # a 10-digit key id
        "+1:" + HEX,
        "-1:" + HEX,
        " 1:" + HEX,
        "1 :" + HEX[:-1],
        "1:" + HEX[:-1] + "g",
        "1:" + HEX[:-2] + ":a",
        "\u0661:" + HEX,  # an Arabic-Indic digit one
        "1:" + HEX[:-1] + "\u00e9",
        "1:1:" + HEX[:-2],
        "1:" + HEX + "\n",
    ],
)
def test_a_malformed_signature_is_refused_as_such(
    raw: psycopg.Connection[Any], signature: str
) -> None:
    assert MALFORMED in _refused(raw, "acme", signature)


def test_null_arguments_are_malformed(raw: psycopg.Connection[Any], pg_fleet: Any) -> None:
    good = pg_fleet.catalog.fence_key("shared-a").sign("acme", raw.info.backend_pid)
    assert MALFORMED in _refused(raw, None, good)
    assert MALFORMED in _refused(raw, "acme", None)


def test_well_formed_signatures_that_do_not_verify(
    raw: psycopg.Connection[Any], pg_fleet: Any
) -> None:
    key = pg_fleet.catalog.fence_key("shared-a")
    pid = raw.info.backend_pid
    for tenant, signature in (
        ("acme", f"999999999:{HEX}"),  # no such key
        ("acme", f"{key.key_id}:{HEX}"),
        ("acme", key.sign("acme", pid + 1)),  # another server connection's
        ("globex", key.sign("acme", pid)),  # another tenant's
    ):
        message = _refused(raw, tenant, signature)
        assert NOT_VERIFIED in message and tenant in message
    # the right one: admitted, and the policies admit the tenant's rows only
    assert raw.execute("SELECT tenantry.fence('acme', %s)", (key.sign("acme", pid),)).fetchone()
    assert raw.execute("SELECT DISTINCT tenant_id FROM projects").fetchall() == [("acme",)]
    assert raw.execute("SELECT tenantry.tenant()").fetchone() == ("acme",)
    stamp = raw.execute("SELECT current_setting('tenantry.signature')").fetchone()
    assert stamp is not None and stamp[0].startswith(f"{key.key_id}:")
    raw.rollback()


def test_a_tenant_not_resident_gets_no_state_and_sees_nothing(
    raw: psycopg.Connection[Any], pg_fleet: Any
) -> None:
    key = pg_fleet.catalog.fence_key("shared-a")
    signature = key.sign("nobody-here", raw.info.backend_pid)
    assert raw.execute("SELECT tenantry.fence('nobody-here', %s)", (signature,)).fetchone() == (
        None,
    )
    assert raw.execute("SELECT count(*) FROM projects").fetchone() == (0,)
    raw.rollback()


def _fence_source(conn: sa.Connection) -> str:
    source = conn.exec_driver_sql(
        "SELECT prosrc FROM pg_proc WHERE oid = 'tenantry.fence(text, text)'::regprocedure"
    ).scalar_one()
    return str(source)


def test_s0006_and_s0007_go_down_to_s0005_and_up_again(pg_fleet_builder: Any) -> None:
    fleet = pg_fleet_builder()
    shard = fleet.add_shard("s", server=0)
    fleet.add_tenant("acme", "s")
    key = fleet.catalog.fence_key("s")

    def routed_rows() -> list[Any]:
        with psycopg.connect(libpq_conninfo(shard.url)) as conn:
            signature = key.sign("acme", conn.info.backend_pid)
            assert conn.execute("SELECT tenantry.fence('acme', %s)", (signature,)).fetchone() == (
                "active",
            )
            return conn.execute("SELECT DISTINCT tenant_id FROM projects").fetchall()

    with operator_transaction(shard) as conn:
        assert SHARD.current(conn) == SHARD.head == "s0008"
        assert "!~" not in _fence_source(conn)
        assert "TY001" in _fence_source(conn)  # s0007's stamp-mode fence
    assert routed_rows() == [("acme",)]
    with operator_transaction(shard) as conn, ALEMBIC_LOCK:
        command.downgrade(SHARD.config(conn), "s0005")
    with operator_transaction(shard) as conn:
        assert SHARD.current(conn) == "s0005"
        assert "!~ '^[0-9]{1,9}:[0-9a-f]{64}$'" in _fence_source(conn)  # s0004's body
    assert routed_rows() == [("acme",)]
    with operator_transaction(shard) as conn:
        SHARD.upgrade(conn)
    with operator_transaction(shard) as conn:
        assert SHARD.current(conn) == "s0008"
        assert "!~" not in _fence_source(conn)
        assert "TY001" in _fence_source(conn)
    assert routed_rows() == [("acme",)]


def _definer_path(conn: sa.Connection) -> Any:
    return conn.exec_driver_sql(
        "SELECT proconfig FROM pg_proc WHERE oid = 'tenantry.writable_tenant()'::regprocedure"
    ).scalar_one()


def test_writable_tenant_runs_no_operator_of_the_callers(
    pg_fleet_builder: Any, app_role: str
) -> None:
    """A routing role that may create objects somewhere (a careless grant) puts an ``=``
    of its own first in its search_path: ``tenantry.writable_tenant()`` runs as its
    owner, so such an operator would run as the owner too. s0006 pins its search_path;
    at s0005 the hijack works, which proves the probe can see it."""
    fleet = pg_fleet_builder()
    shard = fleet.add_shard("s", server=0)
    fleet.add_tenant("acme", "s")
    key = fleet.catalog.fence_key("s")
    with operator_transaction(shard) as conn:
        conn.exec_driver_sql("CREATE SCHEMA careless")
        conn.exec_driver_sql(f'GRANT USAGE, CREATE ON SCHEMA careless TO "{app_role}"')

    def hijacked() -> set[str]:
        """The users the routing role's ``=`` ran as while writable_tenant ran."""
        with psycopg.connect(libpq_conninfo(shard.url)) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS careless.ran_as (who text)")
            conn.execute(
                "CREATE OR REPLACE FUNCTION careless.eq(text, text) RETURNS boolean"
                " LANGUAGE plpgsql AS $$BEGIN"
                " INSERT INTO careless.ran_as VALUES (current_user);"
                " RETURN pg_catalog.texteq($1, $2); END$$"
            )
            if not conn.execute("SELECT to_regoperator('careless.=(text,text)')").fetchone()[0]:
                conn.execute(
                    "CREATE OPERATOR careless.= (LEFTARG = text, RIGHTARG = text,"
                    " FUNCTION = careless.eq)"
                )
            conn.execute("DELETE FROM careless.ran_as")
            conn.commit()
            signature = key.sign("acme", conn.info.backend_pid)
            assert conn.execute("SELECT tenantry.fence('acme', %s)", (signature,)).fetchone()
            conn.execute("SET LOCAL search_path = careless, pg_catalog")
            assert conn.execute("SELECT tenantry.writable_tenant()").fetchone() == ("acme",)
            ran_as = {who for (who,) in conn.execute("SELECT who FROM careless.ran_as")}
            conn.rollback()
            return ran_as

    with operator_transaction(shard) as conn:
        assert _definer_path(conn) == ["search_path=pg_catalog, pg_temp"]
    assert hijacked() == set()
    with operator_transaction(shard) as conn, ALEMBIC_LOCK:
        command.downgrade(SHARD.config(conn), "s0005")
    with operator_transaction(shard) as conn:
        assert _definer_path(conn) is None
    assert hijacked() - {app_role}, "the probe no longer reaches writable_tenant's operator"
    with operator_transaction(shard) as conn:
        SHARD.upgrade(conn)
    assert hijacked() == set()
