"""What movers and fleet migrations report: metrics and spans of moves and migrations.

A mover with metrics or traces on gets a :class:`MoveTelemetry` as its observer: it
passes everything on to the observer it was given (the CLI's progress display, say)
and counts what it sees. :func:`moving` wraps one run of a move (moves in flight, the
move's span, its freeze durations once it ended); :meth:`MoveTelemetry.step` counts each
state entered and makes a span per state; :meth:`MoveTelemetry.table` counts the rows
and bytes an offline copy has copied, and the bytes of an online move's initial copy
as its table-sync workers report them. Online moves' rows come by logical replication:
they are counted from the verified cut when the move ends.
:class:`MigrationTelemetry` counts each migrated database's result and makes its span.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, Protocol

from tenantry.observability.hooks import resolve_metrics
from tenantry.settings import TenantrySettings

if TYPE_CHECKING:
    from tenantry.observability.metrics import Metrics

__all__ = [
    "MigrationTelemetry",
    "MoveTelemetry",
    "lagging",
    "moving",
    "watch_migrations",
    "watch_moves",
]


class _Observer(Protocol):
    def step(self, move_id: int, state: str) -> None: ...
    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None: ...
    def note(self, message: str) -> None: ...


class _MoveLike(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def kind(self) -> Any: ...
    @property
    def mode(self) -> Any: ...
    @property
    def stats(self) -> Any: ...
    @property
    def succeeded(self) -> bool: ...


def _tracer(settings: TenantrySettings, traces: bool | None) -> Any:
    if not (settings.traces if traces is None else traces):
        return None
    from tenantry.observability.tracing import get_tracer

    return get_tracer()


def watch_moves(
    observer: Any, settings: TenantrySettings, *, metrics: Any = None, traces: bool | None = None
) -> Any:
    """*observer* wrapped in a :class:`MoveTelemetry`, or itself when metrics and
    traces are off."""
    chosen = resolve_metrics(settings, metrics)
    tracer = _tracer(settings, traces)
    if chosen is None and tracer is None:
        return observer
    return MoveTelemetry(observer, chosen, tracer)


class _Running(threading.local):
    """The move this thread runs, its state, its spans and its copy's progress."""

    move: _MoveLike | None = None
    kind: str = "move"
    state: str | None = None
    span: Any = None
    state_span: Any = None
    copied: dict[str, tuple[int, int]]
    copy_rows = 0
    copy_started = 0.0


class MoveTelemetry:
    """A move observer that counts and traces, and passes everything on to *inner*."""

    def __init__(self, inner: _Observer, metrics: Metrics | None, tracer: Any) -> None:
        self.inner = inner
        self.metrics = metrics
        self.tracer = tracer
        self._running = _Running()

    # -- MoveObserver ---------------------------------------------------------------------

    def step(self, move_id: int, state: str) -> None:
        """The move entered *state* (``done`` and ``aborted`` end it)."""
        self.inner.step(move_id, state)
        run = self._running
        if self.metrics is not None:
            self.metrics.move_steps.labels(run.kind, state).inc()
        self._end_state_span()
        run.state = state
        if state == "copied":
            run.copied, run.copy_rows, run.copy_started = {}, 0, time.monotonic()
        if self.tracer is not None and run.span is not None and state not in ("done", "aborted"):
            from opentelemetry import trace

            run.state_span = self.tracer.start_span(
                f"tenantry.move.{state}",
                context=trace.set_span_in_context(run.span),
                attributes={"tenantry.move_id": move_id, "tenantry.state": state},
            )

    def table(self, table: str, rows: int, size: int, total_rows: int | None) -> None:
        """Rows and bytes copied so far for *table*: an offline copy's, or an online
        move's initial copy as its table-sync workers report it (its rows are counted
        from the verified cut when it ends, which is exact)."""
        self.inner.table(table, rows, size, total_rows)
        run = self._running
        if self.metrics is None or run.state != "copied":
            return  # the cleanup's deletes report here too
        before_rows, before_bytes = run.copied.get(table, (0, 0))
        run.copied[table] = (rows, size)
        if run.move is None or str(run.move.mode.value) != "online":
            self.metrics.move_rows.inc(max(0, rows - before_rows))
        self.metrics.move_bytes.inc(max(0, size - before_bytes))
        run.copy_rows += max(0, rows - before_rows)
        elapsed = time.monotonic() - run.copy_started
        if elapsed > 0:
            self.metrics.move_rate.set(run.copy_rows / elapsed)

    def note(self, message: str) -> None:
        """Pass a note on."""
        self.inner.note(message)

    # -- the rest -------------------------------------------------------------------------

    def lag(self, lag_bytes: int) -> None:
        """The running online move's subscription trails its source by *lag_bytes*."""
        move = self._running.move
        if self.metrics is not None and move is not None:
            self.metrics.move_lag.labels(str(move.id)).set(lag_bytes)

    @contextmanager
    def running(self, move: _MoveLike, reload: Callable[[int], _MoveLike]) -> Iterator[None]:
        """One run of *move* (to its end, or a rollback); *reload* reads it again."""
        run = self._running
        run.move, run.kind, run.state = move, str(move.kind.value), None
        metrics = self.metrics
        if metrics is not None:
            metrics.moves_in_flight.inc()
        token = None
        if self.tracer is not None:
            from opentelemetry import context, trace

            run.span = self.tracer.start_span(
                "tenantry.move",
                attributes={
                    "tenantry.move_id": move.id,
                    "tenantry.tenant": move.tenant_id,
                    "tenantry.source": move.source,
                    "tenantry.target": move.target,
                    "tenantry.kind": str(move.kind.value),
                    "tenantry.mode": str(move.mode.value),
                },
            )
            token = context.attach(trace.set_span_in_context(run.span))
        failed: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._end_state_span()
            self._ended(move, reload, failed, token)

    def _ended(
        self, move: _MoveLike, reload: Callable[[int], _MoveLike], failed: Any, token: Any
    ) -> None:
        run = self._running
        metrics = self.metrics
        if metrics is not None:
            metrics.moves_in_flight.dec()
            with suppress(KeyError):  # never lagged
                metrics.move_lag.remove(str(move.id))
            try:
                final = reload(move.id)
            except Exception:  # the catalog is out of reach: nothing more to count
                final = None
            if final is not None and final.succeeded:
                for key in ("cut_freeze_seconds", "freeze_seconds"):
                    if final.stats.get(key) is not None:
                        metrics.freeze_seconds.observe(float(final.stats[key]))
                if str(final.mode.value) == "online":
                    verified = final.stats.get("verified") or {}
                    metrics.move_rows.inc(sum(int(t.get("rows", 0)) for t in verified.values()))
        if run.span is not None:
            from opentelemetry import context

            if failed is not None:
                from tenantry.observability.tracing import span_failed

                span_failed(run.span, failed)
            run.span.end()
            if token is not None:
                context.detach(token)
        run.move, run.span, run.state = None, None, None

    def _end_state_span(self) -> None:
        run = self._running
        if run.state_span is not None:
            run.state_span.end()
            run.state_span = None


def moving(
    observer: Any, move: _MoveLike, reload: Callable[[int], _MoveLike]
) -> AbstractContextManager[None]:
    """:meth:`MoveTelemetry.running` when *observer* is one; else nothing."""
    if isinstance(observer, MoveTelemetry):
        return observer.running(move, reload)
    return nullcontext()


def lagging(observer: Any, lag_bytes: int) -> None:
    """Report an online move's replication lag, when *observer* counts."""
    if isinstance(observer, MoveTelemetry):
        observer.lag(lag_bytes)


class _MigrationLike(Protocol):
    @property
    def shard(self) -> str: ...
    @property
    def tier(self) -> Any: ...
    @property
    def before(self) -> str | None: ...
    @property
    def after(self) -> str | None: ...
    @property
    def result(self) -> str: ...
    @property
    def seconds(self) -> float: ...


def watch_migrations(
    settings: TenantrySettings, *, metrics: Any = None, traces: bool | None = None
) -> MigrationTelemetry | None:
    """The telemetry of one fleet migration run, or None when metrics and traces are off."""
    chosen = resolve_metrics(settings, metrics)
    tracer = _tracer(settings, traces)
    if chosen is None and tracer is None:
        return None
    return MigrationTelemetry(chosen, tracer)


class MigrationTelemetry:
    """Counts each migrated database's result and makes its span."""

    def __init__(self, metrics: Metrics | None, tracer: Any) -> None:
        self.metrics = metrics
        self.tracer = tracer

    def migrated(self, outcome: _MigrationLike, direction: str) -> None:
        """One database's migration ended with *outcome* (``ShardMigration``)."""
        if self.metrics is not None:
            self.metrics.migrations.labels(outcome.result).inc()
            if outcome.result not in ("locked",):
                self.metrics.migration_seconds.observe(outcome.seconds)
        if self.tracer is not None:
            # Migrations may run in worker processes: the span is made here, from the
            # result's own timing.
            end = time.time_ns()
            span = self.tracer.start_span(
                "tenantry.migrate",
                start_time=end - int(outcome.seconds * 1e9),
                attributes={
                    "tenantry.shard": outcome.shard,
                    "tenantry.tier": str(outcome.tier.value),
                    "tenantry.direction": direction,
                    "tenantry.result": outcome.result,
                    "tenantry.before": outcome.before or "",
                    "tenantry.after": outcome.after or "",
                },
            )
            if outcome.result == "failed":
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, "failed"))
            span.end(end_time=end)
