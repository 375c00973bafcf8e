"""Tenant middleware: resolvers, 4xx answers, exemptions, and the tenant in context.

ASGI is driven by hand (scope, receive, send) and end to end through Starlette's
TestClient and httpx2's ASGITransport; WSGI through wsgiref's testing environ.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from wsgiref.util import setup_testing_defaults

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from tenantry.errors import (
    CatalogError,
    CatalogNotInitialized,
    CatalogUnavailable,
    ConnectionBudgetExceeded,
    CrossTenantWrite,
    FenceRejected,
    InvalidTenantId,
    NoTenantInContext,
    ShardUnavailable,
    StaleRoute,
    TenantryError,
    UnknownTenant,
)
from tenantry.router.context import current_tenant, current_tenant_or_none
from tenantry.router.fence import frozen_error
from tenantry.router.middleware import TenantMiddleware, WSGITenantMiddleware
from tenantry.router.resolvers import (
    HeaderResolver,
    PathResolver,
    RequestInfo,
    SubdomainResolver,
    TenantResolver,
    header_resolver,
    path_resolver,
    subdomain_resolver,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

INVALID_IDS = ["'; drop table tenants; --", "ACME", "a" * 64, "-acme", "acme corp"]


class FakeRouter:
    """Knows a fixed set of tenants; records what it was asked."""

    def __init__(self, *tenants: str) -> None:
        self.tenants = set(tenants)
        self.asked: list[str] = []

    def has_tenant(self, tenant_id: str) -> bool:
        self.asked.append(tenant_id)
        return tenant_id in self.tenants


class FakeAsyncRouter(FakeRouter):
    async def has_tenant(self, tenant_id: str) -> bool:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().has_tenant(tenant_id)


@pytest.fixture(autouse=True)
def _no_tenant_leaks() -> Iterator[None]:
    assert current_tenant_or_none() is None
    yield
    assert current_tenant_or_none() is None


def req(
    *, host: str = "example.com", path: str = "/", headers: dict[str, str] | None = None
) -> RequestInfo:
    return RequestInfo(host=host, path=path, headers=headers or {})


# ---------------------------------------------------------------------------- resolvers


def test_header_resolver() -> None:
    resolve = header_resolver()
    assert resolve == HeaderResolver("x-tenant-id")
    assert resolve(req(headers={"x-tenant-id": "acme"})) == "acme"
    assert resolve(req(headers={"x-other": "acme"})) is None
    assert resolve(req(headers={"x-tenant-id": ""})) is None
    # Names are matched lower case, as RequestInfo stores them.
    assert header_resolver("X-Org")(req(headers={"x-org": "globex"})) == "globex"


@pytest.mark.parametrize("bad", ["", "x tenant", "x-tenant:", "x-ten\nant"])
def test_header_resolver_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid HTTP header name"):
        header_resolver(bad)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.example.com", "acme"),
        ("acme.example.com:8443", "acme"),
        ("ACME.Example.COM", "acme"),  # host names are case-insensitive
        ("acme.example.com.", "acme"),
        ("example.com", None),
        ("example.com:80", None),
        ("notexample.com", None),
        ("acme.example.org", None),
        ("www.acme.example.com", "www.acme"),  # invalid id: the middleware says 400
        ("[::1]:8000", None),
        ("127.0.0.1:8000", None),
        ("", None),
    ],
)
def test_subdomain_resolver(host: str, expected: str | None) -> None:
    assert subdomain_resolver("example.com")(req(host=host)) == expected


def test_subdomain_resolver_normalizes_its_domain() -> None:
    assert subdomain_resolver(".Example.com") == SubdomainResolver("example.com")
    for bad in ["", ".", "example.com:80", "https://example.com"]:
        with pytest.raises(ValueError, match="not a domain name"):
            subdomain_resolver(bad)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/t/acme/rest/of/it", "acme"),
        ("/t/acme", "acme"),
        ("/t/acme/", "acme"),
        ("/t/", None),
        ("/t//x", None),
        ("/t", None),
        ("/x/acme/rest", None),
        ("/", None),
    ],
)
def test_path_resolver(path: str, expected: str | None) -> None:
    assert path_resolver()(req(path=path)) == expected


def test_path_resolver_options() -> None:
    resolve = path_resolver("/tenants/", strip=True)
    assert resolve == PathResolver("/tenants/", strip=True)
    assert resolve(req(path="/tenants/acme/x")) == "acme"
    assert resolve.mount_point("acme") == "/tenants/acme"
    for bad in ["t/", "/t", ""]:
        with pytest.raises(ValueError, match="must start and end with '/'"):
            path_resolver(bad)


def test_request_info_from_asgi() -> None:
    scope = http_scope(
        "/api/t/acme",
        headers=[("X-Tenant-Id", "acme"), ("x-tenant-id", "evil"), ("Accept", "*/*")],
        host=None,
        root_path="/api",
    )
    info = RequestInfo.from_asgi(scope)
    # Repeated headers are joined, so a second tenant header makes an invalid id.
    assert info.headers == {"x-tenant-id": "acme, evil", "accept": "*/*"}
    assert info.host == "testserver"  # no Host header: the server's name
    assert info.path == "/t/acme"  # below root_path
    # A server whose path excludes root_path.
    assert RequestInfo.from_asgi(http_scope("/t/acme", root_path="/api")).path == "/t/acme"


def test_request_info_from_wsgi() -> None:
    environ = wsgi_environ("/t/acme", headers={"X-Tenant-Id": "acme"}, host="a.example.com")
    environ["CONTENT_TYPE"] = "text/plain"
    info = RequestInfo.from_wsgi(environ)
    assert info.host == "a.example.com"
    assert info.path == "/t/acme"
    assert info.headers["x-tenant-id"] == "acme"
    assert info.headers["content-type"] == "text/plain"
    del environ["HTTP_HOST"]
    assert RequestInfo.from_wsgi(environ).host == environ["SERVER_NAME"]


# ------------------------------------------------------------------ ASGI, by hand


def http_scope(
    path: str = "/",
    *,
    headers: Sequence[tuple[str, str]] = (),
    host: str | None = "example.com",
    root_path: str = "",
    kind: str = "http",
) -> Scope:
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers]
    if host is not None:
        raw_headers.insert(0, (b"host", host.encode()))
    return {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": raw_headers,
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }


class RecordingApp:
    """A raw ASGI app that records what it saw and answers 200 with its tenant."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)  # the tenant must survive an await
        self.calls.append(
            {
                "tenant": current_tenant_or_none(),
                "state": scope.get("state"),
                "path": scope.get("path"),
                "root_path": scope.get("root_path"),
            }
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        body = json.dumps({"tenant": current_tenant_or_none()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def drive(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        if scope["type"] == "websocket":
            return {"type": "websocket.connect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def call(app: Any, scope: Scope) -> tuple[int, dict[bytes, bytes], Any]:
    """Run one HTTP request; return (status, headers, decoded JSON body)."""
    sent = asyncio.run(drive(app, scope))
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["type"] == "http.response.body"
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def asgi(
    resolver: TenantResolver | None = None, **options: Any
) -> tuple[TenantMiddleware, RecordingApp]:
    inner = RecordingApp()
    return TenantMiddleware(inner, resolver=resolver or header_resolver(), **options), inner


def test_asgi_runs_the_app_as_the_tenant() -> None:
    app, inner = asgi()
    status, _, body = call(app, http_scope(headers=[("X-Tenant-Id", "acme")]))
    assert (status, body) == (200, {"tenant": "acme"})
    assert inner.calls[0]["tenant"] == "acme"
    assert inner.calls[0]["state"] == {"tenant_id": "acme"}


def test_asgi_copies_existing_state() -> None:
    app, inner = asgi()
    shared_state = {"db": "pool"}
    scope = http_scope(headers=[("x-tenant-id", "acme")])
    scope["state"] = shared_state
    call(app, scope)
    assert inner.calls[0]["state"] == {"db": "pool", "tenant_id": "acme"}
    # A state dict a server might share between requests never carries a tenant.
    assert shared_state == {"db": "pool"}


def assert_json_error(status: int, headers: dict[bytes, bytes], body: Any, want: int) -> str:
    assert status == want
    assert headers[b"content-type"] == b"application/json"
    assert body.keys() == {"error", "retryable"} and body["retryable"] is False
    message: str = body["error"]
    return message


def test_asgi_missing_tenant_is_400() -> None:
    app, inner = asgi()
    message = assert_json_error(*call(app, http_scope()), 400)
    assert message == "no tenant in the request: send the tenant id in the 'x-tenant-id' header"
    assert inner.calls == []


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_asgi_invalid_tenant_is_400(bad: str) -> None:
    app, inner = asgi(router=FakeRouter(bad))
    message = assert_json_error(*call(app, http_scope(headers=[("x-tenant-id", bad)])), 400)
    assert message.startswith("invalid tenant id")
    assert inner.calls == []


def test_asgi_two_tenant_headers_are_400() -> None:
    app, inner = asgi()
    scope = http_scope(headers=[("x-tenant-id", "acme"), ("x-tenant-id", "globex")])
    assert "'acme, globex'" in assert_json_error(*call(app, scope), 400)
    assert inner.calls == []


def test_asgi_long_invalid_id_is_clipped_in_the_message() -> None:
    app, _ = asgi()
    message = assert_json_error(*call(app, http_scope(headers=[("x-tenant-id", "A" * 5000)])), 400)
    assert len(message) < 300


def test_asgi_unknown_tenant_is_404() -> None:
    router = FakeRouter("acme")
    app, inner = asgi(router=router)
    message = assert_json_error(*call(app, http_scope(headers=[("x-tenant-id", "nope")])), 404)
    assert message == "unknown tenant 'nope': no such tenant is served here"
    assert inner.calls == []
    status, _, body = call(app, http_scope(headers=[("x-tenant-id", "acme")]))
    assert (status, body) == (200, {"tenant": "acme"})
    assert router.asked == ["nope", "acme"]


def test_asgi_router_with_async_has_tenant() -> None:
    app, _ = asgi(router=FakeAsyncRouter("acme"))
    assert call(app, http_scope(headers=[("x-tenant-id", "acme")]))[0] == 200
    assert call(app, http_scope(headers=[("x-tenant-id", "nope")]))[0] == 404


def test_asgi_resolver_that_raises_invalid_id_is_400() -> None:
    def strict(request: RequestInfo) -> str | None:
        raise InvalidTenantId("Bad")

    app, _ = asgi(strict)
    message = assert_json_error(*call(app, http_scope()), 400)
    assert message.startswith("invalid tenant id 'Bad'")


def test_asgi_custom_resolver_without_hint() -> None:
    app, _ = asgi(lambda request: None)
    assert assert_json_error(*call(app, http_scope()), 400) == "no tenant in the request"


def test_asgi_exempt_paths() -> None:
    app, inner = asgi(router=FakeRouter(), exempt_paths=["/health", "/static/"])
    assert call(app, http_scope("/health"))[0] == 200
    assert call(app, http_scope("/static/app.css"))[0] == 200
    assert [c["tenant"] for c in inner.calls] == [None, None]
    # Exact entries are not prefixes; prefixes end with "/".
    assert call(app, http_scope("/health/deep"))[0] == 400
    assert call(app, http_scope("/static"))[0] == 400


def test_asgi_optional_tenant() -> None:
    app, inner = asgi(required=False, router=FakeRouter("acme"))
    status, _, body = call(app, http_scope())
    assert (status, body) == (200, {"tenant": None})
    assert inner.calls[0]["state"] is None  # nothing added
    # A tenant that is named must still be valid and known.
    assert call(app, http_scope(headers=[("x-tenant-id", "ACME")]))[0] == 400
    assert call(app, http_scope(headers=[("x-tenant-id", "nope")]))[0] == 404
    assert call(app, http_scope(headers=[("x-tenant-id", "acme")]))[2] == {"tenant": "acme"}


def test_asgi_subdomain_and_path_resolvers() -> None:
    app, _ = asgi(subdomain_resolver("example.com"))
    assert call(app, http_scope(host="acme.example.com:8000"))[2] == {"tenant": "acme"}
    assert "<tenant>.example.com" in assert_json_error(*call(app, http_scope()), 400)
    assert call(app, http_scope(host="www.acme.example.com"))[0] == 400

    app, inner = asgi(path_resolver())
    assert call(app, http_scope("/t/acme/items"))[2] == {"tenant": "acme"}
    assert inner.calls[0]["path"] == "/t/acme/items"  # not stripped by default
    assert "/t/<tenant>/" in assert_json_error(*call(app, http_scope("/items")), 400)


def test_asgi_path_strip_moves_the_prefix_to_root_path() -> None:
    app, inner = asgi(path_resolver(strip=True))
    call(app, http_scope("/api/t/acme/items", root_path="/api"))
    assert inner.calls[0]["root_path"] == "/api/t/acme"
    assert inner.calls[0]["path"] == "/api/t/acme/items"
    # A server whose path excludes root_path gets the prefix cut from the path.
    call(app, http_scope("/t/acme/items", root_path="/api"))
    assert inner.calls[1]["root_path"] == "/api/t/acme"
    assert inner.calls[1]["path"] == "/items"


def test_asgi_lifespan_passes_through_untouched() -> None:
    seen: list[Any] = []

    async def inner(scope: Scope, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send, current_tenant_or_none()))

    app = TenantMiddleware(inner, resolver=header_resolver(), router=FakeRouter())
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    asyncio.run(app(scope, receive, send))
    assert len(seen) == 1
    assert seen[0][0] is scope
    assert seen[0][1] is receive
    assert seen[0][2] is send
    assert seen[0][3] is None
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}


def test_asgi_websocket_rejected_before_accept() -> None:
    app, inner = asgi(router=FakeRouter("acme"))
    for headers in [[], [("x-tenant-id", "ACME")], [("x-tenant-id", "nope")]]:
        sent = asyncio.run(drive(app, http_scope("/ws", headers=headers, kind="websocket")))
        assert len(sent) == 1
        assert sent[0]["type"] == "websocket.close"
        assert sent[0]["code"] == 1008
    assert inner.calls == []
    sent = asyncio.run(
        drive(app, http_scope("/ws", headers=[("x-tenant-id", "acme")], kind="websocket"))
    )
    assert sent == [{"type": "websocket.accept"}]
    assert inner.calls[0]["tenant"] == "acme"


def test_asgi_context_is_gone_after_a_failing_request() -> None:
    async def inner(scope: Scope, receive: Any, send: Any) -> None:
        assert current_tenant() == "acme"
        raise RuntimeError("handler failed")

    app = TenantMiddleware(inner, resolver=header_resolver())

    async def main() -> None:
        with pytest.raises(RuntimeError, match="handler failed"):
            await drive(app, http_scope(headers=[("x-tenant-id", "acme")]))
        assert current_tenant_or_none() is None

    asyncio.run(main())


def test_asgi_many_concurrent_requests_each_see_their_own_tenant() -> None:
    tenants = [f"tenant-{i}" for i in range(300)]

    async def inner(scope: Scope, receive: Any, send: Any) -> None:
        seen = []
        for _ in range(10):
            await asyncio.sleep(random.random() / 1000 if random.random() < 0.3 else 0)
            seen.append(current_tenant())
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app = TenantMiddleware(inner, resolver=path_resolver(), router=FakeRouter(*tenants))

    async def main() -> list[list[Message]]:
        # All requests run in this one task's context, as a server's handlers would.
        requests = [drive(app, http_scope(f"/t/{t}/x")) for t in tenants]
        results = await asyncio.gather(*requests)
        assert current_tenant_or_none() is None
        return results

    for tenant_id, sent in zip(tenants, asyncio.run(main()), strict=True):
        assert json.loads(sent[1]["body"]) == [tenant_id] * 10


def test_middleware_checks_its_options() -> None:
    inner = RecordingApp()
    with pytest.raises(ValueError, match=r"exempt_paths=\['/health'\]"):
        TenantMiddleware(inner, resolver=header_resolver(), exempt_paths="/health")
    with pytest.raises(ValueError, match="must start with '/'"):
        WSGITenantMiddleware(wsgi_app, resolver=header_resolver(), exempt_paths=["health"])
    with pytest.raises(TypeError, match="has_tenant"):
        TenantMiddleware(inner, resolver=header_resolver(), router=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="resolver must be callable"):
        TenantMiddleware(inner, resolver="x-tenant-id")  # type: ignore[arg-type]


# --------------------------------------------------------------- ASGI, end to end


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "tenant": current_tenant(),
            "state": request.state.tenant_id,
            "url": str(request.url_for("whoami")),
        }
    )


def whoami_sync(request: Request) -> JSONResponse:
    # Starlette runs sync endpoints in a worker thread, with the context copied over.
    return JSONResponse({"tenant": current_tenant()})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"tenant": current_tenant_or_none()})


async def ws_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"tenant": current_tenant()})
    await websocket.close()


def starlette_app(resolver: TenantResolver, events: list[str] | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if events is not None:
            events.append(f"startup {current_tenant_or_none()}")
        yield
        if events is not None:
            events.append("shutdown")

    return Starlette(
        routes=[
            Route("/whoami", whoami, name="whoami"),
            Route("/sync", whoami_sync),
            Route("/health", health),
            WebSocketRoute("/ws", ws_endpoint),
        ],
        middleware=[
            Middleware(
                TenantMiddleware,
                resolver=resolver,
                router=FakeRouter("acme", "globex"),
                exempt_paths=["/health"],
            )
        ],
        lifespan=lifespan,
    )


def test_starlette_end_to_end() -> None:
    events: list[str] = []
    app = starlette_app(header_resolver(), events)
    with TestClient(app) as client:
        assert events == ["startup None"]  # lifespan went through
        response = client.get("/whoami", headers={"X-Tenant-Id": "acme"})
        assert response.status_code == 200
        assert response.json() == {
            "tenant": "acme",
            "state": "acme",
            "url": "http://testserver/whoami",
        }
        assert client.get("/sync", headers={"X-Tenant-Id": "globex"}).json() == {"tenant": "globex"}
        assert client.get("/health").json() == {"tenant": None}

        for headers, status in [
            ({}, 400),
            ({"X-Tenant-Id": "Acme"}, 400),
            ({"X-Tenant-Id": "x"}, 404),
        ]:
            response = client.get("/whoami", headers=headers)
            assert response.status_code == status
            assert response.headers["content-type"] == "application/json"
            assert isinstance(response.json()["error"], str)

        with client.websocket_connect("/ws", headers={"X-Tenant-Id": "acme"}) as ws:
            assert ws.receive_json() == {"tenant": "acme"}
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws"):
            pass
        assert info.value.code == 1008
    assert events == ["startup None", "shutdown"]


def test_starlette_subdomain() -> None:
    with TestClient(starlette_app(subdomain_resolver("example.com"))) as client:
        response = client.get("http://globex.example.com/whoami")
        assert response.json()["tenant"] == "globex"
        assert client.get("http://example.com/whoami").status_code == 400
        assert client.get("http://initech.example.com/whoami").status_code == 404


def test_starlette_path_strip_routes_below_the_prefix() -> None:
    with TestClient(starlette_app(path_resolver(strip=True))) as client:
        response = client.get("/t/acme/whoami")
        assert response.status_code == 200
        # Routing saw /whoami; generated URLs keep the tenant's prefix.
        assert response.json() == {
            "tenant": "acme",
            "state": "acme",
            "url": "http://testserver/t/acme/whoami",
        }
        assert client.get("/whoami").status_code == 400
        assert client.get("/t/nope/whoami").status_code == 404


def test_httpx2_concurrent_requests_each_see_their_own_tenant() -> None:
    async def slow(request: Request) -> Response:
        seen = []
        for _ in range(5):
            await asyncio.sleep(random.random() / 500)
            seen.append(current_tenant())
        return JSONResponse(seen)

    tenants = [f"t{i}" for i in range(100)]
    app = Starlette(
        routes=[Route("/slow", slow)],
        middleware=[
            Middleware(TenantMiddleware, resolver=header_resolver(), router=FakeRouter(*tenants))
        ],
    )

    async def main() -> list[httpx2.Response]:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *(client.get("/slow", headers={"x-tenant-id": t}) for t in tenants)
            )

    for tenant_id, response in zip(tenants, asyncio.run(main()), strict=True):
        assert response.status_code == 200
        assert response.json() == [tenant_id] * 5


# --------------------------------------------------------------------------- WSGI


def wsgi_environ(
    path: str = "/", *, headers: dict[str, str] | None = None, host: str = "example.com"
) -> dict[str, Any]:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    environ["HTTP_HOST"] = host
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    body = json.dumps(
        {
            "tenant": current_tenant_or_none(),
            "environ": environ.get("tenantry.tenant_id"),
            "script_name": environ.get("SCRIPT_NAME"),
            "path_info": environ.get("PATH_INFO"),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def wsgi_call(app: Any, environ: dict[str, Any]) -> tuple[str, dict[str, str], Any]:
    response: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        response["status"] = status
        response["headers"] = dict(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return response["status"], response["headers"], json.loads(body)


def wsgi(resolver: TenantResolver | None = None, **options: Any) -> WSGITenantMiddleware:
    return WSGITenantMiddleware(wsgi_app, resolver=resolver or header_resolver(), **options)


def test_wsgi_runs_the_app_as_the_tenant() -> None:
    status, _, body = wsgi_call(wsgi(), wsgi_environ(headers={"X-Tenant-Id": "acme"}))
    assert status == "200 OK"
    assert body["tenant"] == body["environ"] == "acme"


def test_wsgi_rejections() -> None:
    app = wsgi(router=FakeRouter("acme"))
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "400 Bad Request"),
        *(({"X-Tenant-Id": bad}, "400 Bad Request") for bad in INVALID_IDS),
        ({"X-Tenant-Id": "nope"}, "404 Not Found"),
    ]
    for headers, want in cases:
        status, response_headers, body = wsgi_call(app, wsgi_environ(headers=headers))
        assert status == want
        assert response_headers["Content-Type"] == "application/json"
        assert int(response_headers["Content-Length"]) == len(json.dumps(body).encode())
        assert body.keys() == {"error", "retryable"} and body["retryable"] is False


def test_wsgi_exempt_and_optional() -> None:
    app = wsgi(exempt_paths=["/health"], router=FakeRouter())
    assert wsgi_call(app, wsgi_environ("/health"))[2]["tenant"] is None
    assert wsgi_call(app, wsgi_environ("/other"))[0] == "400 Bad Request"
    app = wsgi(required=False)
    status, _, body = wsgi_call(app, wsgi_environ())
    assert (status, body["tenant"], body["environ"]) == ("200 OK", None, None)


def test_wsgi_subdomain_and_path_strip() -> None:
    app = wsgi(subdomain_resolver("example.com"))
    assert wsgi_call(app, wsgi_environ(host="acme.example.com:8080"))[2]["tenant"] == "acme"
    app = wsgi(path_resolver(strip=True))
    environ = wsgi_environ("/t/acme/items")
    environ["SCRIPT_NAME"] = "/app"
    body = wsgi_call(app, environ)[2]
    assert body["tenant"] == "acme"
    assert (body["script_name"], body["path_info"]) == ("/app/t/acme", "/items")
    body = wsgi_call(wsgi(path_resolver()), wsgi_environ("/t/acme/items"))[2]
    assert (body["script_name"], body["path_info"]) == ("", "/t/acme/items")


class StreamingBody:
    """A response iterable that records the tenant on every step and on close."""

    def __init__(self, log: list[tuple[str, str | None]]) -> None:
        self.log = log
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for part in (b'"a', b'b"'):
            self.log.append(("chunk", current_tenant_or_none()))
            yield part

    def close(self) -> None:
        self.closed += 1
        self.log.append(("close", current_tenant_or_none()))


def test_wsgi_tenant_is_current_while_the_body_is_consumed() -> None:
    log: list[tuple[str, str | None]] = []
    streams: list[StreamingBody] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        log.append(("call", current_tenant_or_none()))
        start_response("200 OK", [])
        streams.append(StreamingBody(log))
        return streams[-1]

    middleware = WSGITenantMiddleware(app, resolver=header_resolver())
    assert wsgi_call(middleware, wsgi_environ(headers={"x-tenant-id": "acme"}))[2] == "ab"
    assert log == [("call", "acme"), ("chunk", "acme"), ("chunk", "acme"), ("close", "acme")]
    assert streams[0].closed == 1
    # A body that the server closes without reading is still closed, as the tenant.
    log.clear()
    result = middleware(wsgi_environ(headers={"x-tenant-id": "acme"}), lambda *a: None)  # type: ignore[arg-type]
    result.close()  # type: ignore[attr-defined]
    assert log == [("call", "acme"), ("close", "acme")]
    assert streams[1].closed == 1


def test_wsgi_generator_app_sees_the_tenant_to_its_finally() -> None:
    log: list[str | None] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            log.append(current_tenant_or_none())
            yield b'"x"'
            log.append(current_tenant_or_none())
            yield b""
        finally:
            log.append(current_tenant_or_none())

    middleware = WSGITenantMiddleware(app, resolver=header_resolver())
    assert wsgi_call(middleware, wsgi_environ(headers={"x-tenant-id": "acme"}))[2] == "x"
    assert log == ["acme", "acme", "acme"]


def test_wsgi_refuses_an_async_router() -> None:
    app = wsgi(router=FakeAsyncRouter("acme"))
    with pytest.raises(TypeError, match="synchronous"):
        wsgi_call(app, wsgi_environ(headers={"x-tenant-id": "acme"}))


def test_wsgi_threads_each_see_their_own_tenant() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for _ in range(20):
            yield json.dumps(current_tenant()).encode() + b","

    middleware = WSGITenantMiddleware(app, resolver=path_resolver())
    tenants = [f"t{i}" for i in range(200)]

    def request(tenant_id: str) -> tuple[list[str], str | None]:
        result = middleware(wsgi_environ(f"/t/{tenant_id}/"), lambda *a: None)  # type: ignore[arg-type]
        try:
            seen = json.loads(b"[" + b"".join(result)[:-1] + b"]")
        finally:
            result.close()  # type: ignore[attr-defined]
        # The worker thread serves the next request next: nothing may stay behind.
        return seen, current_tenant_or_none()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(request, tenants))
    for tenant_id, (seen, after) in zip(tenants, results, strict=True):
        assert seen == [tenant_id] * 20
        assert after is None


# ------------------------------------------------ tenantry's errors raised by the app

SECRET = "hunter2-very-secret"


def unavailable() -> ShardUnavailable:
    return ShardUnavailable(
        f"cannot reach shard 'shared-a': connection failed: postgresql://app:{SECRET}@db1",
        shard="shared-a",
    )


#: (error raised inside the endpoint, status, Retry-After or None)
RAISED: list[tuple[Callable[[], TenantryError], int, str | None]] = [
    (unavailable, 503, "5"),
    (lambda: CatalogUnavailable("cannot reach the catalog"), 503, "5"),
    (lambda: CatalogError("the catalog failed: server closed the connection"), 503, "5"),
    (lambda: frozen_error("acme", "shared-a", retry_after=2.5), 503, "3"),
    (lambda: StaleRoute("stale", tenant_id="acme", shard="shared-a"), 503, "1"),
    (lambda: FenceRejected("rotated", tenant_id="acme", shard="shared-a"), 503, "1"),
    (lambda: ConnectionBudgetExceeded("budget spent", shard="shared-a"), 503, "1"),
    (lambda: UnknownTenant("acme"), 404, None),
    (lambda: InvalidTenantId("Bad Id"), 400, None),
]


def check_answer(
    status: int, headers: dict[str, str], body: Any, want: int, retry_after: str | None
) -> None:
    assert status == want
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(json.dumps(body).encode())
    assert headers.get("retry-after") == retry_after
    assert body.keys() == {"error", "retryable"}
    assert body["retryable"] is (want == 503)
    # What the client reads names no shard, host or secret.
    assert "shared-a" not in body["error"] and SECRET not in body["error"]
    assert "\n" not in body["error"]


def raising_asgi(error: Callable[[], BaseException], *, after_start: bool = False) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise error()

    return app


@pytest.mark.parametrize(("error", "want", "retry_after"), RAISED)
def test_asgi_answers_tenantry_errors_raised_by_the_app(
    error: Callable[[], TenantryError],
    want: int,
    retry_after: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = TenantMiddleware(raising_asgi(error), resolver=header_resolver())
    status, raw, body = call(app, http_scope(headers=[("x-tenant-id", "acme")]))
    headers = {k.decode(): v.decode() for k, v in raw.items()}
    check_answer(status, headers, body, want, retry_after)
    if want == 503:
        # The operator's log line says which shard, one line, no secret.
        (record,) = [r for r in caplog.records if r.name == "tenantry.middleware"]
        assert type(error()).__name__ in record.getMessage()
        assert SECRET not in record.getMessage()


def test_asgi_leaves_other_errors_and_started_responses_alone() -> None:
    for error in (
        lambda: CrossTenantWrite("a bug of the app"),
        NoTenantInContext,
        lambda: CatalogNotInitialized("run `tenantry init`"),
        lambda: RuntimeError("not tenantry's"),
    ):
        app = TenantMiddleware(raising_asgi(error), resolver=header_resolver())
        with pytest.raises(type(error())):
            asyncio.run(drive(app, http_scope(headers=[("x-tenant-id", "acme")])))
    # Too late for another status: the error goes on to the server.
    app = TenantMiddleware(raising_asgi(unavailable, after_start=True), resolver=header_resolver())
    with pytest.raises(ShardUnavailable):
        asyncio.run(drive(app, http_scope(headers=[("x-tenant-id", "acme")])))


def test_asgi_errors_of_exempt_paths_and_of_the_router_are_answered() -> None:
    app = TenantMiddleware(
        raising_asgi(unavailable), resolver=header_resolver(), exempt_paths=["/health"]
    )
    status, raw, _ = call(app, http_scope("/health"))
    assert status == 503 and raw[b"retry-after"] == b"5"

    class DownCatalog:
        def has_tenant(self, tenant_id: str) -> bool:
            raise CatalogUnavailable("cannot reach the catalog")

    app, inner = asgi(router=DownCatalog())
    status, raw, body = call(app, http_scope(headers=[("x-tenant-id", "acme")]))
    assert (status, body["retryable"], raw[b"retry-after"]) == (503, True, b"5")
    assert inner.calls == []


def test_asgi_websocket_gets_try_again_later() -> None:
    app = TenantMiddleware(raising_asgi(unavailable), resolver=header_resolver())
    sent = asyncio.run(drive(app, http_scope(kind="websocket", headers=[("x-tenant-id", "a")])))
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert sent[0]["code"] == 1013


def test_starlette_answers_503_for_tenantry_errors_in_endpoints() -> None:
    async def down(request: Request) -> Response:
        raise unavailable()

    def frozen(request: Request) -> Response:  # a sync endpoint, in a worker thread
        raise frozen_error(current_tenant(), "shared-a", retry_after=4)

    app = Starlette(
        routes=[Route("/down", down), Route("/frozen", frozen)],
        middleware=[Middleware(TenantMiddleware, resolver=header_resolver())],
    )
    with TestClient(app) as client:  # raises any error that reaches the server
        response = client.get("/down", headers={"X-Tenant-Id": "acme"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["retryable"] is True
        response = client.get("/frozen", headers={"X-Tenant-Id": "acme"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "4"
        assert "acme" in response.json()["error"]


def raising_wsgi(error: Callable[[], BaseException], when: str) -> Any:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if when == "call":
            raise error()
        start_response("200 OK", [("Content-Type", "text/plain")])
        if when == "after start_response":
            raise error()
        return body()

    def body() -> Iterator[bytes]:
        if when == "after a chunk":
            yield b"partial"
        raise error()

    return app


@pytest.mark.parametrize(("error", "want", "retry_after"), RAISED)
@pytest.mark.parametrize("when", ["call", "after start_response", "first chunk"])
def test_wsgi_answers_tenantry_errors_raised_by_the_app(
    error: Callable[[], TenantryError], want: int, retry_after: str | None, when: str
) -> None:
    app = WSGITenantMiddleware(raising_wsgi(error, when), resolver=header_resolver())
    status, raw, body = wsgi_call(app, wsgi_environ(headers={"X-Tenant-Id": "acme"}))
    assert status.startswith(f"{want} ")
    check_answer(int(status[:3]), {k.lower(): v for k, v in raw.items()}, body, want, retry_after)


def test_wsgi_leaves_other_errors_and_started_bodies_alone() -> None:
    app = WSGITenantMiddleware(
        raising_wsgi(lambda: CrossTenantWrite("a bug"), "call"), resolver=header_resolver()
    )
    with pytest.raises(CrossTenantWrite):
        wsgi_call(app, wsgi_environ(headers={"X-Tenant-Id": "acme"}))
    app = WSGITenantMiddleware(
        raising_wsgi(unavailable, "after a chunk"), resolver=header_resolver()
    )
    result = app(wsgi_environ(headers={"X-Tenant-Id": "acme"}), lambda *a: None)  # type: ignore[arg-type]
    iterator = iter(result)
    assert next(iterator) == b"partial"
    with pytest.raises(ShardUnavailable):
        next(iterator)


def test_wsgi_router_errors_are_answered() -> None:
    class DownCatalog:
        def has_tenant(self, tenant_id: str) -> bool:
            raise CatalogUnavailable("cannot reach the catalog")

    status, headers, body = wsgi_call(
        wsgi(router=DownCatalog()), wsgi_environ(headers={"X-Tenant-Id": "acme"})
    )
    assert (status, headers["Retry-After"], body["retryable"]) == (
        "503 Service Unavailable",
        "5",
        True,
    )


def test_wsgi_exempt_paths_get_the_apps_own_iterable() -> None:
    body = object()  # e.g. what a server's wsgi.file_wrapper made

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if environ["PATH_INFO"] == "/down":
            raise unavailable()
        start_response("200 OK", [])
        return body

    middleware = WSGITenantMiddleware(app, resolver=header_resolver(), exempt_paths=["/static/"])
    assert middleware(wsgi_environ("/static/app.js"), lambda *a: None) is body  # type: ignore[arg-type]
    middleware = WSGITenantMiddleware(
        app, resolver=header_resolver(), exempt_paths=["/static/", "/down"]
    )
    status, headers, _ = wsgi_call(middleware, wsgi_environ("/down"))
    assert (status, headers["Retry-After"]) == ("503 Service Unavailable", "5")
