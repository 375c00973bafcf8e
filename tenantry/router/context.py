"""The current tenant: a contextvar, set for a block of code with :func:`tenant_context`.

A :class:`~contextvars.ContextVar` follows the code, not the thread: it survives
``await``; every asyncio task starts from a copy of its creator's context, so a tenant
set inside a task never shows in its parent or its siblings; and every thread starts
with an empty context, so a worker thread has no tenant until it sets one (tools that
copy the context on purpose, such as ``asyncio.to_thread``, carry it over).
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from tenantry.errors import NoTenantInContext
from tenantry.shardmap.model import validate_tenant_id

__all__ = [
    "TenantContext",
    "current_tenant",
    "current_tenant_or_none",
    "tenant_context",
]

# The one piece of module-level mutable state tenantry allows: a ContextVar holds a
# value per context (thread, asyncio task), not per process, so it is safe to share.
_current_tenant: ContextVar[str | None] = ContextVar("tenantry_tenant_id", default=None)


class TenantContext:
    """Makes ``tenant_id`` the current tenant inside ``with`` or ``async with``.

    Leaving the block restores whatever was current before, so blocks nest. One object
    may be entered again after (or while) it is in use: each entry keeps its own token.
    """

    __slots__ = ("_tokens", "tenant_id")

    def __init__(self, tenant_id: str) -> None:
        # Validate here, not on entry, so a bad id fails where it was written.
        self.tenant_id = validate_tenant_id(tenant_id)
        self._tokens: list[Token[str | None]] = []

    def __repr__(self) -> str:
        return f"tenant_context({self.tenant_id!r})"

    def __enter__(self) -> str:
        self._tokens.append(_current_tenant.set(self.tenant_id))
        return self.tenant_id

    def __exit__(self, *exc: object) -> None:
        # reset(), not set(previous): it restores the exact earlier state and raises if
        # the block is left in another context than it was entered in (a bug to surface).
        _current_tenant.reset(self._tokens.pop())

    async def __aenter__(self) -> str:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


def tenant_context(tenant_id: str) -> TenantContext:
    """Run a block as *tenant_id*: ``with tenant_context("acme"): ...``.

    Raises :class:`~tenantry.errors.InvalidTenantId` at once if the id breaks the
    naming rule. Works with ``async with`` too; either form is safe in async code.
    """
    return TenantContext(tenant_id)


def current_tenant() -> str:
    """Return the current tenant, or raise NoTenantInContext if there is none."""
    tenant_id = _current_tenant.get()
    if tenant_id is None:
        # Fail closed: no tenant must never mean "all tenants".
        raise NoTenantInContext()
    return tenant_id


def current_tenant_or_none() -> str | None:
    """Return the current tenant, or None if no tenant is set."""
    return _current_tenant.get()
