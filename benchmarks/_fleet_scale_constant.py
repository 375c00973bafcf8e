"""fleet_scale.py's dedicated databases with their tenant as a constant (shard revision
s0007): marking them as tenantry does, unmarking them for ``--compare-stamp``, and the
checks that each way is what it says.

tenantry marks a database dedicated at ``shard add --tier dedicated`` (``prepare_shard``:
``mark_tier`` in an operations transaction, from the catalog's tier); the benchmark's
dedicated databases are copies of one template (a copy is not marked: the mark is bound
to the database's oid) written into the catalog directly, so :func:`mark` does the same
call, through each database's operations (superuser) URL, once its residency row is
there: ``tenantry.tenant()`` is then the tenant as a constant and a routed connection
makes no stamp. ``mark(..., Tier.SHARED)`` is ``mark_dedicated(false)``: the stamp
design back (``--compare-stamp``'s *stamp* side). Each call reads back which constant is
installed (``constant_tenant``) after its commit, so a switch that did not take is seen.

:func:`check` routes a few transactions each way and reports what the server saw: the
rows a routed and a fence-less routing-role connection see (a row of another tenant is
planted in each database), the temporary relations while the router holds its
connections (the stamps), what the fence says to another tenant, ``PREPARE
TRANSACTION`` in a routed transaction, and a read-only routed transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import psycopg
import sqlalchemy as sa

from tenantry import Router, load_settings
from tenantry.shardmap.dedicated import constant_tenant, mark_tier
from tenantry.shardmap.drivers import make_engine
from tenantry.shardmap.model import Shard, Tier
from tenantry.shardmap.operations import operator_engine

#: The two ways ``--compare-stamp`` runs the dedicated databases.
CONSTANT, STAMP = "constant", "stamp"
INTRUDER = "zz-intruder"
PROBE = "tenantry-bench-probe"


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _mark_one(entry: tuple[str, str, str], tier: Tier) -> str | None:
    """``mark_tier`` on one database in an operations transaction; then, after the
    commit, the constant installed there."""
    tenant, url, admin_url = entry
    shard = Shard(name=f"ded-{tenant}", url=url, tier=tier, admin_url=admin_url)
    with operator_engine(shard) as engine, engine.connect() as conn:
        with conn.begin():
            mark_tier(conn, tier)
        return constant_tenant(conn)


def mark(
    dedicated: Sequence[tuple[str, str, str]], tier: Tier = Tier.DEDICATED, threads: int = 4
) -> dict[str, Any]:
    """Mark every database of *dedicated* ((tenant, routing URL, operations URL)) as
    *tier* says (DEDICATED: the constant; SHARED: the stamp), *threads* at a time; return
    the seconds it took and every database whose installed constant is not what the
    mark should have made (its tenant, or none)."""
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        installed = list(pool.map(partial(_mark_one, tier=tier), dedicated))
    seconds = time.monotonic() - started
    want = [t if tier is Tier.DEDICATED else None for t, _u, _a in dedicated]
    wrong = {
        t: got for (t, _u, _a), got, w in zip(dedicated, installed, want, strict=True) if got != w
    }
    return {
        "tier": tier.value,
        "databases": len(dedicated),
        "seconds": round(seconds, 1),
        "as_expected": len(dedicated) - len(wrong),
        "wrong": wrong,
    }


def constants(urls: Sequence[str]) -> list[str | None]:
    """The constant installed in each database of *urls* (operations URLs)."""
    out = []
    for url in urls:
        engine = make_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                out.append(constant_tenant(conn))
        finally:
            engine.dispose()
    return out


def _one_value(url: str, query: str) -> Any:
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    return row[0] if row else None


def _error(exc: sa.exc.DBAPIError) -> str:
    return f"{getattr(exc.orig, 'sqlstate', '')}: {str(exc.orig).strip().splitlines()[0]}"


def check(
    catalog_url: str,
    dedicated: Sequence[tuple[str, str, str]],
    settings: dict[str, Any],
    mode: str,
    table: str,
) -> dict[str, Any]:
    """Route transactions to the tenants of *dedicated* ((tenant, routing URL,
    operations URL), a few) with a router of *settings* while the databases are *mode*
    (``constant`` or ``stamp``), and report what the server saw (see the module's doc)."""
    for tenant, _url, admin in dedicated:
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            for who in (tenant, INTRUDER):
                conn.execute(
                    f"INSERT INTO {table} (tenant_id, id, n) VALUES (%s, 1, 7)"
                    " ON CONFLICT DO NOTHING",
                    (who,),
                )
    installed = dict(
        zip((t for t, _u, _a in dedicated), constants([a for _t, _u, a in dedicated]), strict=True)
    )
    # A connection of the routing role that never ran open_session or the fence.
    bare: dict[str, Any] = {}
    for tenant, url, _admin in dedicated:
        with psycopg.connect(_conninfo(url), autocommit=True) as conn:
            rows = conn.execute(f"SELECT DISTINCT tenant_id FROM {table}").fetchall()
            mine = conn.execute("SELECT tenantry.tenant()").fetchone()
        bare[tenant] = {"rows": sorted(str(r[0]) for r in rows), "tenant()": mine and mine[0]}
    max_prepared = int(_one_value(dedicated[0][2], "SHOW max_prepared_transactions"))
    router = Router(settings=load_settings(catalog_url=catalog_url, **settings))
    seen: dict[str, Any] = {}
    temp: dict[str, int] = {}
    try:
        for tenant, _url, admin in dedicated:
            for _ in range(3):
                with router.session(tenant) as session:
                    rows = session.execute(sa.text(f"SELECT DISTINCT tenant_id FROM {table}"))
                    got = sorted(str(r[0]) for r in rows)
                    mine = session.execute(sa.text("SELECT tenantry.tenant()")).scalar_one()
            seen[tenant] = {"rows": got, "tenant()": mine}
            # while the router holds its connection(s) to this database
            temp[tenant] = int(
                _one_value(admin, "SELECT count(*) FROM pg_class WHERE relpersistence = 't'")
            )
        tenant = dedicated[0][0]
        with router.connection(tenant) as conn:
            conn.exec_driver_sql(f"SELECT n FROM {table} WHERE id = 1").all()
            try:
                conn.exec_driver_sql(f"PREPARE TRANSACTION '{PROBE}'")
                prepared = "prepared"
            except sa.exc.DBAPIError as exc:
                prepared = _error(exc)
        # the fence asked for another tenant, on the router's connection (as the
        # routing role), in a transaction of its own
        other = dedicated[1][0]
        with router.engine_for(tenant).connect() as conn:
            try:
                got = conn.exec_driver_sql(
                    f"SELECT tenantry.fence('{other}', '1:{'0' * 64}')"
                ).scalar()
                fence = f"returned {got!r}"
            except sa.exc.DBAPIError as exc:
                fence = _error(exc)
    finally:
        router.close()
    if prepared == "prepared":
        with psycopg.connect(_conninfo(dedicated[0][2]), autocommit=True) as conn:
            conn.execute(f"ROLLBACK PREPARED '{PROBE}'")
    # a read-only routed transaction (as the engine option postgresql_readonly makes it)
    readonly = type(
        "ReadOnlyRouter",
        (Router,),
        {"engine_factory": staticmethod(partial(make_engine, execution_options={
            "postgresql_readonly": True}))},
    )  # fmt: skip
    ro_router = readonly(settings=load_settings(catalog_url=catalog_url, **settings))
    try:
        with ro_router.session(tenant) as session:
            ro = session.execute(
                sa.text(
                    "SELECT current_setting('transaction_read_only'), tenantry.tenant(),"
                    f" (SELECT count(*) FROM {table})"
                )
            ).one()
            read_only = {"read_only": ro[0], "tenant()": ro[1], "rows": int(ro[2])}
    except sa.exc.DBAPIError as exc:
        read_only = {"error": _error(exc)}
    finally:
        ro_router.close()
    for tenant, _url, admin in dedicated:
        with psycopg.connect(_conninfo(admin), autocommit=True) as conn:
            conn.execute(f"DELETE FROM {table} WHERE tenant_id IN (%s, %s)", (tenant, INTRUDER))
    return {
        "mode": mode,
        "constant_installed": installed,
        "fenceless_routing_role": bare,
        "rows_seen": seen,
        "temporary_relations_while_connected": temp,
        "fence_for_another_tenant": fence,
        "max_prepared_transactions": max_prepared,
        "prepare_transaction": prepared,
        "read_only_transaction": read_only,
        "premises": premises(
            mode, dedicated, installed, bare, seen, temp, prepared, max_prepared, read_only
        ),
    }


def premises(
    mode: str,
    dedicated: Sequence[tuple[str, str, str]],
    installed: dict[str, str | None],
    bare: dict[str, Any],
    seen: dict[str, Any],
    temp: dict[str, int],
    prepared: str,
    max_prepared: int,
    read_only: dict[str, Any],
) -> dict[str, bool]:
    """Each premise of the comparison, held or not, for *mode*."""
    tenants = [t for t, _u, _a in dedicated]
    constant = mode == CONSTANT
    out = {
        "constant installed" if constant else "no constant installed": all(
            installed[t] == (t if constant else None) for t in tenants
        ),
        "a routed transaction sees only its tenant's rows": all(
            seen[t] == {"rows": [t], "tenant()": t} for t in tenants
        ),
        (
            "a fence-less routing-role connection sees only its tenant's rows"
            if constant
            else "a fence-less routing-role connection sees nothing"
        ): all(
            bare[t]
            == ({"rows": [t], "tenant()": t} if constant else {"rows": [], "tenant()": None})
            for t in tenants
        ),
        (
            "a routed connection makes no temporary relation"
            if constant
            else "a routed connection makes its stamp (a temporary relation)"
        ): all((temp[t] == 0) if constant else (temp[t] >= 1) for t in tenants),
        "a read-only routed transaction works": read_only.get("read_only") == "on"
        and read_only.get("tenant()") == tenants[0]
        and read_only.get("rows") == 1,
    }
    if max_prepared > 0:
        out["PREPARE TRANSACTION refused in a routed transaction"] = prepared.startswith("0A000")
    return out
