"""Registering many tenants at once (:meth:`Catalog.add_tenants`, ``tenantry tenant
import``): records read from CSV or JSON Lines, placed by the ring or on the shards they
name, written in batches.

Each batch is one catalog transaction and one map version: its records are checked as
``add_tenant`` checks one (the same errors), their residency rows are written on each
shard they go to (one transaction per shard), then the catalog rows and the change log
are inserted and committed. A record that fails leaves its whole batch unwritten (the
residency rows already written are taken back) and stops the import with one line
naming the input line; the batches before it stay.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from tenantry.errors import (
    ConfigurationError,
    NoSharedShard,
    PlacementError,
    ShardOccupied,
    TenantExists,
    TenantryError,
    TierMismatch,
    UnknownShard,
)
from tenantry.shardmap.catalog.store import shard_from_row
from tenantry.shardmap.drivers import WRITE
from tenantry.shardmap.model import (
    Shard,
    Tier,
    require_active,
    validate_shard_name,
    validate_tenant_id,
)
from tenantry.shardmap.operations import operations_engine, shard_errors
from tenantry.shardmap.residency import Residency
from tenantry.shardmap.ring import PlacementRing
from tenantry.shardmap.schema import map_changes, residency, shards, tenants

if TYPE_CHECKING:
    from tenantry.shardmap.catalog.store import CatalogStore

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FIELDS",
    "BulkImportFailed",
    "BulkProgress",
    "BulkSummary",
    "TenantRecord",
    "add_tenants",
    "read_records",
]

#: Tenants per batch (one catalog transaction, one map version) unless told.
DEFAULT_BATCH_SIZE = 1_000
#: The fields of a record: ``id`` required, the others optional.
FIELDS = ("id", "shard", "tier", "pinned")
_IN_CHUNK = 5_000
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off", ""}


class BulkImportFailed(TenantryError):
    """A record could not be added: its batch was left unwritten, the import stopped.

    ``line`` is the record's line in the input (or its position, from 1, when it came
    from no file), ``cause`` the error ``add_tenant`` would raise for it (None for a
    malformed line), ``added`` how many tenants earlier batches added.
    """

    def __init__(self, message: str, *, line: int, cause: TenantryError | None, added: int) -> None:
        super().__init__(message)
        self.line = line
        self.cause = cause
        self.added = added


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """One tenant to add: what ``tenant add`` takes, and where it came from (``line``)."""

    id: str
    shard: str | None = None
    tier: Tier = Tier.SHARED
    pinned: bool = False
    line: int | None = None


@dataclass(frozen=True, slots=True)
class BulkProgress:
    """After each committed batch: tenants added so far, batches, seconds elapsed."""

    added: int
    batches: int
    seconds: float

    @property
    def rate(self) -> float:
        """Tenants added per second so far."""
        return self.added / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BulkSummary:
    """What :meth:`Catalog.add_tenants` did."""

    added: int
    batches: int
    seconds: float
    first_version: int | None
    last_version: int | None
    per_shard: Mapping[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Tenants added per second."""
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def to_record(self) -> dict[str, Any]:
        """The summary as JSON-ready fields."""
        return {
            "added": self.added,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "first_version": self.first_version,
            "last_version": self.last_version,
            "per_shard": dict(sorted(self.per_shard.items())),
        }


class _BadLine(BulkImportFailed):
    """A record refused, before its batch's outcome is known."""

    def __init__(self, line: int, reason: str, cause: TenantryError | None = None) -> None:
        super().__init__(f"line {line}: {reason}", line=line, cause=cause, added=0)
        self.reason = reason


# -- input --------------------------------------------------------------------------


def read_records(stream: Iterable[str], fmt: str | None = None) -> Iterator[TenantRecord]:
    """The records of a CSV (a header row naming its columns among id, shard, tier,
    pinned) or JSON Lines (one object a line, those keys) text stream or iterable of
    lines, read lazily; blank lines are skipped. *fmt* is ``csv`` or ``jsonl``; None:
    JSON Lines when the first non-blank line starts with ``{``, else CSV. A malformed
    line raises :class:`BulkImportFailed` naming it when it is reached."""
    if fmt not in (None, "csv", "jsonl"):
        raise ConfigurationError(f"unknown input format {fmt!r}: use csv or jsonl", field="format")
    lines = iter(stream)
    peeked: list[str] = []
    if fmt is None:
        for text in lines:
            peeked.append(text)
            if text.strip():
                break
        fmt = "jsonl" if peeked and peeked[-1].lstrip().startswith("{") else "csv"
    chained = itertools.chain(peeked, lines)
    return _csv_records(chained) if fmt == "csv" else _jsonl_records(chained)


def _csv_records(stream: Iterable[str]) -> Iterator[TenantRecord]:
    reader = csv.reader(stream)
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            unknown = [name for name in header if name not in FIELDS]
            if "id" not in header or unknown or len(set(header)) != len(header):
                raise _bad(
                    line,
                    f"the CSV header must name its columns among {', '.join(FIELDS)} "
                    f"(id required, each once), not {','.join(row)!r}",
                )
            continue
        if len(row) != len(header):
            raise _bad(line, f"{len(row)} value(s) where the header names {len(header)}")
        yield _record(dict(zip(header, (cell.strip() for cell in row), strict=True)), line)


def _jsonl_records(stream: Iterable[str]) -> Iterator[TenantRecord]:
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _bad(line, f"not valid JSON ({exc.args[0].split(':')[0]})") from None
        if not isinstance(value, dict):
            raise _bad(line, 'not a JSON object: give {"id": ...} on each line')
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise _bad(line, f"unknown field(s) {', '.join(unknown)}: use {', '.join(FIELDS)}")
        yield _record(value, line)


def _record(fields: Mapping[str, Any], line: int) -> TenantRecord:
    """A TenantRecord of a record's fields, checked as ``tenant add`` checks its own."""
    tenant_id = fields.get("id")
    if tenant_id is None or tenant_id == "":
        raise _bad(line, "no tenant id")
    if not isinstance(tenant_id, str):
        raise _bad(line, f"the tenant id must be a string, not {tenant_id!r}")
    shard = fields.get("shard") or None
    if shard is not None and not isinstance(shard, str):
        raise _bad(line, f"the shard must be a name, not {shard!r}")
    tier_value = fields.get("tier") or Tier.SHARED.value
    try:
        tier = Tier(str(tier_value).lower())
    except ValueError:
        raise _bad(line, f"unknown tier {tier_value!r}: use shared or dedicated") from None
    pinned = fields.get("pinned", False)
    if isinstance(pinned, str):
        text = pinned.strip().lower()
        if text not in _TRUE | _FALSE:
            raise _bad(line, f"pinned must be true or false, not {pinned!r}")
        pinned = text in _TRUE
    elif pinned is None:
        pinned = False
    elif not isinstance(pinned, bool):
        raise _bad(line, f"pinned must be true or false, not {pinned!r}")
    return TenantRecord(tenant_id, shard, tier, pinned, line)


def _bad(line: int, reason: str) -> _BadLine:
    return _BadLine(line, reason)


# -- writing ------------------------------------------------------------------------


def add_tenants(
    store: CatalogStore,
    records: Iterable[TenantRecord | Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[BulkProgress], None] | None = None,
) -> BulkSummary:
    """Add *records* in batches of *batch_size* (see the module's docstring)."""
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
    started = time.monotonic()
    seen: dict[str, int] = {}
    per_shard: dict[str, int] = defaultdict(int)
    added = batches = 0
    first_version: int | None = None
    last_version: int | None = None
    with ExitStack() as engines_stack:
        engines: dict[str, Engine] = {}

        def engine_of(shard: Shard) -> Engine:
            engine = engines.get(shard.name)
            if engine is None:
                with shard_errors(shard):
                    engine = engines_stack.enter_context(
                        operations_engine(shard, connect_timeout=store.settings.connect_timeout)
                    )
                engines[shard.name] = engine
            return engine

        batch: list[TenantRecord] = []
        iterator = iter(records)
        position = 0
        while True:
            batch.clear()
            try:
                for item in iterator:
                    position += 1
                    record = _as_record(item, position)
                    _check_record(record, seen)
                    batch.append(record)
                    if len(batch) >= batch_size:
                        break
            except _BadLine as exc:
                raise _stopped(exc.line, exc.reason, exc.cause, added, batch) from None
            if not batch:
                break
            try:
                version, placed = _write_batch(store, batch, engine_of)
            except _BadLine as exc:
                raise _stopped(exc.line, exc.reason, exc.cause, added, batch) from None
            except BulkImportFailed:
                raise
            except TenantryError as exc:  # a shard or the catalog failed: no line to blame
                line = batch[0].line or position
                raise _stopped(line, str(exc), exc, added, batch, blame=False) from None
            for name in placed:
                per_shard[name] += 1
            added += len(batch)
            batches += 1
            first_version = version if first_version is None else first_version
            last_version = version
            if on_batch is not None:
                on_batch(BulkProgress(added, batches, time.monotonic() - started))
    return BulkSummary(
        added, batches, time.monotonic() - started, first_version, last_version, dict(per_shard)
    )


def _as_record(item: TenantRecord | Mapping[str, Any], position: int) -> TenantRecord:
    if isinstance(item, TenantRecord):
        return item if item.line is not None else _with_line(item, position)
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise _bad(position, f"unknown field(s) {', '.join(unknown)}: use {', '.join(FIELDS)}")
    return _record(item, position)


def _with_line(record: TenantRecord, line: int) -> TenantRecord:
    return TenantRecord(record.id, record.shard, Tier(record.tier), record.pinned, line)


def _check_record(record: TenantRecord, seen: dict[str, int]) -> None:
    """What can be checked without the catalog: the id and shard name rules, a
    dedicated tenant's shard, an id given twice."""
    line = record.line or 0
    try:
        validate_tenant_id(record.id)
        if record.shard is not None:
            validate_shard_name(record.shard)
        if Tier(record.tier) is Tier.DEDICATED and record.shard is None:
            raise PlacementError(
                "a dedicated tenant needs its own shard: add one with "
                "`tenantry shard add NAME URL --tier dedicated`, then give its name in "
                "the shard column",
                tenant_id=record.id,
            )
    except TenantryError as exc:
        raise _BadLine(line, str(exc), exc) from None
    first = seen.get(record.id)
    if first is not None:
        raise _BadLine(line, f"tenant {record.id!r} is given twice (first on line {first})")
    seen[record.id] = line


def _stopped(
    line: int,
    reason: str,
    cause: TenantryError | None,
    added: int,
    batch: list[TenantRecord],
    *,
    blame: bool = True,
) -> BulkImportFailed:
    start = min([r.line for r in batch if r.line is not None] + [line])
    before = f"the {added:,} tenant(s) before it were added" if added else "nothing was added"
    what, fix = (f"line {line}: {reason}", "fix the line and") if blame else (reason, "then")
    return BulkImportFailed(
        f"{what}; nothing from line {start} on was added, {before}: {fix} import again "
        f"from line {start}",
        line=line,
        cause=cause,
        added=added,
    )


def _write_batch(
    store: CatalogStore, batch: list[TenantRecord], engine_of: Callable[[Shard], Engine]
) -> tuple[int, list[str]]:
    """One batch: checked against the catalog, residency rows written, catalog rows
    committed as one map version. Returns the version and each record's shard."""
    written: dict[str, tuple[Shard, list[str]]] = {}
    try:
        with store._write() as (conn, version):
            homes = _place(conn, batch)
            by_shard: dict[str, list[str]] = defaultdict(list)
            for record, home in zip(batch, homes, strict=True):
                by_shard[home.name].append(record.id)
            shard_of = {home.name: home for home in homes}
            for name, ids in by_shard.items():
                shard = shard_of[name]
                with shard_errors(shard):
                    _write_residency(engine_of(shard), ids, version)
                written[name] = (shard, ids)
            now = datetime.now(UTC)
            conn.execute(
                tenants.insert(),
                [
                    {
                        "id": record.id,
                        "shard": home.name,
                        "tier": home.tier.value,
                        "pinned": record.pinned,
                        "state": "active",
                        "created_at": now,
                    }
                    for record, home in zip(batch, homes, strict=True)
                ],
            )
            conn.execute(
                map_changes.insert(), [{"version": version, "tenant_id": r.id} for r in batch]
            )
    except BaseException:
        for shard, ids in written.values():
            # The catalog did not commit: take back the residency rows we wrote.
            with suppress(TenantryError, sa.exc.SQLAlchemyError):
                _drop_residency(engine_of(shard), ids)
        raise
    return version, [home.name for home in homes]


def _place(conn: Connection, batch: list[TenantRecord]) -> list[Shard]:
    """Each record's home, checked as ``add_tenant`` checks one."""
    ids = [r.id for r in batch]
    line_of = {r.id: r.line or 0 for r in batch}
    existing = [
        row
        for start in range(0, len(ids), _IN_CHUNK)  # a server takes so many parameters
        for row in conn.execute(
            sa.select(tenants.c.id, tenants.c.shard).where(
                tenants.c.id.in_(ids[start : start + _IN_CHUNK])
            )
        )
    ]
    if existing:
        tenant_id, shard = min(existing, key=lambda row: line_of[row[0]])
        error = TenantExists(tenant_id, shard)
        raise _BadLine(line_of[tenant_id], str(error), error)
    known = {row.name: shard_from_row(row) for row in conn.execute(sa.select(shards))}
    ring = PlacementRing.for_shards(known.values())
    homes: list[Shard] = []
    dedicated: dict[str, TenantRecord] = {}
    for record in batch:
        line = record.line or 0
        try:
            name = record.shard if record.shard is not None else ring.place(record.id)
            if name is None:
                raise NoSharedShard(
                    "no active shared shard to place the tenant on: add one with "
                    "`tenantry shard add NAME URL`",
                    tenant_id=record.id,
                )
            home = known.get(name)
            if home is None:
                raise UnknownShard(name)
            require_active(home, record.id)
            tier = Tier(record.tier)
            if tier is not home.tier:
                raise TierMismatch(
                    f"a {tier.value} tenant cannot live on {home.tier.value} shard "
                    f"{home.name!r}: choose a {tier.value} shard",
                    tenant_id=record.id,
                    shard=home.name,
                )
            if tier is Tier.DEDICATED:
                other = dedicated.get(home.name)
                if other is not None:
                    raise _occupied(home.name, other.id, record.id)
                dedicated[home.name] = record
        except TenantryError as exc:
            raise _BadLine(line, str(exc), exc) from None
        homes.append(home)
    if dedicated:
        held = conn.execute(
            sa.select(tenants.c.shard, tenants.c.id).where(tenants.c.shard.in_(list(dedicated)))
        ).all()
        if held:
            shard, other = min(held, key=lambda row: line_of[dedicated[row[0]].id])
            record = dedicated[shard]
            occupied = _occupied(shard, other, record.id)
            raise _BadLine(record.line or 0, str(occupied), occupied)
    return homes


def _occupied(shard: str, other: str, tenant_id: str) -> ShardOccupied:
    return ShardOccupied(
        f"dedicated shard {shard!r} already holds tenant {other!r}: "
        "give each dedicated tenant its own shard",
        tenant_id=tenant_id,
        shard=shard,
    )


def _write_residency(engine: Engine, ids: list[str], version: int) -> None:
    """The tenants' residency rows on one shard, active at *version*, committed (rows
    left by an earlier registration of the same id are overwritten)."""
    now = datetime.now(UTC)
    values = [
        {"tenant_id": t, "state": Residency.ACTIVE.value, "map_version": version, "updated_at": now}
        for t in ids
    ]
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(residency)
    upsert = insert.on_conflict_do_update(
        index_elements=[residency.c.tenant_id],
        set_={
            "state": insert.excluded.state,
            "map_version": insert.excluded.map_version,
            "updated_at": insert.excluded.updated_at,
        },
    )
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            conn.execute(upsert, values)


def _drop_residency(engine: Engine, ids: list[str]) -> None:
    with engine.connect() as conn:
        conn = conn.execution_options(**WRITE)
        with conn.begin():
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                conn.execute(residency.delete().where(residency.c.tenant_id.in_(chunk)))
