"""ASGI and WSGI middleware that finds each request's tenant and runs the app as it.

A resolver reads the tenant id from a small, framework-neutral view of the request
(:mod:`tenantry.router.resolvers`): a header, the subdomain or the path. It validates
it, optionally asks a router whether the tenant exists, and runs the application inside
:func:`~tenantry.router.context.tenant_context`. A missing or invalid tenant gets a
400, an unknown one a 404, each with a one-sentence JSON body; never a 500.

tenantry's errors raised while the application serves the request are answered too,
as long as the response has not started: the retryable ones (a shard that cannot be
reached, a tenant frozen by a move, a stale route or rotated key that outlived its
retry, a spent connection budget, a catalog that cannot be read) with a 503 and a
``Retry-After`` header, ``UnknownTenant`` with a 404 and ``InvalidTenantId`` with a
400. Every error body is ``{"error": "<one sentence>", "retryable": <bool>}``; the
503's sentence names no shard, host or port (the log line, at WARNING, does). Other
tenantry errors (``CrossTenantWrite``, ``NoTenantInContext``, configuration errors)
are bugs of the application or its set-up: they propagate, as any exception does.
On WSGI, a request that runs without a tenant (an exempt path, ``required=False``)
gets back the application's own iterable, untouched (``wsgi.file_wrapper`` keeps
working): there, only errors raised by the call itself are answered.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from wsgiref.types import WSGIApplication  # the base class's argument: needed at runtime

from tenantry.errors import (
    CatalogError,
    CatalogNotInitialized,
    InvalidTenantId,
    RoutingError,
    ShardUnavailable,
    TenantFrozen,
    TenantryError,
    UnknownTenant,
)
from tenantry.router.context import TenantContext, tenant_context
from tenantry.router.fence import TENANT_KEY
from tenantry.router.resolvers import PathResolver, RequestInfo, Scope, TenantResolver
from tenantry.shardmap.drivers import describe_error
from tenantry.shardmap.model import validate_tenant_id

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

__all__ = [
    "WSGI_TENANT_KEY",
    "ASGIApp",
    "KnowsTenants",
    "KnowsTenantsAsync",
    "TenantMiddleware",
    "WSGITenantMiddleware",
]

# The ASGI types, spelled as Starlette spells them so either can be passed for the other.
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("tenantry.middleware")

AppT = TypeVar("AppT")
RouterT = TypeVar("RouterT")

#: Where WSGITenantMiddleware puts the tenant id in the environ.
WSGI_TENANT_KEY = TENANT_KEY

# Echoing a whole 8 kB header back in an error helps nobody.
_MAX_SHOWN = 80


# ---------------------------------------------------------------------------- routers


class KnowsTenants(Protocol):
    """Anything that can say whether a tenant exists, such as a Router.

    ``has_tenant`` is called on every request: it should be a cheap lookup (a map
    snapshot), not a query.
    """

    def has_tenant(self, tenant_id: str, /) -> bool:
        """Whether *tenant_id* is in the shard map."""


class KnowsTenantsAsync(Protocol):
    """The same, for a router whose ``has_tenant`` is a coroutine (ASGI only)."""

    def has_tenant(self, tenant_id: str, /) -> Awaitable[bool]:
        """Whether *tenant_id* is in the shard map."""


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class _Reject:
    status: int
    message: str
    retry_after: int | None = None  # seconds; set on every 503

    @property
    def headers(self) -> list[tuple[str, str]]:
        body = self.body
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if self.retry_after is not None:
            headers.append(("Retry-After", str(self.retry_after)))
        return headers

    @property
    def body(self) -> bytes:
        retryable = self.retry_after is not None
        return json.dumps({"error": self.message, "retryable": retryable}).encode()


#: Retry-After (seconds) of a shard or catalog that cannot be reached: a restart or a
#: failover takes seconds.
UNAVAILABLE_RETRY_AFTER = 5
#: Retry-After of the other retryable routing errors (a stale route, a rotated key, a
#: spent connection budget): the next attempt usually succeeds.
RETRY_AFTER = 1


def _answer(exc: BaseException) -> _Reject | None:
    """The HTTP answer to a tenantry error raised while serving a request; None when
    it should propagate (not tenantry's, or a bug rather than a condition to retry)."""
    if not isinstance(exc, TenantryError):
        return None
    unreachable_catalog = isinstance(exc, CatalogError) and not isinstance(
        exc, CatalogNotInitialized
    )
    if isinstance(exc, ShardUnavailable) or unreachable_catalog:
        message = "the tenant's database cannot be reached right now: retry later"
        return _Reject(503, message, retry_after=UNAVAILABLE_RETRY_AFTER)
    if isinstance(exc, TenantFrozen):
        seconds = max(1, math.ceil(exc.retry_after))
        message = (
            f"tenant {exc.tenant_id!r} is being moved: reads work, writes are refused for "
            f"now; retry in about {seconds}s"
        )
        return _Reject(503, message, retry_after=seconds)
    if isinstance(exc, RoutingError) and exc.retryable:
        return _Reject(503, "the request could not be routed just now: retry", RETRY_AFTER)
    if isinstance(exc, UnknownTenant):
        return _Policy.unknown(exc.tenant_id)
    if isinstance(exc, InvalidTenantId):
        return _Reject(400, str(InvalidTenantId(_clip(exc.value))))
    return None


def _log_answer(exc: BaseException, reject: _Reject) -> None:
    if reject.status >= 500:
        # The operator's side of the story: the shard's name and the cause, one line
        # (any password in a URL masked, whoever wrote the message).
        name = type(exc).__name__
        logger.warning("answered %d: %s: %s", reject.status, name, describe_error(exc))


def _clip(value: str) -> str:
    return value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."


class _Policy:
    """What both middlewares decide the same way: exemptions, resolution, validation."""

    __slots__ = ("_exact", "_prefixes", "required", "resolver")

    def __init__(
        self, resolver: TenantResolver, *, required: bool, exempt_paths: Iterable[str]
    ) -> None:
        if not callable(resolver):
            raise TypeError(
                f"resolver must be callable, got {resolver!r}: use header_resolver(), "
                "subdomain_resolver() or path_resolver()"
            )
        if isinstance(exempt_paths, str):
            raise ValueError(
                "exempt_paths takes several paths, not one string: "
                f"write exempt_paths=[{exempt_paths!r}]"
            )
        paths = tuple(exempt_paths)
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"exempt path {path!r} must start with '/'")
        self.resolver = resolver
        self.required = required
        self._exact = frozenset(p for p in paths if not p.endswith("/"))
        self._prefixes = tuple(p for p in paths if p.endswith("/"))

    def is_exempt(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)

    def resolve(self, request: RequestInfo) -> str | _Reject | None:
        """The valid tenant id, a rejection, or None: go on without a tenant."""
        try:
            tenant_id = self.resolver(request)
        except InvalidTenantId as exc:
            # A resolver that validates on its own has found a bad id: still a 400.
            return _Reject(400, str(InvalidTenantId(_clip(exc.value))))
        if tenant_id is None:
            if not self.required:
                return None
            hint = getattr(self.resolver, "hint", None)
            message = "no tenant in the request"
            return _Reject(400, f"{message}: {hint}" if isinstance(hint, str) else message)
        try:
            return validate_tenant_id(tenant_id)
        except InvalidTenantId:
            return _Reject(400, str(InvalidTenantId(_clip(str(tenant_id)))))

    @staticmethod
    def unknown(tenant_id: str) -> _Reject:
        return _Reject(404, f"unknown tenant {_clip(tenant_id)!r}: no such tenant is served here")


class _Middleware(Generic[AppT, RouterT]):
    """What both middlewares are made of: the application, the router that knows the
    tenants (optional), and the policy."""

    def __init__(
        self,
        app: AppT,
        *,
        resolver: TenantResolver,
        router: RouterT | None = None,
        required: bool = True,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        if router is not None and not callable(getattr(router, "has_tenant", None)):
            raise TypeError(f"router must have a has_tenant(tenant_id) method, got {router!r}")
        self.app = app
        self.router = router
        self._policy = _Policy(resolver, required=required, exempt_paths=exempt_paths)


# ------------------------------------------------------------------------------- ASGI


class TenantMiddleware(_Middleware[ASGIApp, KnowsTenants | KnowsTenantsAsync]):
    """ASGI middleware: run each ``http`` and ``websocket`` request as its tenant.

    Works with Starlette and FastAPI (``app.add_middleware(TenantMiddleware,
    resolver=header_resolver())``) and any other ASGI app. The tenant is current for
    the whole request (``current_tenant()``) and is also in ``scope["state"]
    ["tenant_id"]`` (Starlette's ``request.state.tenant_id``). A missing or invalid
    tenant gets a 400, a tenant that *router* does not know a 404; a websocket is
    closed with code 1008 before it is accepted. With ``required=False`` a request
    naming no tenant runs without one. Paths in *exempt_paths* (exact, or every path
    below one ending in "/") run without a tenant: health checks, static files.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            # lifespan and any future scope type: nothing to resolve.
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._serve(kind, scope, receive, tracked)
        except TenantryError as exc:
            reject = _answer(exc)
            if reject is None or started:
                raise  # not ours to answer, or too late: the response has begun
            _log_answer(exc, reject)
            await _reject(kind, reject, send)

    async def _serve(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = RequestInfo.from_asgi(scope)
        if self._policy.is_exempt(request.path):
            await self.app(scope, receive, send)
            return
        decision = self._policy.resolve(request)
        if decision is None:
            await self.app(scope, receive, send)
            return
        if isinstance(decision, str) and not await self._knows(decision):
            decision = _Policy.unknown(decision)
        if isinstance(decision, _Reject):
            await _reject(kind, decision, send)
            return
        with tenant_context(decision):
            await self.app(self._scope_for(scope, decision), receive, send)

    async def _knows(self, tenant_id: str) -> bool:
        if self.router is None:
            return True
        known = self.router.has_tenant(tenant_id)
        if inspect.isawaitable(known):
            known = await known
        return bool(known)

    def _scope_for(self, scope: Scope, tenant_id: str) -> Scope:
        # A copy of the scope and of its state: a server that shared one state dict
        # between requests must not let one request's tenant show in another's.
        child = dict(scope)
        child["state"] = {**scope.get("state", {}), "tenant_id": tenant_id}
        resolver = self._policy.resolver
        if isinstance(resolver, PathResolver) and resolver.strip:
            mount = resolver.mount_point(tenant_id)
            root_path: str = scope.get("root_path", "")
            path: str = scope.get("path", "")
            child["root_path"] = root_path + mount
            if not path.startswith(root_path + mount):
                # The server's path excludes root_path: strip the mount point from it.
                child["path"] = path[len(mount) :]
        return child


async def _reject(kind: str, reject: _Reject, send: Send) -> None:
    if kind == "websocket":
        # Closing before accepting makes the server refuse the handshake (HTTP 403).
        # 1013 is "try again later", 1008 "policy violation".
        code = 1013 if reject.retry_after is not None else 1008
        await send({"type": "websocket.close", "code": code, "reason": reject.message})
        return
    await send(
        {
            "type": "http.response.start",
            "status": reject.status,
            "headers": [(k.lower().encode(), v.encode()) for k, v in reject.headers],
        }
    )
    await send({"type": "http.response.body", "body": reject.body})


# ------------------------------------------------------------------------------- WSGI

_REASONS = {400: "400 Bad Request", 404: "404 Not Found", 503: "503 Service Unavailable"}


class WSGITenantMiddleware(_Middleware[WSGIApplication, KnowsTenants]):
    """WSGI middleware: run each request as its tenant (see TenantMiddleware).

    The tenant is current while the application runs *and* while its response is
    iterated and closed, so streamed bodies see it too; it is also in
    ``environ["tenantry.tenant_id"]``.
    """

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._serve(environ, start_response)
        except TenantryError as exc:
            reject = _answer(exc)
            if reject is None:
                raise
            _log_answer(exc, reject)
            # The application raised instead of returning a body: nothing was sent yet,
            # so its start_response (if it called it) may be replaced (PEP 3333).
            return _respond(reject, start_response, sys.exc_info())

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = RequestInfo.from_wsgi(environ)
        if self._policy.is_exempt(request.path):
            # The app's own iterable, untouched: a server's wsgi.file_wrapper still works.
            return self.app(environ, start_response)
        decision = self._policy.resolve(request)
        if decision is None:
            return self.app(environ, start_response)
        if isinstance(decision, str) and not self._knows(decision):
            decision = _Policy.unknown(decision)
        if isinstance(decision, _Reject):
            return _respond(decision, start_response)
        environ[WSGI_TENANT_KEY] = decision
        resolver = self._policy.resolver
        if isinstance(resolver, PathResolver) and resolver.strip:
            mount = resolver.mount_point(decision)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + mount
            environ["PATH_INFO"] = request.path[len(mount) :]
        context = tenant_context(decision)
        with context:
            result = self.app(environ, start_response)
        return _AnsweredBody(result, context, start_response)

    def _knows(self, tenant_id: str) -> bool:
        if self.router is None:
            return True
        known: object = self.router.has_tenant(tenant_id)
        if inspect.isawaitable(known):
            if inspect.iscoroutine(known):
                known.close()  # no "never awaited" warning on top of the error
            raise TypeError(
                "router.has_tenant() returned an awaitable: WSGI needs a synchronous "
                "router (Router, not AsyncRouter)"
            )
        return bool(known)


def _respond(reject: _Reject, start_response: StartResponse, exc_info: Any = None) -> list[bytes]:
    if exc_info is None:
        start_response(_REASONS[reject.status], reject.headers)
    else:
        start_response(_REASONS[reject.status], reject.headers, exc_info)
    return [reject.body]


class _AnsweredBody:
    """A WSGI response iterable that makes the tenant current for each step, and
    answers a tenantry error raised before the first chunk (see the module docstring).

    A generator application runs its body only when iterated, and ``close()`` runs
    its ``finally`` blocks: both must see the tenant. The server may iterate from a
    context where the tenant is not set, so every step enters it afresh.
    """

    __slots__ = ("_context", "_iterator", "_replaced", "_result", "_start_response", "_yielded")

    def __init__(
        self, result: Iterable[bytes], context: TenantContext, start_response: StartResponse
    ) -> None:
        self._result = result
        self._context = context
        self._start_response = start_response
        self._iterator: Iterator[bytes] | None = None
        self._yielded = False
        self._replaced: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._replaced is not None:
            return next(self._replaced)
        try:
            with self._context:
                chunk = self._step()
        except TenantryError as exc:
            reject = _answer(exc)
            if reject is None or self._yielded:
                raise  # not ours to answer, or too late: the body has begun
            _log_answer(exc, reject)
            # Nothing was sent yet: the status and headers may still be replaced.
            self._replaced = iter(_respond(reject, self._start_response, sys.exc_info()))
            return next(self._replaced)
        self._yielded = True
        return chunk

    def _step(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._result)
        return next(self._iterator)

    def close(self) -> None:
        """Close the application's iterable, as PEP 3333 requires, as the tenant."""
        close = getattr(self._result, "close", None)
        if close is not None:
            with self._context:
                close()
