"""The README's screenshots of ``tenantry status`` and ``tenantry top``, on a real fleet.

    make screenshots            # installs the `screenshots` extra (cairosvg), then runs:
    python benchmarks/screenshots.py [--pg-url URL ...] [--out docs]

A small fleet on two PostgreSQL servers (throwaway ones unless ``--pg-url`` names
running servers): three shared shards and two dedicated ones, the demo app's schema,
a dozen tenants with rows; an online move held in flight at a checkpoint; statements
left running (``pg_sleep``) for some tenants, those on shared shards carrying the
sqlcommenter comment routers add. Each view is rendered by the CLI's own renderer on a
recording rich console, exported as SVG and converted to PNG with cairosvg:
``status.png`` and ``top.png`` in ``--out``. Everything it made is dropped at the end.
"""

from __future__ import annotations

import argparse
import io
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import sqlalchemy as sa
from _common import add_server_options, pg_servers
from rich.console import Console
from sqlalchemy.pool import NullPool

from tenantry import Catalog, Tier, load_settings, moves
from tenantry.cli.status import render_status
from tenantry.cli.top import render_report
from tenantry.demo import MIGRATIONS
from tenantry.migrations import upgrade
from tenantry.survey import Top, fleet_status
from tenantry.testing import DatabaseFactory

DOCS = Path(__file__).resolve().parent.parent / "docs"
WIDTH = 150
LOAD = "tenantry-screenshot-load"
#: The font the PNGs are drawn with (fontconfig finds it; DejaVu has the box lines).
FONT = "DejaVu Sans Mono"

SHARDS = (
    ("shared-1", 0, "shared"),
    ("shared-2", 0, "shared"),
    ("shared-3", 1, "shared"),
    ("acme-db", 1, "dedicated"),
    ("nordgrid-db", 0, "dedicated"),
)
SHARED_TENANTS = (
    "voltpark",
    "chargecity",
    "amp-alley",
    "metro-charge",
    "greenbay",
    "fastlane",
    "ionic",
    "kilowatt-co",
    "plugshare-nl",
    "sparkhaus",
)
#: Statements left running per tenant while top samples.
RUNNING = {"voltpark": 4, "chargecity": 2, "amp-alley": 1, "acme": 3, "nordgrid": 1}


class HoldAt:
    """Holds a move at checkpoint *name* until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.release = threading.Event()

    def checkpoint(self, name: str) -> None:
        if name == self.name:
            self.reached.set()
            self.release.wait(120)


def build(factory: DatabaseFactory) -> tuple[Catalog, dict[str, str]]:
    catalog_url = factory(0)
    catalog = Catalog(
        settings=load_settings(catalog_url=catalog_url, alembic_config=str(MIGRATIONS))
    )
    catalog.init()
    urls = {}
    for name, server, tier in SHARDS:
        catalog.add_shard(name, factory(server), tier=tier, allow_unsafe_routing_role=True)
        urls[name] = catalog.get_shard(name).url
    run = upgrade(catalog, jobs=2)
    assert run.ok, [r.error for r in run.results]
    for tenant in SHARED_TENANTS:
        catalog.add_tenant(tenant)
    catalog.add_tenant("acme", tier=Tier.DEDICATED, shard="acme-db")
    catalog.add_tenant("nordgrid", tier=Tier.DEDICATED, shard="nordgrid-db")
    for i, tenant in enumerate((*SHARED_TENANTS, "acme", "nordgrid")):
        shard = catalog.get_tenant(tenant).shard
        with sa.create_engine(urls[shard], poolclass=NullPool).begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO users (tenant_id, id, email, name)"
                    " SELECT CAST(:t AS text), g, 'u' || g || '@' || CAST(:t AS text), 'User ' || g"
                    " FROM generate_series(1, :n) g"
                ),
                {"t": tenant, "n": 2000 * (i % 4 + 1)},
            )
    return catalog, urls


@contextmanager
def running_statements(catalog: Catalog, urls: dict[str, str]) -> Iterator[None]:
    """``pg_sleep`` statements per :data:`RUNNING`, cancelled when the block ends."""
    threads = []
    for tenant, count in RUNNING.items():
        shard = catalog.get_tenant(tenant).shard
        statement = f"SELECT pg_sleep(60) /*route='%%2Fsessions',tenant='{tenant}'*/"
        for _ in range(count):
            engine = sa.create_engine(
                urls[shard], poolclass=NullPool, connect_args={"application_name": LOAD}
            )

            def work(engine: sa.Engine = engine, statement: str = statement) -> None:
                try:
                    with engine.connect() as conn:
                        conn.exec_driver_sql(statement)
                except sa.exc.DBAPIError:
                    pass  # cancelled

            thread = threading.Thread(target=work)
            thread.start()
            threads.append(thread)
    stop = threading.Event()

    def transactions(url: str) -> None:
        # A dedicated tenant's steady transactions (pg_stat_database counts them).
        with sa.create_engine(url, poolclass=NullPool).connect() as conn:
            while not stop.is_set():
                conn.execute(sa.text("SELECT count(*) FROM users"))
                conn.commit()

    for shard in ("acme-db", "nordgrid-db"):
        thread = threading.Thread(target=transactions, args=(urls[shard],))
        thread.start()
        threads.append(thread)
    try:
        yield
    finally:
        stop.set()
        for url in set(urls.values()):
            with sa.create_engine(url, poolclass=NullPool).connect() as conn:
                conn.execute(
                    sa.text(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = :a"
                    ),
                    {"a": LOAD},
                )
        for thread in threads:
            thread.join(30)


def _console() -> Console:
    """A wide colour console that records what is printed to it, and shows nothing."""
    return Console(
        record=True, width=WIDTH, force_terminal=True, color_system="truecolor", file=io.StringIO()
    )


def save(console: Console, title: str, path: Path) -> None:
    import cairosvg

    # cairosvg cannot load rich's web font: name a monospace font installed here.
    svg = console.export_svg(title=title).replace("Fira Code, monospace", FONT)
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(path), output_width=WIDTH * 9)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_options(parser)
    parser.set_defaults(out=DOCS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        pg_servers(args.pg_url, count=2) as servers,
        DatabaseFactory(servers) as factory,
        ExitStack() as stack,
    ):
        catalog, urls = build(factory)
        stack.callback(catalog.close)
        hold = HoldAt("online-synced")
        home = catalog.get_tenant("voltpark").shard
        mover = threading.Thread(
            target=moves.move,
            args=(catalog, "voltpark", "shared-3" if home != "shared-3" else "shared-1"),
            kwargs={"mode": "online", "hooks": hold},
        )
        mover.start()
        stack.callback(mover.join)
        stack.callback(hold.release.set)
        assert hold.reached.wait(120), "the move never reached its checkpoint"
        with running_statements(catalog, urls):
            status = _console()
            render_status(status, fleet_status(catalog))
            save(status, "tenantry status", args.out / "status.png")
            with Top(catalog) as top:
                top.start()
                report = top.window(2.0)
            view = _console()
            view.print(render_report(report))
            save(view, "tenantry top", args.out / "top.png")


if __name__ == "__main__":
    main()
