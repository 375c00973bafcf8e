"""Errors raised by tenantry.

Every error is a :class:`TenantryError`; each carries its context (tenant id, shard
name, ...) as attributes, and its message says what is wrong and what to do::

    TenantryError
    ├── ConfigurationError              a setting or argument is invalid
    │   ├── UnsafeRoutingRole           row-level security would not bind the routing role
    │   └── PoolerInTheWay              an operations URL reaches the server through a pooler
    ├── InvalidName (ValueError)        a tenant id or shard name breaks the naming rule
    │   ├── InvalidTenantId
    │   └── InvalidShardName
    ├── InvalidShardUrl (ValueError)    not a database URL tenantry can use
    ├── CatalogError                    the catalog cannot be read or written
    │   ├── CatalogUnavailable          cannot connect to the catalog database
    │   └── CatalogNotInitialized       schema missing or out of date: run `tenantry init`
    ├── LookupFailed (LookupError)
    │   ├── UnknownTenant
    │   └── UnknownShard
    ├── AlreadyExists
    │   ├── TenantExists
    │   └── ShardExists
    │       └── DatabaseAlreadyRegistered   the database is a shard already, by another name
    ├── PlacementError                  no valid home for a tenant
    │   ├── NoSharedShard               no active shared shard to place a tenant on
    │   ├── TierMismatch                e.g. a dedicated tenant on a shared shard
    │   ├── ShardNotActive              the shard is draining or retired
    │   ├── ShardOccupied               a dedicated shard already holds a tenant
    │   └── TenantHasRows               a tenant to remove still has rows at its home
    ├── ShardUnavailable                a shard's database cannot be reached
    ├── ProvisionError                  a database could not be created and migrated
    ├── MoveError                       a tenant move cannot start or go on
    │   ├── MoveInProgress              the tenant is being moved already
    │   ├── MoveRefused                 a precheck failed; nothing was changed
    │   ├── MoveRolledBack              a step failed; the move was rolled back
    │   ├── FreezeTimeout               older transactions outlived the freeze wait
    │   │   └── FreezeBudgetExceeded    an online move's freeze outran --max-freeze
    │   ├── ReplicationFailed           an online move's replication failed or stalled
    │   └── UnknownMove                 no move with this id
    ├── SchemaContractError             a tenant table breaks the schema contract
    ├── VerificationFailed              source and target digests of a tenant differ
    └── RoutingError                    a routed session cannot serve the request
        ├── NoTenantInContext           no tenant given and none in context
        ├── CrossTenantWrite            an object or row carries another tenant's id
        ├── StaleRoute                  the tenant is not resident where the map says
        ├── TenantFrozen                a move is copying the tenant: retry writes later
        ├── FenceRejected               the shard refused the fence's signature (key rotated)
        └── ConnectionBudgetExceeded    every engine is busy and the budget is spent
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "AlreadyExists",
    "CatalogError",
    "CatalogNotInitialized",
    "CatalogUnavailable",
    "ConfigurationError",
    "ConnectionBudgetExceeded",
    "CrossTenantWrite",
    "DatabaseAlreadyRegistered",
    "FenceRejected",
    "FreezeBudgetExceeded",
    "FreezeTimeout",
    "InvalidName",
    "InvalidShardName",
    "InvalidShardUrl",
    "InvalidTenantId",
    "LookupFailed",
    "MoveError",
    "MoveInProgress",
    "MoveRefused",
    "MoveRolledBack",
    "NoSharedShard",
    "NoTenantInContext",
    "PlacementError",
    "PoolerInTheWay",
    "ProvisionError",
    "ReplicationFailed",
    "RoutingError",
    "SchemaContractError",
    "ShardExists",
    "ShardNotActive",
    "ShardOccupied",
    "ShardUnavailable",
    "StaleRoute",
    "TenantExists",
    "TenantFrozen",
    "TenantHasRows",
    "TenantryError",
    "TierMismatch",
    "UnknownMove",
    "UnknownShard",
    "UnknownTenant",
    "UnsafeRoutingRole",
    "VerificationFailed",
]


class TenantryError(Exception):
    """Base class of every error tenantry raises on purpose."""


class _NamesShard(Exception):
    """Mixin of the errors that may name a shard: ``shard``."""

    def __init__(self, message: str, *, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


class _NamesTenantAndShard(_NamesShard):
    """Mixin of the errors that may name a tenant and a shard: ``tenant_id``, ``shard``."""

    def __init__(
        self, message: str, *, tenant_id: str | None = None, shard: str | None = None
    ) -> None:
        super().__init__(message, shard=shard)
        self.tenant_id = tenant_id


class ConfigurationError(TenantryError):
    """A setting or argument is invalid; ``field`` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsafeRoutingRole(ConfigurationError):
    """A shared PostgreSQL shard's routing role is one that row-level security does not
    bind (a superuser, BYPASSRLS, an owner of the tenant tables, the operations role);
    ``problems`` says which. The message names the fix: ``tenantry shard secure``."""

    def __init__(
        self, message: str, *, shard: str, role: str, problems: Sequence[str] = ()
    ) -> None:
        super().__init__(message, field="allow_unsafe_routing_role")
        self.shard = shard
        self.role = role
        self.problems = list(problems)


class PoolerInTheWay(ConfigurationError):
    """An operations URL reaches its server through a connection pooler (PgBouncer, RDS
    Proxy, ...). Moves, fleet migrations, sizes and garbage collection hold sessions
    (replication, advisory locks, waiting out transactions) that only the server itself
    keeps: the message says which URL to give instead."""

    def __init__(self, message: str, *, shard: str | None = None) -> None:
        super().__init__(message, field="admin_url")
        self.shard = shard


class InvalidName(TenantryError, ValueError):
    """A tenant id or shard name does not follow the naming rule."""

    kind = "name"

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(
            f"invalid {self.kind} {value!r}: use 1 to 63 characters of a-z, 0-9, '_' and "
            "'-', starting with a letter or digit"
        )


class InvalidTenantId(InvalidName):
    """A tenant id does not match ``^[a-z0-9][a-z0-9_-]{0,62}$``."""

    kind = "tenant id"

    @property
    def tenant_id(self) -> str:
        """The id that was refused."""
        return self.value


class InvalidShardName(InvalidName):
    """A shard name does not match ``^[a-z0-9][a-z0-9_-]{0,62}$``."""

    kind = "shard name"

    @property
    def shard(self) -> str:
        """The name that was refused."""
        return self.value


class InvalidShardUrl(_NamesShard, TenantryError, ValueError):
    """A shard URL is not a SQLite or PostgreSQL SQLAlchemy URL."""


class CatalogError(TenantryError):
    """The catalog could not be read or written."""


class CatalogUnavailable(CatalogError):
    """The catalog database cannot be reached."""


class CatalogNotInitialized(CatalogError):
    """The catalog schema is missing or older than this tenantry."""


class LookupFailed(TenantryError, LookupError):
    """Something named does not exist."""


class UnknownTenant(LookupFailed):
    """No tenant with this id in the catalog."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(
            f"unknown tenant {tenant_id!r}: add it with `tenantry tenant add {tenant_id}`"
        )
        self.tenant_id = tenant_id


class UnknownShard(LookupFailed):
    """No shard with this name in the catalog."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"unknown shard {shard!r}: see `tenantry shard list`")
        self.shard = shard


class AlreadyExists(TenantryError):
    """Something with this name exists already."""


class TenantExists(AlreadyExists):
    """A tenant with this id exists already."""

    def __init__(self, tenant_id: str, shard: str) -> None:
        super().__init__(f"tenant {tenant_id!r} exists already (on shard {shard!r})")
        self.tenant_id = tenant_id
        self.shard = shard


class ShardExists(AlreadyExists):
    """A shard with this name exists already."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"shard {shard!r} exists already: choose another name")
        self.shard = shard


class DatabaseAlreadyRegistered(ShardExists):
    """The database is registered already as another shard (its URL spelled another way);
    ``shard`` is the name asked for, ``existing`` the shard it is registered as."""

    def __init__(self, shard: str, existing: str, *, message: str | None = None) -> None:
        AlreadyExists.__init__(
            self,
            message
            or f"cannot add shard {shard!r}: its database is already registered as shard "
            f"{existing!r} (same database, another spelling of its URL): use that shard",
        )
        self.shard = shard
        self.existing = existing


class PlacementError(_NamesTenantAndShard, TenantryError):
    """A tenant cannot be placed where asked."""


class NoSharedShard(PlacementError):
    """There is no active shared shard to place a shared tenant on."""


class TierMismatch(PlacementError):
    """The shard's tier does not match the tenant's."""


class ShardOccupied(PlacementError):
    """A dedicated shard holds another tenant already."""


class TenantHasRows(PlacementError):
    """A tenant to be removed still has rows at its home; ``counts`` gives them per
    table. Purge them, or keep them knowingly (``tenantry tenant remove --purge`` or
    ``--keep-rows``)."""

    def __init__(
        self, message: str, *, tenant_id: str, shard: str, counts: Mapping[str, int]
    ) -> None:
        super().__init__(message, tenant_id=tenant_id, shard=shard)
        self.counts = dict(counts)


class ShardNotActive(PlacementError):
    """The shard is draining or retired and takes no tenants."""


class ShardUnavailable(_NamesShard, TenantryError):
    """A shard's database cannot be reached; ``shard`` names it (never its password)."""


class RoutingError(_NamesTenantAndShard, TenantryError):
    """A routed session or connection cannot serve the request."""

    retryable = False


class NoTenantInContext(RoutingError):
    """No tenant was given and none is set in the current context."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "no tenant in context: wrap the code in tenant_context(...) or pass a tenant id"
        )


class CrossTenantWrite(RoutingError):
    """An object or row for another tenant was written through this tenant's session."""


class StaleRoute(RoutingError):
    """The tenant is not resident on the shard its (refreshed) map names."""

    retryable = True


class TenantFrozen(RoutingError):
    """A move is copying the tenant; reads work, writes must be retried later."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        tenant_id: str | None = None,
        shard: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(message, tenant_id=tenant_id, shard=shard)
        self.retry_after = retry_after


class FenceRejected(RoutingError):
    """The shard did not accept the fence's signature: its key changed since it was read.

    The router reads the key again and retries once; raised when that fails too.
    """

    retryable = True


class ConnectionBudgetExceeded(RoutingError):
    """Opening another engine would exceed the router's connection budget."""

    retryable = True


class ProvisionError(_NamesShard, TenantryError):
    """A shard's database could not be created, migrated or registered.

    Nothing is left half-done: a database tenantry created is dropped again.
    """


class MoveError(TenantryError):
    """A tenant move cannot start or go on."""

    def __init__(
        self, message: str, *, tenant_id: str | None = None, move_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.move_id = move_id


class MoveInProgress(MoveError):
    """The tenant already has a live move (one move per tenant at a time)."""

    def __init__(self, tenant_id: str, move_id: int | None) -> None:
        which = f"move {move_id}" if move_id is not None else "another move"
        super().__init__(
            f"tenant {tenant_id!r} is being moved already ({which}): see `tenantry moves list`",
            tenant_id=tenant_id,
            move_id=move_id,
        )


class MoveRefused(MoveError):
    """A precheck failed before anything was frozen or copied."""


class MoveRolledBack(MoveError):
    """A step of a move failed before the switch; the move was rolled back (the tenant
    stays on its source, writable) and the journal records why."""


class FreezeTimeout(MoveError):
    """Transactions older than the freeze did not end in time; the tenant was unfrozen."""


class FreezeBudgetExceeded(FreezeTimeout):
    """The sentinel of an online move never arrived within the freeze budget, attempt
    after attempt; the move was rolled back."""


class ReplicationFailed(MoveError):
    """Logical replication of an online move failed or stalled before the freeze;
    ``reachable`` says whether both ends could still be reached (then the move was
    rolled back; else it was left live, saying what to run)."""

    def __init__(
        self,
        message: str,
        *,
        reachable: bool = True,
        tenant_id: str | None = None,
        move_id: int | None = None,
    ) -> None:
        super().__init__(message, tenant_id=tenant_id, move_id=move_id)
        self.reachable = reachable


class UnknownMove(MoveError, LookupError):
    """No move with this id."""

    def __init__(self, move_id: int) -> None:
        super().__init__(f"unknown move {move_id}: see `tenantry moves list`", move_id=move_id)


class SchemaContractError(TenantryError):
    """A tenant table breaks the schema contract (DESIGN.md); ``table`` names it."""

    def __init__(self, table: str, reason: str) -> None:
        super().__init__(f"table {table!r} cannot be moved: {reason}")
        self.table = table
        self.reason = reason


class VerificationFailed(TenantryError):
    """A tenant's rows differ between source and target; ``tables`` names every one."""

    def __init__(self, message: str | None = None, *, tables: Sequence[str]) -> None:
        self.tables = list(tables)
        super().__init__(
            message
            or "verification failed: tables differ between source and target: "
            + ", ".join(self.tables)
        )
