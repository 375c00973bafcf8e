"""The whole fleet on one screen (``tenantry status``).

Every shard is checked at once (a thread each, at most *jobs* together), each on one
connection of its operations role opened with a bounded connect timeout, so a fleet of
1,000 shards answers in a few seconds and a shard that cannot be reached costs its
timeout, not the run: it is reported, never raised. Per shard: reachability, the
application's schema revision (against its head when the Alembic scripts are known)
and tenantry's own per-shard revision, the tenants the catalog places there, its bytes
(``pg_database_size``; a SQLite file's size), the connections open to it, and the
logical replication slots of its database with their lag. Per PostgreSQL server
(``host:port`` of the operations URL): connections in use against ``max_connections``
and the physical slots. From the catalog: the live moves of the journal and how far
each has come. What needs an operator's attention is listed in ``attention``, one
sentence each with the command to run; nothing here ever shows a password.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from tenantry.errors import TenantryError
from tenantry.migrations.fleet import app_config, format_heads, script_directory, version_heads
from tenantry.migrations.fleet_status import classify
from tenantry.moves.journal import Journal, Move, MoveMode
from tenantry.moves.replication import PREFIX, move_names, recorded_names
from tenantry.shardmap.catalog import Catalog, catalog_of
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.model import Shard
from tenantry.shardmap.operations import operations_engine
from tenantry.shardmap.scripts import SHARD
from tenantry.urls import mask_url

__all__ = [
    "APPLICATION_NAME",
    "CONNECTIONS_WARN",
    "FleetStatus",
    "MoveProgress",
    "ServerStatus",
    "ShardStatus",
    "SlotStatus",
    "fleet_status",
    "server_of",
]

#: A server with this share of its usable connections in use needs attention.
CONNECTIONS_WARN = 0.9
#: The application_name of status' connections (which it leaves out of the counts: a
#: fleet's shards checked at once would otherwise count each other).
APPLICATION_NAME = "tenantry-status"

#: The steps of each mode, in order (the move protocol in DESIGN.md).
_STEPS = {
    MoveMode.OFFLINE: ("planned", "frozen", "copied", "verified", "switched", "cleaned"),
    MoveMode.ONLINE: ("planned", "copied", "frozen", "verified", "switched", "cleaned"),
}


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """One replication slot and how far behind its consumer is."""

    name: str
    #: ``logical`` or ``physical``.
    kind: str
    active: bool
    #: WAL written since the consumer last confirmed (logical: ``confirmed_flush_lsn``;
    #: physical: ``restart_lsn``), in bytes; None on a standby.
    lag_bytes: int | None
    #: WAL the slot keeps on disk (since ``restart_lsn``), in bytes.
    retained_bytes: int | None
    #: PostgreSQL's ``wal_status`` (reserved, extended, unreserved, lost).
    wal_status: str | None
    #: Named as tenantry's moves name theirs (``tenantry_move_...``).
    tenantry: bool = False
    #: The live move of this catalog that owns it.
    move: int | None = None
    #: A slot of this fleet that no live move owns (``tenantry moves gc`` drops it).
    leftover: bool = False

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "name": self.name,
            "kind": self.kind,
            "active": self.active,
            "lag_bytes": self.lag_bytes,
            "retained_bytes": self.retained_bytes,
            "wal_status": self.wal_status,
            "tenantry": self.tenantry,
            "move": self.move,
            "leftover": self.leftover,
        }


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One PostgreSQL server of the fleet, as its shards saw it."""

    server: str
    version: str | None
    max_connections: int
    reserved_connections: int
    #: Client connections open on the server (status' own left out).
    connections: int
    shards: tuple[str, ...]
    physical_slots: tuple[SlotStatus, ...] = ()

    @property
    def usable(self) -> int:
        """Connections ordinary roles may open: ``max_connections`` less the reserve."""
        return max(0, self.max_connections - self.reserved_connections)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "server": self.server,
            "version": self.version,
            "max_connections": self.max_connections,
            "reserved_connections": self.reserved_connections,
            "connections": self.connections,
            "shards": list(self.shards),
            "physical_slots": [s.to_record() for s in self.physical_slots],
        }


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard: can it be reached, its schema, what it holds, what it carries."""

    name: str
    tier: str
    state: str
    backend: str
    url: str  # masked
    tenants: int
    reachable: bool
    error: str | None = None
    #: ``host:port`` of its server (PostgreSQL).
    server: str | None = None
    app_revision: str | None = None
    #: ok, behind, ahead or unknown against the app's head; None when the head is unknown.
    app_verdict: str | None = None
    tenantry_revision: str | None = None
    #: The tenant that is its database's constant (shard revision s0007: a dedicated
    #: database holding one tenant), or None.
    constant_tenant: str | None = None
    bytes: int | None = None
    #: Client connections open to its database (PostgreSQL; status' own left out, by
    #: their application_name).
    connections: int | None = None
    slots: tuple[SlotStatus, ...] = ()
    #: Seconds its check took.
    seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields (the URL masked)."""
        return {
            "name": self.name,
            "tier": self.tier,
            "state": self.state,
            "backend": self.backend,
            "url": self.url,
            "server": self.server,
            "reachable": self.reachable,
            "error": self.error,
            "app_revision": self.app_revision,
            "app_verdict": self.app_verdict,
            "tenantry_revision": self.tenantry_revision,
            "constant_tenant": self.constant_tenant,
            "tenants": self.tenants,
            "bytes": self.bytes,
            "connections": self.connections,
            "slots": [s.to_record() for s in self.slots],
        }


@dataclass(frozen=True, slots=True)
class MoveProgress:
    """A live move of the journal and how far it has come."""

    id: int
    tenant: str
    kind: str
    mode: str
    source: str
    target: str
    state: str
    #: The state's position in its mode's steps (1-6; an ``aborted`` move being rolled
    #: back counts as 0).
    step: int
    steps: int
    #: Seconds since the move was planned, and since its last journal write.
    age_seconds: float | None
    idle_seconds: float | None
    #: Rows and bytes copied (offline) or verified (online) so far, from its stats.
    rows: int | None
    bytes: int | None
    #: Online moves: WAL its subscription has still to confirm on the source, in bytes.
    lag_bytes: int | None
    error: str | None
    next: str | None
    owner: str | None

    def to_record(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "kind": self.kind,
            "mode": self.mode,
            "source": self.source,
            "target": self.target,
            "state": self.state,
            "step": self.step,
            "steps": self.steps,
            "age_seconds": self.age_seconds,
            "idle_seconds": self.idle_seconds,
            "rows": self.rows,
            "bytes": self.bytes,
            "lag_bytes": self.lag_bytes,
            "error": self.error,
            "next": self.next,
            "owner": self.owner,
        }


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """The fleet as ``tenantry status`` shows it."""

    catalog: str  # masked
    map_version: int
    app_head: str | None
    tenantry_head: str
    shards: list[ShardStatus]
    servers: list[ServerStatus]
    moves: list[MoveProgress]
    attention: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing needs an operator's attention."""
        return not self.attention

    def to_record(self) -> dict[str, Any]:
        """``tenantry status --json``."""
        return {
            "catalog": self.catalog,
            "map_version": self.map_version,
            "app_head": self.app_head,
            "tenantry_head": self.tenantry_head,
            "ok": self.ok,
            "attention": list(self.attention),
            "shards": [s.to_record() for s in self.shards],
            "servers": [s.to_record() for s in self.servers],
            "moves": [m.to_record() for m in self.moves],
            "seconds": round(self.seconds, 3),
        }


def server_of(url: str) -> str:
    """``host:port`` of a PostgreSQL URL (``local`` for a Unix socket)."""
    parsed = make_url(url)
    host = parsed.host or str(parsed.query.get("host") or "local")
    return f"{host}:{parsed.port or 5432}"


# -- one shard ------------------------------------------------------------------------------

_PG_FACTS = sa.text(
    """
    SELECT pg_database_size(current_database()) AS size,
           current_setting('max_connections')::int AS max_connections,
           current_setting('superuser_reserved_connections')::int AS reserved,
           current_setting('server_version') AS version,
           (SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'client backend'
               AND application_name IS DISTINCT FROM :me) AS server_conns,
           (SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'client backend'
               AND application_name IS DISTINCT FROM :me
               AND datname = current_database()) AS conns,
           to_regclass('alembic_version') IS NOT NULL AS app_versioned,
           to_regclass('tenantry_shard_version') IS NOT NULL AS shard_versioned,
           to_regclass('tenantry.dedicated') IS NOT NULL AS marks_dedicated
    """
)

# On a standby there is no current WAL position to measure lag from.
_PG_SLOTS = sa.text(
    """
    WITH here AS (
        SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END AS lsn
    )
    SELECT slot_name, slot_type, database IS NULL AS physical, active, wal_status,
           pg_wal_lsn_diff(here.lsn, restart_lsn)::bigint AS retained,
           pg_wal_lsn_diff(here.lsn, COALESCE(confirmed_flush_lsn, restart_lsn))::bigint
               AS lag
      FROM pg_replication_slots, here
     WHERE database = current_database() OR database IS NULL
     ORDER BY slot_name
    """
)


@dataclass(frozen=True, slots=True)
class _Probe:
    """What one shard's connection found (before the fleet-wide view is put together)."""

    status: ShardStatus
    server: ServerStatus | None = None


def _slot(row: Any) -> SlotStatus:
    return SlotStatus(
        name=row.slot_name,
        kind=row.slot_type,
        active=bool(row.active),
        lag_bytes=None if row.lag is None else max(0, int(row.lag)),
        retained_bytes=None if row.retained is None else max(0, int(row.retained)),
        wal_status=row.wal_status,
        tenantry=row.slot_name.startswith(PREFIX),
    )


def _revisions(conn: Connection, script: ScriptDirectory | None, heads: set[str]) -> dict[str, Any]:
    current = version_heads(conn, "alembic_version")
    return {
        "app_revision": format_heads(current),
        "app_verdict": classify(script, current, heads) if script is not None else None,
        "tenantry_revision": SHARD.current(conn),
    }


def _pg_revisions(
    conn: Connection, facts: Any, script: ScriptDirectory | None, heads: set[str]
) -> dict[str, Any]:
    """:func:`_revisions` in one query at most: the version tables' existence came with
    the facts (Alembic's own reading costs a few catalog queries per table)."""
    parts = []
    if facts.app_versioned:
        parts.append("SELECT 'app', version_num FROM alembic_version")
    if facts.shard_versioned:
        parts.append("SELECT 'shard', version_num FROM tenantry_shard_version")
    if facts.marks_dedicated:
        parts.append(
            "SELECT 'constant', installed FROM tenantry.dedicated"
            " WHERE installed_in = current_database()"
        )
    found: dict[str, set[str]] = {"app": set(), "shard": set(), "constant": set()}
    if parts:
        for which, revision in conn.exec_driver_sql(" UNION ALL ".join(parts)):
            found[which].add(revision)
    current = found["app"]
    return {
        "app_revision": format_heads(current),
        "app_verdict": classify(script, current, heads) if script is not None else None,
        "tenantry_revision": format_heads(found["shard"]),
        "constant_tenant": next(iter(found["constant"] - {None}), None),
    }


def _probe_postgres(
    shard: Shard, base: ShardStatus, timeout: float, script: ScriptDirectory | None, heads: set[str]
) -> _Probe:
    millis = int(max(timeout, 1.0) * 1000)
    with (
        operations_engine(
            shard,
            connect_timeout=timeout,
            isolation_level="AUTOCOMMIT",
            # A server that accepts the connection and then hangs is bounded too.
            connect_args={
                "options": f"-c statement_timeout={millis}",
                "application_name": APPLICATION_NAME,
            },
        ) as engine,
        engine.connect() as conn,
    ):
        facts = conn.execute(_PG_FACTS, {"me": APPLICATION_NAME}).one()
        slots = [(bool(r.physical), _slot(r)) for r in conn.execute(_PG_SLOTS)]
        revisions = _pg_revisions(conn, facts, script, heads)
    server = server_of(shard.operations_url)
    status = replace(
        base,
        reachable=True,
        server=server,
        bytes=int(facts.size),
        connections=int(facts.conns),
        slots=tuple(s for physical, s in slots if not physical),
        **revisions,
    )
    return _Probe(
        status,
        ServerStatus(
            server=server,
            version=str(facts.version).split(" ")[0],
            max_connections=int(facts.max_connections),
            reserved_connections=int(facts.reserved),
            connections=int(facts.server_conns),
            shards=(shard.name,),
            physical_slots=tuple(s for physical, s in slots if physical),
        ),
    )


def _probe_sqlite(
    shard: Shard, base: ShardStatus, script: ScriptDirectory | None, heads: set[str]
) -> _Probe:
    database = make_url(shard.operations_url).database
    path = Path(database) if database and database != ":memory:" else None
    if path is None or not path.is_file():
        # Connecting would create an empty file and call it a shard.
        return _Probe(replace(base, error=f"no such database file: {database}"))
    with operations_engine(shard, connect_timeout=1.0) as engine, engine.connect() as conn:
        revisions = _revisions(conn, script, heads)
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.is_file())
    return _Probe(replace(base, reachable=True, bytes=size, **revisions))


def _probe(
    shard: Shard, tenants: int, timeout: float, script: ScriptDirectory | None, heads: set[str]
) -> _Probe:
    started = time.monotonic()
    base = ShardStatus(
        name=shard.name,
        tier=shard.tier.value,
        state=shard.state.value,
        backend=shard.backend,
        url=mask_url(shard.url),
        tenants=tenants,
        reachable=False,
        server=server_of(shard.operations_url) if shard.backend == "postgresql" else None,
    )
    try:
        if shard.backend == "postgresql":
            probe = _probe_postgres(shard, base, timeout, script, heads)
        else:
            probe = _probe_sqlite(shard, base, script, heads)
    except (sa.exc.SQLAlchemyError, TenantryError, OSError) as exc:
        probe = _Probe(replace(base, error=describe_error(exc)))
    return replace(probe, status=replace(probe.status, seconds=time.monotonic() - started))


# -- the fleet ------------------------------------------------------------------------------


def _servers(probes: Sequence[_Probe]) -> list[ServerStatus]:
    """One record per server: the facts of its last-checked shard, every shard named."""
    merged: dict[str, ServerStatus] = {}
    for probe in probes:
        found = probe.server
        if found is None:
            continue
        seen = merged.get(found.server)
        shards = (seen.shards if seen else ()) + found.shards
        merged[found.server] = replace(found, shards=tuple(sorted(shards)))
    return [merged[k] for k in sorted(merged)]


def _progress(
    move: Move, now: datetime, lags: Mapping[tuple[str, str], int | None]
) -> MoveProgress:
    steps = _STEPS[move.mode]
    state = move.state.value
    stats = move.stats
    rows = stats.get("rows")
    size = stats.get("bytes")
    verified = stats.get("verified")
    if rows is None and isinstance(verified, dict) and verified:
        rows = sum(int(t.get("rows", 0)) for t in verified.values())
    if rows is None:  # an online move's initial copy, as far as it was seen
        rows = stats.get("copied_rows")
    if size is None:
        size = stats.get("copied_bytes")
    slot = move.artifacts.get("slot")
    lag = lags.get((move.source, str(slot))) if slot and move.mode is MoveMode.ONLINE else None

    def since(when: datetime | None) -> float | None:
        return None if when is None else round((now - when).total_seconds(), 3)

    return MoveProgress(
        id=move.id,
        tenant=move.tenant_id,
        kind=move.kind.value,
        mode=move.mode.value,
        source=move.source,
        target=move.target,
        state=state,
        step=steps.index(state) + 1 if state in steps else 0,
        steps=len(steps),
        age_seconds=since(move.created_at),
        idle_seconds=since(move.updated_at),
        rows=None if rows is None else int(rows),
        bytes=None if size is None else int(size),
        lag_bytes=lag,
        error=move.error,
        next=move.next_step(),
        owner=move.owner,
    )


def _mark_slots(
    shards: list[ShardStatus], catalog: Catalog, live: Sequence[Move], every: Sequence[Move]
) -> list[ShardStatus]:
    """Say which slots are this fleet's: owned by a live move, or left over."""
    fleet = catalog.fleet_id()
    ours = f"{PREFIX}{fleet}_"
    owner: dict[str, int] = {}
    for m in live:
        for name in move_names(m.artifacts, m.id, fleet).all() | recorded_names(m.artifacts):
            owner[name] = m.id
    recorded = {name for m in every for name in recorded_names(m.artifacts)}
    marked = []
    for s in shards:
        slots = tuple(
            replace(
                slot,
                move=owner.get(slot.name),
                leftover=slot.name not in owner
                and (slot.name.startswith(ours) or slot.name in recorded),
            )
            for slot in s.slots
        )
        marked.append(replace(s, slots=slots))
    return marked


def _attention(
    shards: Sequence[ShardStatus],
    servers: Sequence[ServerStatus],
    moves: Sequence[MoveProgress],
    app_head: str | None,
) -> list[str]:
    found: list[str] = []
    for s in shards:
        if not s.reachable:
            if s.state != "retired" or s.tenants:  # a retired, empty shard may be gone
                found.append(f"shard {s.name} cannot be reached: {s.error}")
            continue
        if s.app_verdict not in (None, "ok"):
            found.append(
                f"shard {s.name}: schema {s.app_revision or 'none'} is {s.app_verdict} "
                f"(head {app_head}): run `tenantry migrate upgrade`"
            )
        if s.tenantry_revision != SHARD.head:
            found.append(
                f"shard {s.name}: tenantry's tables at {s.tenantry_revision or 'none'}, "
                f"not {SHARD.head}: run `tenantry migrate upgrade`"
            )
        for slot in s.slots:
            if slot.leftover:
                found.append(
                    f"shard {s.name}: replication slot {slot.name} belongs to no live move "
                    "and holds WAL: run `tenantry moves gc`"
                )
            elif slot.wal_status == "lost":
                found.append(f"shard {s.name}: replication slot {slot.name} has lost WAL it needs")
    if app_head is None:
        revisions = {s.app_revision for s in shards if s.reachable}
        if len(revisions) > 1:
            found.append(
                "shards differ in schema revision ("
                + ", ".join(sorted(r or "none" for r in revisions))
                + "): run `tenantry migrate status`"
            )
    in_use = {s.name for s in shards if s.state != "retired" or s.tenants}
    for server in servers:
        if server.usable and server.connections >= CONNECTIONS_WARN * server.usable:
            found.append(
                f"server {server.server}: {server.connections} of {server.usable} usable "
                "connections in use"
            )
        # A connection serves one database: past this, routers cannot keep an idle
        # connection to each database, and a transaction to a database without one
        # opens a new server session (DESIGN.md, "What a miss costs"). Retired shards
        # that hold no tenant are not routed to.
        routed = sum(1 for name in server.shards if name in in_use)
        if routed > server.usable:
            found.append(
                f"server {server.server}: {routed} shard databases but "
                f"{server.usable} usable connections (max_connections "
                f"{server.max_connections}), so routers cannot keep a connection to each: "
                "raise max_connections above the number of databases, or move shards "
                "to another server"
            )
        found.extend(
            f"server {server.server}: replication slot {slot.name} has lost WAL it needs"
            for slot in server.physical_slots
            if slot.wal_status == "lost"
        )
    for m in moves:
        if m.error:
            found.append(f"move {m.id} ({m.tenant}) stopped: {m.error}: run `{m.next}`")
    return found


def fleet_status(
    target: object,
    *,
    timeout: float = 3.0,
    jobs: int = 32,
    alembic_config: str | Path | None = None,
) -> FleetStatus:
    """The fleet's status: every shard checked at once (at most *jobs* together), each
    given *timeout* seconds to connect; the application's head from *alembic_config*
    (default: the ``alembic_config`` setting; none: revisions are shown, not judged)."""
    started = time.monotonic()
    catalog = catalog_of(target)
    source = alembic_config if alembic_config is not None else catalog.settings.alembic_config
    script = script_directory(app_config(source)) if source is not None else None
    heads = set(script.get_heads()) if script is not None else set()
    listing = catalog.shard_listing()
    journal = Journal(catalog)
    every = journal.list()
    live = [m for m in every if m.live]
    workers = max(1, min(jobs, len(listing.shards)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tenantry-status") as pool:
        probes = list(
            pool.map(lambda item: _probe(item[0], item[1], timeout, script, heads), listing.shards)
        )
    shards = _mark_slots([p.status for p in probes], catalog, live, every)
    servers = _servers(probes)
    lags = {(s.name, slot.name): slot.lag_bytes for s in shards for slot in s.slots}
    now = datetime.now(UTC)
    progress = [_progress(m, now, lags) for m in sorted(live, key=lambda m: m.id)]
    app_head = (format_heads(heads) or "base") if script is not None else None
    return FleetStatus(
        catalog=mask_url(catalog.url),
        map_version=listing.map_version,
        app_head=app_head,
        tenantry_head=SHARD.head,
        shards=shards,
        servers=servers,
        moves=progress,
        attention=_attention(shards, servers, progress, app_head),
        seconds=time.monotonic() - started,
    )
