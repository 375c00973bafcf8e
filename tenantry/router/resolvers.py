"""Where a request names its tenant: a small, framework-neutral view of the request
(:class:`RequestInfo`) and the resolvers that read the tenant id from it (a header, the
subdomain or the path)."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "HeaderResolver",
    "PathResolver",
    "RequestInfo",
    "SubdomainResolver",
    "TenantResolver",
    "header_resolver",
    "path_resolver",
    "subdomain_resolver",
]

#: An ASGI connection scope, spelled as Starlette spells it.
Scope = MutableMapping[str, Any]

# RFC 9110 token characters: what a header name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a resolver may look at: host (as sent, port included), path, headers.

    ``path`` is the path below the app's mount point (ASGI ``root_path``, WSGI
    ``SCRIPT_NAME``); header names are lower case, repeated headers joined by ", ".
    """

    host: str
    path: str
    headers: Mapping[str, str]

    @classmethod
    def from_asgi(cls, scope: Scope) -> RequestInfo:
        """Build the view of an ASGI ``http`` or ``websocket`` scope."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = bytes(raw_name).decode("latin-1").lower()
            value = bytes(raw_value).decode("latin-1")
            # Joined as HTTP says repeated fields combine, and as WSGI servers do: two
            # different tenant headers then make an invalid id, not a silent choice.
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        host = headers.get("host")
        if host is None:
            server = scope.get("server")
            host = str(server[0]) if server else ""
        return cls(host=host, path=_route_path(scope), headers=headers)

    @classmethod
    def from_wsgi(cls, environ: Mapping[str, Any]) -> RequestInfo:
        """Build the view of a WSGI environ."""
        headers: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers[key[5:].replace("_", "-").lower()] = str(value)
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                headers[key.replace("_", "-").lower()] = str(value)
        host = headers.get("host") or str(environ.get("SERVER_NAME", ""))
        return cls(host=host, path=str(environ.get("PATH_INFO", "")), headers=headers)


def _route_path(scope: Scope) -> str:
    """The path below ``root_path``, as Starlette's routing computes it."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    # Servers disagree on whether ``path`` includes ``root_path``; accept both.
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest or rest.startswith("/"):
            return rest
    return path


# -------------------------------------------------------------------------- resolvers


class TenantResolver(Protocol):
    """Finds the tenant id in a request; None when the request names none."""

    def __call__(self, request: RequestInfo, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class HeaderResolver:
    """The tenant id is the value of header ``name`` (lower case)."""

    name: str

    def __call__(self, request: RequestInfo, /) -> str | None:
        return request.headers.get(self.name) or None

    @property
    def hint(self) -> str:
        """Where a client should put the tenant id."""
        return f"send the tenant id in the {self.name!r} header"


@dataclass(frozen=True, slots=True)
class SubdomainResolver:
    """The tenant id is the host's part before ``.base_domain`` (lower case)."""

    base_domain: str

    def __call__(self, request: RequestInfo, /) -> str | None:
        host = request.host.strip().lower()
        if host.startswith("["):
            return None  # an IPv6 literal has no subdomain
        name, colon, port = host.rpartition(":")
        if colon and port.isdigit():
            host = name
        host = host.rstrip(".")  # a fully qualified name may end with a dot
        suffix = "." + self.base_domain
        if not host.endswith(suffix):
            return None
        # Several labels ("www.acme") come back whole: they fail validation with a 400
        # that names them, rather than picking one label silently.
        return host[: -len(suffix)] or None

    @property
    def hint(self) -> str:
        """Where a client should put the tenant id."""
        return f"use the tenant's own host, <tenant>.{self.base_domain}"


@dataclass(frozen=True, slots=True)
class PathResolver:
    """The tenant id is the path segment after ``prefix`` (``/t/acme/rest`` -> acme).

    With ``strip=True`` the app sees the rest of the path (``/rest``) and the prefix
    moves to the mount point (ASGI ``root_path``, WSGI ``SCRIPT_NAME``), the way a
    mounted sub-application sees its requests, so generated URLs keep the prefix.
    """

    prefix: str
    strip: bool = False

    def __call__(self, request: RequestInfo, /) -> str | None:
        if not request.path.startswith(self.prefix):
            return None
        segment = request.path[len(self.prefix) :].partition("/")[0]
        return segment or None

    def mount_point(self, tenant_id: str) -> str:
        """The part of the path that names the tenant: ``/t/acme``."""
        return self.prefix + tenant_id

    @property
    def hint(self) -> str:
        """Where a client should put the tenant id."""
        return f"start the path with {self.prefix}<tenant>/"


def header_resolver(name: str = "x-tenant-id") -> HeaderResolver:
    """Resolve the tenant from a request header (case-insensitive name)."""
    lowered = name.strip().lower()
    if not _HEADER_NAME.fullmatch(lowered):
        raise ValueError(f"{name!r} is not a valid HTTP header name: use e.g. 'x-tenant-id'")
    return HeaderResolver(lowered)


def subdomain_resolver(base_domain: str) -> SubdomainResolver:
    """Resolve the tenant from the subdomain: ``acme.example.com`` -> ``acme``.

    The port is ignored; a host without a subdomain of *base_domain* names no tenant.
    """
    domain = base_domain.strip().strip(".").lower()
    if not domain or ":" in domain or "/" in domain:
        raise ValueError(
            f"base_domain {base_domain!r} is not a domain name: write e.g. 'example.com'"
        )
    return SubdomainResolver(domain)


def path_resolver(prefix: str = "/t/", *, strip: bool = False) -> PathResolver:
    """Resolve the tenant from the path segment after *prefix*: ``/t/acme/...``.

    ``strip=True`` hides ``/t/acme`` from the application's routing (see PathResolver).
    """
    if not (prefix.startswith("/") and prefix.endswith("/")):
        raise ValueError(f"prefix {prefix!r} must start and end with '/': write e.g. '/t/'")
    return PathResolver(prefix, strip=strip)
