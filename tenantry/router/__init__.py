"""Which engine serves this request: per-tenant sessions, scoped and fenced."""

from tenantry.router.aio import AsyncRouter
from tenantry.router.context import current_tenant, current_tenant_or_none, tenant_context
from tenantry.router.engines import EngineRegistry, EngineStats
from tenantry.router.middleware import TenantMiddleware, WSGITenantMiddleware
from tenantry.router.resolvers import (
    RequestInfo,
    header_resolver,
    path_resolver,
    subdomain_resolver,
)
from tenantry.router.router import Router
from tenantry.router.scoping import TenantScoped, TenantSession

__all__ = [
    "AsyncRouter",
    "EngineRegistry",
    "EngineStats",
    "RequestInfo",
    "Router",
    "TenantMiddleware",
    "TenantScoped",
    "TenantSession",
    "WSGITenantMiddleware",
    "current_tenant",
    "current_tenant_or_none",
    "header_resolver",
    "path_resolver",
    "subdomain_resolver",
    "tenant_context",
]
