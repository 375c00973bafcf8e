"""tenantry: multi-tenant routing, fleet migrations and tenant moves across a fleet of
shared and dedicated databases."""

import typing

from tenantry import errors, lazy
from tenantry.errors import *  # noqa: F403 (the names of errors.__all__)

if typing.TYPE_CHECKING:
    from tenantry.moves import Move, MoveKind, MoveMode, MoveState
    from tenantry.router import (
        AsyncRouter,
        Router,
        TenantMiddleware,
        TenantScoped,
        TenantSession,
        WSGITenantMiddleware,
        current_tenant,
        header_resolver,
        path_resolver,
        subdomain_resolver,
        tenant_context,
    )
    from tenantry.settings import TenantrySettings, load_settings
    from tenantry.shardmap import Catalog, MapSnapshot, PlacementRing
    from tenantry.shardmap.model import Shard, ShardState, Tenant, TenantState, Tier, mask_url

__version__ = "0.1.0"

__all__ = [
    "AsyncRouter",
    "Catalog",
    "MapSnapshot",
    "Move",
    "MoveKind",
    "MoveMode",
    "MoveState",
    "PlacementRing",
    "Router",
    "Shard",
    "ShardState",
    "Tenant",
    "TenantMiddleware",
    "TenantScoped",
    "TenantSession",
    "TenantState",
    "TenantrySettings",
    "Tier",
    "WSGITenantMiddleware",
    "__version__",
    "current_tenant",
    "header_resolver",
    "load_settings",
    "mask_url",
    "path_resolver",
    "subdomain_resolver",
    "tenant_context",
]
# and every error (tenantry.errors), the whole list sorted
__all__ += errors.__all__
__all__.sort()

#: Imported on first use (see tenantry.lazy): ``import tenantry``, and the CLI's
#: start-up, load neither the router, nor the movers, nor SQLAlchemy's ORM or Alembic.
__getattr__, __dir__ = lazy.lazy_module(
    __name__,
    lazy.exports(
        ("tenantry.moves", ("Move", "MoveKind", "MoveMode", "MoveState")),
        (
            "tenantry.router",
            (
                "AsyncRouter",
                "Router",
                "TenantMiddleware",
                "TenantScoped",
                "TenantSession",
                "WSGITenantMiddleware",
                "current_tenant",
                "header_resolver",
                "path_resolver",
                "subdomain_resolver",
                "tenant_context",
            ),
        ),
        ("tenantry.settings", ("TenantrySettings", "load_settings")),
        ("tenantry.shardmap", ("Catalog", "MapSnapshot", "PlacementRing")),
        (
            "tenantry.shardmap.model",
            ("Shard", "ShardState", "Tenant", "TenantState", "Tier", "mask_url"),
        ),
    ),
)
