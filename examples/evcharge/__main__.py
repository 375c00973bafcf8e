"""Serve the evcharge API with uvicorn: ``python -m examples.evcharge``.

With ``TENANTRY_CATALOG_URL`` set (or ``--catalog URL``), it serves that fleet, which
must be migrated with the example's Alembic scripts (``examples/evcharge/migrations``).
Without one it serves the demo fleet in ``--demo-dir`` (default ``.evcharge-demo/``),
building it first if it is missing (SQLite files: the demo's groups and data, migrated
with the example's revisions too).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from examples.evcharge import ALEMBIC_CONFIG
from tenantry import Catalog, Router, load_settings
from tenantry.demo import DEDICATED_TENANT, OVERPROVISIONED_TENANT, SHARED_TENANTS
from tenantry.demo import build_fleet as build_demo_fleet
from tenantry.demo import seed as seed_demo
from tenantry.migrations import upgrade

log = logging.getLogger("evcharge")


def demo_fleet(directory: Path, *, reset: bool = False) -> str:
    """The catalog URL of the demo fleet in *directory*, built (and seeded) if missing."""
    directory = directory.resolve()
    catalog_db = directory / "catalog.db"
    catalog_url = f"sqlite:///{catalog_db}"
    if catalog_db.exists() and not reset:
        return catalog_url
    log.info("building the demo fleet in %s", directory)
    fleet = build_demo_fleet(directory)
    (directory / ".gitignore").write_text("*\n")  # generated files: never committed
    settings = load_settings(catalog_url=fleet.catalog_url, alembic_config=str(ALEMBIC_CONFIG))
    with Catalog(settings=settings) as catalog:
        run = upgrade(catalog, jobs=1)  # the example's own revision: charger_commands
        if not run.ok:
            errors = "; ".join(f"{r.shard}: {r.error}" for r in run.results if r.error)
            raise SystemExit(f"error: migrating the demo fleet failed: {errors}")
    with Router(settings=settings, listen=False, background=False) as router:
        seed_demo(router, [*SHARED_TENANTS, DEDICATED_TENANT, OVERPROVISIONED_TENANT])
    return catalog_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.evcharge", description=__doc__)
    parser.add_argument(
        "--catalog",
        default=os.environ.get("TENANTRY_CATALOG_URL"),
        help="the fleet's catalog URL (default: TENANTRY_CATALOG_URL, else the demo fleet)",
    )
    parser.add_argument("--demo-dir", type=Path, default=Path(".evcharge-demo"))
    parser.add_argument("--reset", action="store_true", help="build the demo fleet afresh")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")

    import uvicorn  # the 'examples' extra

    from examples.evcharge.app import create_app

    catalog_url = args.catalog or demo_fleet(args.demo_dir, reset=args.reset)
    settings = load_settings(catalog_url=catalog_url, alembic_config=str(ALEMBIC_CONFIG))
    with Router(settings=settings) as router:
        groups = ", ".join(sorted(router.snapshot.tenants)) or "(none yet)"
        log.info("serving groups: %s", groups)
        uvicorn.run(create_app(router), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
