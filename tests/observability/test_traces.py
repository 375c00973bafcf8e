"""OpenTelemetry spans, read back from the SDK's in-memory exporter."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from obshelpers import ObsFleet
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tenantry.demo.models import User
from tenantry.errors import CrossTenantWrite
from tenantry.migrations import upgrade
from tenantry.moves import move


def named(spans: InMemorySpanExporter, prefix: str) -> list[Any]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def test_a_span_per_routed_transaction(fleet: ObsFleet, spans: InMemorySpanExporter) -> None:
    fleet.seed("acme", "s1")
    router = fleet.router(traces=True)
    with router.session("acme") as session:
        session.scalars(sa.select(User)).all()
    with router.connection("acme") as conn:
        conn.execute(sa.text("SELECT 1"))
    with pytest.raises(CrossTenantWrite), router.session("acme") as session:
        session.add(User(tenant_id="globex", id=1, email="x", name="x"))
        session.commit()
    found = named(spans, "tenantry.transaction")
    assert len(found) == 3
    for span in found:
        assert span.attributes["tenantry.tenant"] == "acme"
        assert span.attributes["tenantry.shard"] == "s1"
        assert span.attributes["tenantry.tier"] == "shared"
        assert span.attributes["tenantry.map_version"] == fleet.catalog.map_version()
    assert [s.attributes["tenantry.outcome"] for s in found] == [
        "ok",
        "ok",
        "cross_tenant_refused",
    ]
    assert found[2].status.status_code is StatusCode.ERROR
    assert found[2].events[0].name == "exception"


def test_the_transaction_span_is_current_in_the_block(
    fleet: ObsFleet, spans: InMemorySpanExporter
) -> None:
    from opentelemetry import trace

    fleet.add_tenant("acme", "s1")
    router = fleet.router(traces=True)
    tracer = trace.get_tracer("test")
    with router.session("acme"):
        with tracer.start_as_current_span("app.work"):
            pass
    [work] = named(spans, "app.work")
    [transaction] = named(spans, "tenantry.transaction")
    assert work.parent is not None
    assert work.parent.span_id == transaction.context.span_id


def test_no_spans_when_off(fleet: ObsFleet, spans: InMemorySpanExporter) -> None:
    fleet.add_tenant("acme", "s1")
    router = fleet.router()
    with router.session("acme"):
        pass
    assert spans.get_finished_spans() == ()


def test_spans_per_move_state(fleet_of: Any, spans: InMemorySpanExporter) -> None:
    fleet = fleet_of(traces=True)
    fleet.seed("acme", "s1")
    spans.clear()
    done = move(fleet.catalog, "acme", "s2", mode="offline")
    [whole] = [s for s in named(spans, "tenantry.move") if s.name == "tenantry.move"]
    assert whole.attributes["tenantry.move_id"] == done.id
    assert whole.attributes["tenantry.tenant"] == "acme"
    assert (whole.attributes["tenantry.source"], whole.attributes["tenantry.target"]) == (
        "s1",
        "s2",
    )
    states = named(spans, "tenantry.move.")
    assert [s.name for s in states] == [
        "tenantry.move.frozen",
        "tenantry.move.copied",
        "tenantry.move.verified",
        "tenantry.move.switched",
        "tenantry.move.cleaned",
    ]
    for state in states:
        assert state.parent is not None and state.parent.span_id == whole.context.span_id
        assert whole.start_time <= state.start_time <= state.end_time <= whole.end_time


def test_spans_per_migrated_database(fleet_of: Any, spans: InMemorySpanExporter) -> None:
    fleet = fleet_of(traces=True)  # migrated once while it was built
    migrated = named(spans, "tenantry.migrate")
    assert sorted(s.attributes["tenantry.shard"] for s in migrated) == ["s1", "s2"]
    for span in migrated:
        assert span.attributes["tenantry.result"] == "upgraded"
        assert span.attributes["tenantry.direction"] == "upgrade"
        assert span.attributes["tenantry.before"] == ""
        assert span.attributes["tenantry.after"]
        assert span.end_time > span.start_time
    spans.clear()
    assert upgrade(fleet.catalog, jobs=1).ok
    assert [s.attributes["tenantry.result"] for s in named(spans, "tenantry.migrate")] == [
        "skipped",
        "skipped",
    ]
