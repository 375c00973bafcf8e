"""Settings, read from arguments, ``TENANTRY_*`` environment variables and ``.env``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tenantry.errors import ConfigurationError
from tenantry.urls import mask_url

__all__ = ["DEFAULT_CATALOG_URL", "TenantrySettings", "load_settings"]

DEFAULT_CATALOG_URL = "sqlite:///.tenantry/catalog.db"


class TenantrySettings(BaseSettings):
    """Every knob of tenantry, with the defaults a small fleet wants.

    Each field can be set as ``TENANTRY_<FIELD>`` in the environment or in ``.env``.
    """

    model_config = SettingsConfigDict(
        env_prefix="TENANTRY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    catalog_url: str = Field(
        DEFAULT_CATALOG_URL,
        min_length=1,
        description="SQLAlchemy URL of the catalog (the shard map's store).",
    )
    tenant_column: str = Field(
        "tenant_id",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Name of the tenant key column in every tenant table.",
    )
    pool_size_shared: int = Field(10, ge=1, le=1000)
    pool_size_dedicated: int = Field(2, ge=1, le=1000)
    max_overflow: int = Field(5, ge=0, le=1000)
    pool_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a pooled connection.")
    pool_recycle: float = Field(1800.0, gt=0)
    connect_timeout: float = Field(
        5.0, gt=0, le=600, description="Seconds before an unreachable database is given up."
    )
    statement_timeout: float = Field(
        0.0, ge=0, description="Seconds; 0 leaves the server's default."
    )
    max_engines: int = Field(
        64, ge=1, description="Open engines at most; idle ones are disposed least recent first."
    )
    connection_budget: int = Field(
        400, ge=1, description="Connections at most across every engine of a router."
    )
    routers_per_server: int = Field(
        8,
        ge=1,
        description="How many routers share a PostgreSQL server: each opens at most its share "
        "of the server's max_connections (less superuser_reserved_connections and "
        "server_connection_reserve).",
    )
    server_connection_reserve: int = Field(
        10,
        ge=0,
        description="Connections of each PostgreSQL server that routers leave to operators, "
        "moves and migrations.",
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between map-version polls when LISTEN is unavailable."
    )
    catalog_listen_url: str | None = Field(
        None,
        description="PostgreSQL: the catalog server's own URL, for LISTEN, when catalog_url "
        "goes through a connection pooler (where notifications never arrive); unset, such "
        "routers poll every poll_interval.",
    )
    move_schemas: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="PostgreSQL schemas whose tenant tables move with a tenant, comma "
        "separated (the connection's default schema always moves). Empty: every schema "
        "but the system's (pg_catalog, information_schema, pg_toast*, pg_temp*) and "
        "tenantry's own. A table of a schema left out never moves; a foreign key from it "
        "to a tenant table makes moves refuse.",
    )
    freeze_timeout: float = Field(
        30.0, gt=0, description="Seconds a move waits for older transactions after freezing."
    )
    sizes_max_age: float = Field(
        86400.0,
        gt=0,
        description="Seconds after which stored tenant sizes are stale: `rebalance` warns "
        "and names --refresh.",
    )
    move_stall_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds an online move waits for logical replication to make any "
        "progress (initial copy, catch-up) before it stops, saying why.",
    )
    alembic_config: str | None = Field(
        None, description="The application's alembic.ini, or its script directory."
    )
    allow_unsafe_routing_role: bool = Field(
        False,
        description="Let a shared PostgreSQL shard route as a role that row-level security "
        "does not bind (superuser, BYPASSRLS, table owner, the operations role): for local "
        "development only; a warning is logged every time it lets one through.",
    )
    dedicated_constant: bool = Field(
        True,
        description="PostgreSQL: make a dedicated database's one tenant a constant of its "
        "row-level-security policies (shard revision s0007: no per-connection stamp, a "
        "cheaper new connection; any session of the routing role there acts for that "
        "tenant without a fence). Off: every shard keeps the signed fence's stamp; applied "
        "at shard add and by the next `tenantry migrate upgrade`.",
    )
    reset_connections: bool = Field(
        False,
        description="PostgreSQL: reset a routed connection's session state (settings, WITH "
        "HOLD cursors, prepared statements, listens, advisory locks) when it goes back to "
        "its pool, so none of it reaches the next tenant on it; one round trip per "
        "transaction.",
    )

    fence_with_begin: bool = Field(
        True,
        description="PostgreSQL: send a routed transaction's BEGIN and its fence in one "
        "pipeline (one round trip less per transaction), on sync and asyncio routers "
        "alike; off sends BEGIN on its own, as psycopg does.",
    )

    metrics: bool = Field(
        False,
        description="Prometheus metrics of routers, movers and fleet migrations (needs the "
        "`observability` extra): README, 'Observing the fleet'.",
    )
    metrics_top_tenants: int = Field(
        100,
        ge=0,
        le=10_000,
        description="Per-tenant metrics for this many of the busiest tenants only (0: none).",
    )
    metrics_tenant_half_life: float = Field(
        60.0, gt=0, description="Seconds in which a tenant's load score halves."
    )
    traces: bool = Field(
        False,
        description="OpenTelemetry spans for routed transactions, move states and migrated "
        "databases (needs opentelemetry-api; exported by whatever SDK the application set up).",
    )
    statement_comments: bool = Field(
        False,
        description="Add a sqlcommenter comment (tenant, and the route set by "
        "tenantry.observability.statement_route) to every routed statement.",
    )

    @field_validator("move_schemas", mode="before")
    @classmethod
    def _split_schemas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(dict.fromkeys(str(v).strip() for v in value if str(v).strip()))
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() ends up in logs; the catalog URL may carry a password (invariant 7).
        for name, value in super().__repr_args__():
            if name == "catalog_url" and isinstance(value, str):
                value = mask_url(value)
            yield name, value


def load_settings(**overrides: Any) -> TenantrySettings:
    """Read the settings; an invalid value raises one clear :class:`ConfigurationError`."""
    try:
        return TenantrySettings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        raise ConfigurationError(
            f"invalid setting TENANTRY_{field.upper()}: {error['msg']}", field=field
        ) from None
