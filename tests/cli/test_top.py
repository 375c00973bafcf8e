"""``tenantry top``: real sessions on real servers — statements running on a dedicated
database and, carrying sqlcommenter comments, on a shared one — and routers' counters
served over HTTP."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from rich.console import Console
from sqlalchemy.pool import NullPool
from surveyfleet import SurveyFleet, build_survey_fleet, closed_port

from tenantry.cli import cli
from tenantry.cli.top import live_view
from tenantry.errors import ConfigurationError
from tenantry.survey.scrape import scrape_routers
from tenantry.survey.top import Top

LOAD = "tenantry-top-test-load"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def pg_fleet(make_pg_database) -> Iterator[SurveyFleet]:
    built = build_survey_fleet(make_pg_database)
    try:
        yield built
    finally:
        built.catalog.close()


class Sessions:
    """Statements left running (``pg_sleep``) on connections of their own, until
    :meth:`stop` cancels them."""

    def __init__(self, fleet: SurveyFleet) -> None:
        self.fleet = fleet
        self.threads: list[threading.Thread] = []
        self.engines: list[sa.Engine] = []
        self.errors: list[BaseException] = []

    def run(self, shard: str, statement: str) -> None:
        engine = sa.create_engine(
            self.fleet.urls[shard],
            poolclass=NullPool,
            connect_args={"application_name": LOAD},
        )
        self.engines.append(engine)

        def work() -> None:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql(statement)
            except sa.exc.DBAPIError as exc:
                if "canceling statement" not in str(exc):
                    self.errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        self.threads.append(thread)

    def wait_running(self, count: int) -> None:
        """Until *count* of them are active on their servers."""
        engines = {self.fleet.urls[s] for s in ("s1", "d1")}
        deadline = time.monotonic() + 30
        while True:
            running = 0
            for url in engines:
                with sa.create_engine(url, poolclass=NullPool).connect() as conn:
                    running += conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"
                            " AND state = 'active' AND datname = current_database()"
                        ),
                        {"a": LOAD},
                    ).scalar_one()
            if running >= count:
                return
            assert time.monotonic() < deadline, f"{running} of {count} statements running"
            time.sleep(0.05)

    def stop(self) -> None:
        for url in {self.fleet.urls[s] for s in ("s1", "d1")}:
            with sa.create_engine(url, poolclass=NullPool).connect() as conn:
                conn.execute(
                    sa.text(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = :a"
                    ),
                    {"a": LOAD},
                )
        for thread in self.threads:
            thread.join(30)
        assert self.errors == []


def test_top_finds_tenants_on_dedicated_and_shared_shards(pg_fleet):
    fleet = pg_fleet
    sessions = Sessions(fleet)
    try:
        for _ in range(2):
            sessions.run("d1", "SELECT pg_sleep(60)")
            sessions.run("s1", "SELECT pg_sleep(60) /*tenant='acme'*/")
        # %% is psycopg's escape of %: the server sees route='%2Fcharges%2F7'
        sessions.run("s1", "SELECT pg_sleep(60) /*route='%%2Fcharges%%2F7',tenant='neighbor'*/;")
        sessions.run("s1", "SELECT pg_sleep(60) /* not a tenant comment */")
        sessions.run("s1", "SELECT pg_sleep(60) /*tenant='Not An Id'*/")
        sessions.wait_running(7)
        result = CliRunner().invoke(
            cli,
            ["--catalog", fleet.catalog_url, "top", "--once", "--json", "--interval", "0.5"],
        )
        text = CliRunner(env={"COLUMNS": "300"}).invoke(
            cli, ["--catalog", fleet.catalog_url, "top", "--once", "--interval", "0.3"]
        )
    finally:
        sessions.stop()
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert set(doc) == {"seconds", "samples", "shards", "errors"}
    assert doc["errors"] == [] and doc["samples"] >= 2 and doc["seconds"] >= 0.5
    shards = {s["shard"]: s for s in doc["shards"]}
    assert set(shards) == {"s1", "s2", "d1"}
    # The busiest shard first: s1 runs five statements, d1 two, s2 none.
    assert [s["shard"] for s in doc["shards"]] == ["s1", "d1", "s2"]
    s1, d1, s2 = shards["s1"], shards["d1"], shards["s2"]
    assert (s1["tier"], s1["reachable"], s1["error"]) == ("shared", True, None)
    assert (s1["active"], s1["unattributed"]) == (5.0, 2.0)
    assert [(t["tenant"], t["active"], t["sources"]) for t in s1["tenants"]] == [
        ("acme", 2.0, ["activity"]),
        ("neighbor", 1.0, ["activity"]),
    ]
    assert all(t["transactions_per_second"] is None for t in s1["tenants"])
    (regulated,) = d1["tenants"]
    assert regulated["tenant"] == "regulated" and regulated["active"] == 2.0
    assert regulated["sources"] == ["activity", "pg_stat_database"]
    assert isinstance(regulated["transactions_per_second"], float)
    assert (d1["active"], d1["unattributed"]) == (2.0, 0.0)
    assert (s2["active"], s2["tenants"]) == (0.0, [])
    # The text view: the tenants, never the statements' text.
    assert text.exit_code == 0, text.stderr
    assert "acme" in text.stdout and "regulated" in text.stdout and "neighbor" in text.stdout
    assert "(no tenant comment)" in text.stdout
    assert "pg_sleep" not in text.stdout and "pg_sleep" not in result.stdout


def test_the_live_view_redraws_each_window(pg_fleet):
    fleet = pg_fleet
    sessions = Sessions(fleet)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    try:
        sessions.run("s1", "SELECT pg_sleep(60) /*tenant='acme'*/")
        sessions.wait_running(1)
        with Top(fleet.catalog) as top:
            top.start()
            live_view(console, top, 0.3, windows=2)
    finally:
        sessions.stop()
    text = ANSI.sub("", out.getvalue())
    assert text.count("busiest tenants per shard") >= 2  # drawn again for the second window
    assert "acme" in text and "1.00" in text


def test_dedicated_tenants_transactions_per_second(pg_fleet):
    """pg_stat_database's transaction counts become the dedicated tenant's rate."""
    fleet = pg_fleet
    with Top(fleet.catalog) as top:
        top.start()
        engine = fleet.engine("d1")
        for _ in range(20):
            with engine.connect() as conn:  # a connection's exit flushes its statistics
                conn.execute(sa.text("SELECT 1"))
                conn.commit()
        counted = 0.0
        deadline = time.monotonic() + 30
        while counted < 20:
            assert time.monotonic() < deadline, counted
            report = top.window(0.2)
            d1 = next(s for s in report.shards if s.shard == "d1")
            counted += (d1.transactions_per_second or 0.0) * report.seconds
        # Nothing runs on d1 now: top sampling it ten times a second adds nothing there.
        report = top.window(1.0)
        d1 = next(s for s in report.shards if s.shard == "d1")
        assert report.samples >= 5 and (d1.transactions_per_second, d1.tenants) == (0.0, ())


class Routers:
    """Two routers' /metrics: the first one's counters grow by 20 transactions and 1.0
    second at each scrape after its first; the second one's never change."""

    def __init__(self) -> None:
        self.scrapes = [0, 0]
        routers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                which = 0 if self.path == "/a/metrics" else 1
                n = routers.scrapes[which] if which == 0 else 0
                routers.scrapes[which] += 1
                body = (
                    "# HELP tenantry_tenant_transactions Routed transactions per tenant.\n"
                    "# TYPE tenantry_tenant_transactions counter\n"
                    'tenantry_tenant_transactions_total{shard="s1",tenant="acme"} '
                    f"{10 + 20 * n}\n"
                    'tenantry_tenant_transactions_total{shard="s2",tenant="other"} 5\n'
                    "# HELP tenantry_tenant_transaction_seconds Seconds of them.\n"
                    "# TYPE tenantry_tenant_transaction_seconds counter\n"
                    "tenantry_tenant_transaction_seconds_total"
                    f'{{shard="s1",tenant="acme"}} {1.0 + 1.0 * n}\n'
                    'tenantry_tenant_transaction_seconds_total{shard="s2",tenant="other"} 0.5\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        port = self.server.server_address[1]
        self.urls = [f"http://127.0.0.1:{port}/a/metrics", f"http://127.0.0.1:{port}/b/metrics"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_top_reads_the_routers_counters(pg_fleet):
    fleet = pg_fleet
    routers = Routers()
    down = f"http://user:hunter2@127.0.0.1:{closed_port()}/metrics"
    try:
        with Top(fleet.catalog, metrics=[*routers.urls, down], timeout=2) as top:
            top.start()
            report = top.window(0.2)
    finally:
        routers.close()
    s1 = next(s for s in report.shards if s.shard == "s1")
    (acme,) = s1.tenants
    assert acme.tenant == "acme" and acme.sources == ("routers",)
    # 20 transactions taking 1.0 s in all between the two scrapes of router a.
    assert acme.latency_ms == pytest.approx(50.0)
    assert acme.transactions_per_second == pytest.approx(20 / report.seconds)
    assert acme.busy == pytest.approx(1.0 / report.seconds)
    # other's counters did not move: no rate, so not listed.
    s2 = next(s for s in report.shards if s.shard == "s2")
    assert s2.tenants == ()
    (error,) = report.errors
    assert error.startswith("router metrics http://user:***@127.0.0.1:")
    assert "hunter2" not in error


def test_metrics_without_prometheus_client_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError) as caught:
        scrape_routers(["http://127.0.0.1:1/metrics"])
    assert str(caught.value) == (
        "--metrics needs prometheus_client: pip install 'tenantry[observability]'"
    )


def test_an_unreachable_server_is_reported(run, fleet):
    """SQLite shards are not sampled; a PostgreSQL shard that cannot be reached is
    shown as such, and top still answers."""
    run("shard", "add", "gone", f"postgresql://ops:pw@127.0.0.1:{closed_port()}/x", "--no-prepare")
    doc = run.json("top", "--once", "--interval", "0.2")
    (gone,) = doc["shards"]
    assert (gone["shard"], gone["reachable"]) == ("gone", False)
    assert "refused" in gone["error"].lower()
    (error,) = doc["errors"]
    assert error.startswith("server 127.0.0.1:") and "pw" not in error


def test_a_bad_metrics_url_is_refused(run, fleet):
    err = run.fail("top", "--once", "--metrics", "router-1:9100", status=2)
    assert "'router-1:9100' is not an http(s) URL of a router's Prometheus endpoint" in err
    err = run.fail("top", "--once", "--metrics", "ftp://u:secret@h/metrics", status=2)
    assert "secret" not in err and "ftp://u:***@h/metrics" in err
