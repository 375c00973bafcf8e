"""Helpers of the evcharge example's tests: a PostgreSQL fleet migrated with the
example's scripts, the app in-process, and clients that write from threads and retry
what the API calls retryable (503 with Retry-After)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx2
import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from starlette.testclient import TestClient

from examples.evcharge import ALEMBIC_CONFIG
from examples.evcharge.app import BASE_DOMAIN, create_app
from tenantry import Catalog, Router, Tier, load_settings
from tenantry.migrations import secure_shard, upgrade
from tenantry.settings import TenantrySettings

#: What the API documents as "send it again": Service Unavailable, with Retry-After.
RETRYABLE = 503
#: How long a client keeps retrying one request before calling it a failure.
PATIENCE = 30.0


@dataclass
class EvFleet:
    """A catalog and its shards, migrated to the example's head; operations URLs kept."""

    settings: TenantrySettings
    catalog: Catalog
    admin_urls: dict[str, str]

    @contextmanager
    def admin(self, shard: str) -> Iterator[sa.Connection]:
        """A connection to *shard* as its operations role (sees every tenant's rows)."""
        engine = sa.create_engine(self.admin_urls[shard], poolclass=NullPool)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def rows(self, shard: str, table: str, tenant: str) -> list[tuple[object, ...]]:
        """Every row of *tenant* in *table* on *shard*, in id order, read directly."""
        with self.admin(shard) as conn:
            return [
                tuple(row)
                for row in conn.execute(
                    sa.text(f"SELECT * FROM {table} WHERE tenant_id = :t ORDER BY id"),
                    {"t": tenant},
                )
            ]

    def close(self) -> None:
        self.catalog.close()


def build_fleet(
    catalog_url: str, shards: Iterable[tuple[str, str, Tier]], tenants: dict[str, str]
) -> EvFleet:
    """*shards*: (name, superuser URL, tier), each given a routing role of its own
    (row-level security binds it on shared shards); *tenants*: tenant -> shard."""
    settings = load_settings(
        catalog_url=catalog_url, alembic_config=str(ALEMBIC_CONFIG), freeze_timeout=10.0
    )
    catalog = Catalog(settings=settings)
    catalog.init()
    admin_urls = {}
    for name, url, tier in shards:
        catalog.add_shard(name, url, tier=tier)
        admin_urls[name] = url
    run = upgrade(catalog, jobs=1)
    assert run.ok, [r.error for r in run.results]
    for name in admin_urls:
        secure_shard(catalog, name)
        assert catalog.get_shard(name).url != catalog.get_shard(name).operations_url
    for tenant, shard in tenants.items():
        tier = catalog.get_shard(shard).tier
        catalog.add_tenant(tenant, tier=tier, shard=shard)
    return EvFleet(settings, catalog, admin_urls)


@contextmanager
def serve(fleet: EvFleet) -> Iterator[TestClient]:
    """The app on a Router of its own (as a separate application process would have),
    called in-process through Starlette's TestClient."""
    with Router(settings=fleet.settings) as router, TestClient(create_app(router)) as client:
        yield client


def group(tenant: str, *, subdomain: bool = False) -> dict[str, str]:
    """Request headers that name *tenant*: the X-Tenant header, or its own host."""
    return {"host": f"{tenant}.{BASE_DOMAIN}"} if subdomain else {"x-tenant": tenant}


@dataclass
class Writers:
    """Threads that each send charger commands for one group, one after another, each
    with an Idempotency-Key of its own, retrying 503s until acknowledged; after every
    acknowledgement they read the command back.

    ``acked`` maps each acknowledged key to the command id the API gave it; anything
    else (another status, an exception, a request never acknowledged) is a failure.
    """

    client: TestClient
    tenant: str
    charger_id: int
    threads: int = 2
    acked: dict[str, int] = field(default_factory=dict)
    retried: list[tuple[str, int, str]] = field(default_factory=list)  # (path, status, body)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._workers = [
            threading.Thread(target=self._run, args=(i,), name=f"{self.tenant}-writer-{i}")
            for i in range(self.threads)
        ]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Block until *count* commands are acknowledged (or a writer failed)."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: len(self.acked) >= count or bool(self.failures), timeout
            )
        assert done, f"{self.tenant}: only {len(self.acked)} of {count} acknowledged"

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=PATIENCE + 10)
            assert not worker.is_alive(), f"{worker.name} did not stop"

    def _run(self, index: int) -> None:
        # Odd writers name the group by subdomain, even ones by header.
        headers = group(self.tenant, subdomain=index % 2 == 1)
        for seq in itertools.count():
            if self._stop.is_set() or self.failures:
                return
            key = f"{self.tenant}-w{index}-{seq}"
            path = f"/chargers/{self.charger_id}/commands"
            sent = self._call(
                "POST", path, {**headers, "idempotency-key": key}, {"command": "reboot"}
            )
            if sent is None:
                return
            # 201, or 200 when an attempt that got a 503 had made the command after all
            command = sent.json()
            if command["client_ref"] != key:
                self._fail(f"POST {key}: {sent.status_code} {sent.text}")
                return
            read = self._call("GET", f"/commands/{command['id']}", headers, None)
            if read is None:
                return
            if read.status_code != 200 or read.json()["client_ref"] != key:
                self._fail(f"GET command {command['id']} for {key}: {read.status_code} {read.text}")
                return
            with self._changed:
                self.acked[key] = command["id"]
                self._changed.notify_all()

    def _call(
        self, method: str, path: str, headers: dict[str, str], body: object
    ) -> httpx2.Response | None:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                response = self.client.request(method, path, headers=headers, json=body)
            except Exception as exc:  # the app raised: a 500, never retryable
                self._fail(f"{method} {path}: {exc!r}")
                return None
            if response.status_code in (200, 201):
                return response
            if response.status_code != RETRYABLE or "retry-after" not in response.headers:
                self._fail(f"{method} {path}: {response.status_code} {response.text}")
                return None
            self.retried.append((path, response.status_code, response.text))
            if time.monotonic() > deadline:
                self._fail(f"{method} {path}: still 503 after {PATIENCE:.0f}s")
                return None
            # Retry-After says seconds; the test has none to spare and retries soon.
            time.sleep(0.02)

    def _fail(self, message: str) -> None:
        with self._changed:
            self.failures.append(message)
            self._changed.notify_all()
