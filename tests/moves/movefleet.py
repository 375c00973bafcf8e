"""A small fleet for move tests: PostgreSQL (two servers) and SQLite shards, the demo
schema migrated on each, and helpers that check the move invariants."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Router, load_settings
from tenantry.demo import MIGRATIONS
from tenantry.demo.models import ChargingSession
from tenantry.migrations import upgrade
from tenantry.shardmap.residency import read_residency

TABLES = ("users", "chargers", "charging_sessions")


@dataclass
class Fleet:
    catalog: Catalog
    catalog_url: str
    urls: dict[str, str]  # shard name -> URL

    def engine(self, shard: str) -> sa.Engine:
        return sa.create_engine(self.urls[shard], poolclass=NullPool)

    def close(self) -> None:
        self.catalog.close()


def build_fleet(
    catalog_url: str,
    shards: Iterable[tuple[str, str, str]],
    **settings: object,
) -> Fleet:
    """*shards*: (name, url, tier). Migrates every shard to the demo app's head."""
    cfg = load_settings(
        catalog_url=catalog_url, alembic_config=str(MIGRATIONS), freeze_timeout=10.0, **settings
    )
    catalog = Catalog(settings=cfg)
    catalog.init()
    urls = {}
    for name, url, tier in shards:
        catalog.add_shard(name, url, tier=tier)
        urls[name] = catalog.get_shard(name).url
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    return Fleet(catalog, catalog_url, urls)


def seed(
    engine: sa.Engine, tenant: str, users: int = 5, chargers: int = 4, sessions: int = 40
) -> None:
    """The tenant's rows, written directly (the operations role)."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (tenant_id, id, email, name) VALUES (:t, :i, :e, :n)"),
            [
                {"t": tenant, "i": i, "e": f"u{i}@{tenant}", "n": f"User {i}"}
                for i in range(1, users + 1)
            ],
        )
        conn.execute(
            sa.text(
                "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                " VALUES (:t, :i, :n, 'bay', :p, 'available')"
            ),
            [
                {"t": tenant, "i": i, "n": f"C{i}", "p": Decimal("22.50") * i}
                for i in range(1, chargers + 1)
            ],
        )
        conn.execute(
            sa.text(
                "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id, started_at,"
                " ended_at, energy_kwh) VALUES (:t, :i, :c, :u, :s, :e, :k)"
            ),
            [
                {
                    "t": tenant,
                    "i": i,
                    "c": 1 + i % chargers,
                    "u": 1 + i % users,
                    "s": start + timedelta(minutes=i),
                    "e": None if i % 7 == 0 else start + timedelta(minutes=i + 30),
                    "k": Decimal("1.125") * i,
                }
                for i in range(1, sessions + 1)
            ],
        )


def tenant_rows(engine: sa.Engine, tenant: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the tenant, per table, in primary-key order, values made comparable."""
    from tenantry.demo.models import Base

    found = {}
    with engine.connect() as conn:
        for name in TABLES:
            # Typed columns, so SQLite's stored text comes back as datetimes and Decimals.
            table = Base.metadata.tables[name]
            rows = conn.execute(
                sa.select(table).where(table.c.tenant_id == tenant).order_by(table.c.id)
            ).all()
            found[name] = [tuple(_plain(v) for v in row) for row in rows]
    return found


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, float):
        return str(Decimal(str(value)).normalize())
    return value


def fingerprint(rows: dict[str, list[tuple[object, ...]]]) -> str:
    return hashlib.sha256(repr(sorted(rows.items())).encode()).hexdigest()


def count_rows(engine: sa.Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return sum(
            conn.execute(
                sa.text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": tenant}
            ).scalar_one()
            for t in TABLES
        )


def analyzed_tables(engine: sa.Engine) -> set[str]:
    """Tables of the database with a manual ANALYZE on record (PostgreSQL)."""
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL")
            ).scalars()
        )


def residency(engine: sa.Engine, tenant: str) -> str | None:
    with engine.connect() as conn:
        state = read_residency(conn, tenant)
    return None if state is None else state.value


def assert_one_home(
    fleet: Fleet, tenant: str, expected: dict[str, list[tuple[object, ...]]]
) -> str:
    """The tenant's rows are complete at its placement and nowhere else; the catalog and
    the residency rows agree; no move of it is live. Return the home shard."""
    catalog = fleet.catalog
    home = catalog.get_tenant(tenant).shard
    assert catalog.get_tenant(tenant).state.value == "active"
    for name in fleet.urls:
        try:
            catalog.get_shard(name)
        except Exception:
            continue  # dropped (demote --drop-source)
        engine = fleet.engine(name)
        try:
            if name == home:
                assert tenant_rows(engine, tenant) == expected, f"data differs at home {name}"
                assert residency(engine, tenant) == "active"
            else:
                assert count_rows(engine, tenant) == 0, f"a copy of {tenant} is left on {name}"
                assert residency(engine, tenant) in (None, "moved"), name
        finally:
            engine.dispose()
    from tenantry.moves import list_moves

    assert not [m for m in list_moves(catalog, live=True) if m.tenant_id == tenant]
    return home


def retrying(
    action: Callable[[], None], errors: tuple[type[BaseException], ...], tries: int = 2000
) -> int:
    """Run *action* until it does not raise one of *errors*; return the retries."""
    import time

    for attempt in range(tries):
        try:
            action()
            return attempt
        except errors:
            time.sleep(0.005)
    raise AssertionError("never succeeded")


def replication_objects(fleet: Fleet) -> set[tuple[str, str, str]]:
    """(shard, kind, name) of every publication, replication slot and subscription in
    the fleet's PostgreSQL databases, tenantry's or not (a table-sync slot left by an
    interrupted initial copy counts)."""
    found = set()
    for shard, url in fleet.urls.items():
        if not url.startswith("postgresql"):
            continue
        engine = fleet.engine(shard)
        with engine.connect() as conn:
            for kind, query in (
                ("publication", "SELECT pubname FROM pg_publication"),
                (
                    "slot",
                    "SELECT slot_name FROM pg_replication_slots"
                    " WHERE database = current_database()",
                ),
                (
                    "subscription",
                    "SELECT subname FROM pg_subscription WHERE subdbid ="
                    " (SELECT oid FROM pg_database WHERE datname = current_database())",
                ),
            ):
                found |= {(shard, kind, n) for n in conn.execute(sa.text(query)).scalars()}
        engine.dispose()
    return found


def pg_shards(fleet: Fleet) -> list[str]:
    """The fleet's PostgreSQL shards still in its catalog (a test may drop one)."""
    registered = {shard.name for shard in fleet.catalog.list_shards()}
    return [
        name
        for name, url in fleet.urls.items()
        if url.startswith("postgresql") and name in registered
    ]


def drop_replication(fleet: Fleet) -> None:
    """Every subscription and replication slot of the fleet's PostgreSQL databases,
    dropped (a failed test may leave some, which would stop the databases from being
    dropped)."""
    for name in pg_shards(fleet):
        engine = sa.create_engine(fleet.urls[name], isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                subs = conn.execute(
                    sa.text(
                        "SELECT subname FROM pg_subscription WHERE subdbid ="
                        " (SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                ).scalars()
                for sub in list(subs):
                    conn.exec_driver_sql(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
                    conn.exec_driver_sql(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
                    conn.exec_driver_sql(f'DROP SUBSCRIPTION "{sub}"')
        finally:
            engine.dispose()
    for name in pg_shards(fleet):
        engine = sa.create_engine(fleet.urls[name], isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for _ in range(100):
                    slots = conn.execute(
                        sa.text(
                            "SELECT slot_name, active_pid FROM pg_replication_slots"
                            " WHERE database = current_database()"
                        )
                    ).all()
                    if not slots:
                        break
                    for slot, pid in slots:
                        if pid is None:
                            drop = "SELECT pg_drop_replication_slot(:s)"
                            conn.execute(sa.text(drop), {"s": slot})
                        else:
                            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    time.sleep(0.05)
        finally:
            engine.dispose()


class AtCheckpoint:
    """Runs *action* once, when the mover reaches checkpoint *name* (a mover's hooks)."""

    def __init__(self, name: str, action: Callable[[], object]) -> None:
        self.name, self.action, self.ran = name, action, False

    def checkpoint(self, name: str) -> None:
        if name == self.name and not self.ran:
            self.ran = True
            self.action()


# -- the CLI in a process of its own (crash tests: a real SIGKILL) -------------------


def cli_env(pause: str | None = None, marker: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTRY_MOVE_PAUSE")}
    env["TENANTRY_ALEMBIC_CONFIG"] = str(MIGRATIONS)
    if pause is not None:
        env["TENANTRY_MOVE_PAUSE"] = pause
        env["TENANTRY_MOVE_PAUSE_FILE"] = str(marker)
    return env


def tenantry_argv(fleet: Fleet, *args: str) -> list[str]:
    return [sys.executable, "-m", "tenantry", "--catalog", fleet.catalog_url, *args]


def run_cli(fleet: Fleet, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the tenantry CLI in a process of its own, to its end."""
    return subprocess.run(
        tenantry_argv(fleet, *args),
        env=cli_env(),
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )


@dataclass
class Paused:
    process: subprocess.Popen[bytes]
    log: Path


def start_paused(fleet: Fleet, tmp_path: Path, checkpoint: str, *args: str) -> Paused:
    """Start ``tenantry ARGS`` and return once the mover sleeps at *checkpoint*."""
    marker = tmp_path / f"paused-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "mover.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            tenantry_argv(fleet, *args),
            env=cli_env(checkpoint, marker),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    try:
        # The mover writes the checkpoint's name into the marker, then sleeps forever.
        while not (marker.exists() and marker.read_text() == checkpoint):
            if process.poll() is not None:
                raise AssertionError(
                    f"the mover ended (exit {process.returncode}) before reaching "
                    f"{checkpoint!r}:\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the mover never reached {checkpoint!r}:\n{log.read_text()}")
            time.sleep(0.02)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Paused(process, log)


def sigkill(paused: Paused) -> None:
    """Kill the mover outright: no cleanup handler, no atexit, no rollback of its own."""
    assert paused.process.poll() is None, "the mover should still be sleeping"
    os.kill(paused.process.pid, signal.SIGKILL)
    assert paused.process.wait(timeout=30) == -signal.SIGKILL


def write_one(router: Router, tenant: str, session_id: int) -> str:
    """Insert one charging session through the router; return the shard that took it."""
    with router.session(tenant) as session:
        session.add(
            ChargingSession(
                id=session_id,
                charger_id=1,
                user_id=1,
                started_at=datetime(2026, 12, 1, tzinfo=UTC),
                ended_at=None,
                energy_kwh=Decimal("7.5"),
            )
        )
        session.commit()
        return str(session.info["tenantry.shard"])


def seed_sqlite(engine: sa.Engine, tenant: str) -> None:
    """20 rows of *tenant* in a SQLite shard: 5 users, 5 chargers, 10 charging sessions
    (no Decimal parameters there)."""
    with engine.begin() as conn:
        for i in range(1, 6):
            conn.execute(
                sa.text("INSERT INTO users (tenant_id, id, email, name) VALUES (:t, :i, :e, 'U')"),
                {"t": tenant, "i": i, "e": f"u{i}@{tenant}"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO chargers (tenant_id, id, name, location, power_kw, status)"
                    " VALUES (:t, :i, 'C', 'bay', 22.5, 'available')"
                ),
                {"t": tenant, "i": i},
            )
        for i in range(1, 11):
            conn.execute(
                sa.text(
                    "INSERT INTO charging_sessions (tenant_id, id, charger_id, user_id,"
                    " started_at, energy_kwh) VALUES (:t, :i, :c, :u, :s, 1.5)"
                ),
                {"t": tenant, "i": i, "c": 1 + i % 5, "u": 1 + i % 5, "s": "2026-11-01 10:00:00"},
            )
