"""The current-tenant contextvar: nesting, await, tasks and threads never leak."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tenantry.errors import InvalidTenantId, NoTenantInContext, TenantryError
from tenantry.router.context import (
    TenantContext,
    current_tenant,
    current_tenant_or_none,
    tenant_context,
)


@pytest.fixture(autouse=True)
def _no_tenant_before_or_after() -> Iterator[None]:
    # Every test starts and must end with no tenant: a leak would show here.
    assert current_tenant_or_none() is None
    yield
    assert current_tenant_or_none() is None


def test_no_tenant_raises() -> None:
    with pytest.raises(NoTenantInContext, match="no tenant in context") as info:
        current_tenant()
    assert isinstance(info.value, TenantryError)
    assert current_tenant_or_none() is None


def test_block_sets_and_restores() -> None:
    with tenant_context("acme") as tenant_id:
        assert tenant_id == "acme"
        assert current_tenant() == "acme"
        assert current_tenant_or_none() == "acme"
    assert current_tenant_or_none() is None


def test_nesting_restores_the_outer_tenant() -> None:
    with tenant_context("acme"):
        with tenant_context("globex"):
            assert current_tenant() == "globex"
            with tenant_context("acme"):
                assert current_tenant() == "acme"
            assert current_tenant() == "globex"
        assert current_tenant() == "acme"


def test_exception_in_block_still_restores() -> None:
    with tenant_context("acme"):
        with pytest.raises(RuntimeError), tenant_context("globex"):
            raise RuntimeError("boom")
        assert current_tenant() == "acme"


def test_one_object_entered_twice_nests() -> None:
    ctx = tenant_context("acme")
    assert isinstance(ctx, TenantContext)
    assert repr(ctx) == "tenant_context('acme')"
    with ctx, tenant_context("globex"), ctx:
        assert current_tenant() == "acme"
    with ctx:
        assert current_tenant() == "acme"


@pytest.mark.parametrize(
    "bad", ["'; drop table tenants; --", "ACME", "", "-acme", "a" * 64, "acme corp", "é"]
)
def test_invalid_id_rejected_at_once(bad: str) -> None:
    with pytest.raises(InvalidTenantId):
        tenant_context(bad)
    assert current_tenant_or_none() is None


def test_non_string_id_rejected() -> None:
    with pytest.raises(InvalidTenantId):
        tenant_context(42)  # type: ignore[arg-type]


def test_async_with_and_await() -> None:
    async def main() -> list[str | None]:
        seen = []
        async with tenant_context("acme") as tenant_id:
            assert tenant_id == "acme"
            await asyncio.sleep(0)
            seen.append(current_tenant_or_none())
            with tenant_context("globex"):
                await asyncio.sleep(0.001)
                seen.append(current_tenant_or_none())
            seen.append(current_tenant_or_none())
        seen.append(current_tenant_or_none())
        return seen

    assert asyncio.run(main()) == ["acme", "globex", "acme", None]


def test_concurrent_tasks_each_see_their_own_tenant() -> None:
    tenants = [f"tenant-{i}" for i in range(200)]

    async def worker(tenant_id: str, all_inside: asyncio.Barrier) -> list[str]:
        seen = []
        with tenant_context(tenant_id):
            # Everyone is inside a block before anyone goes on, so blocks overlap.
            await all_inside.wait()
            for _ in range(20):
                await asyncio.sleep(random.random() / 1000 if random.random() < 0.3 else 0)
                seen.append(current_tenant())
        assert current_tenant_or_none() is None
        return seen

    async def main() -> list[list[str]]:
        barrier = asyncio.Barrier(len(tenants))
        return await asyncio.gather(*(worker(t, barrier) for t in tenants))

    results = asyncio.run(main())
    for tenant_id, seen in zip(tenants, results, strict=True):
        assert seen == [tenant_id] * 20


def test_tenant_set_in_a_task_stays_out_of_its_parent() -> None:
    async def child(tenant_id: str) -> str | None:
        inherited = current_tenant_or_none()
        # Set without a block, and never reset: it still must not reach the parent.
        tenant_context(tenant_id).__enter__()
        await asyncio.sleep(0)
        assert current_tenant() == tenant_id
        return inherited

    async def main() -> None:
        assert await asyncio.create_task(child("globex")) is None
        assert current_tenant_or_none() is None
        with tenant_context("acme"):
            # A task copies its creator's context when it is created...
            assert await asyncio.create_task(child("globex")) == "acme"
            # ...and what it changes stays in its copy.
            assert current_tenant() == "acme"
        assert current_tenant_or_none() is None

    asyncio.run(main())


def test_threads_start_without_a_tenant() -> None:
    with tenant_context("acme"), ThreadPoolExecutor(max_workers=2) as pool:
        assert pool.submit(current_tenant_or_none).result() is None
        with pytest.raises(NoTenantInContext):
            pool.submit(current_tenant).result()


def test_to_thread_carries_the_tenant_over() -> None:
    # asyncio.to_thread copies the context on purpose: sync helpers keep the tenant.
    async def main() -> str | None:
        with tenant_context("acme"):
            return await asyncio.to_thread(current_tenant_or_none)

    assert asyncio.run(main()) == "acme"


def test_threads_never_leak_into_each_other() -> None:
    tenants = [f"t{i}" for i in range(64)]
    start = threading.Barrier(8)

    def job(tenant_id: str) -> list[str | None]:
        seen = [current_tenant_or_none()]
        with tenant_context(tenant_id):
            if tenant_id in tenants[:8]:
                start.wait(timeout=10)  # the first eight overlap for sure
            for _ in range(50):
                seen.append(current_tenant_or_none())
        # The worker thread is reused by the next job: it must be clean again.
        seen.append(current_tenant_or_none())
        return seen

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, tenants))
    for tenant_id, seen in zip(tenants, results, strict=True):
        assert seen == [None, *[tenant_id] * 50, None]
