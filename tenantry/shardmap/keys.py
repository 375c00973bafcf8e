"""Fence keys: how a shard knows that the tenant of a transaction was set by a router.

Row-level security on a shard compares every row's tenant column with the tenant of
the transaction. A plain setting (``SET tenantry.tenant_id = ...``) could be changed by
any statement the application sends, so the tenant travels with a signature instead:

    signature = "<key id>:" + hex(HMAC-SHA256(key, utf8(tenant) || int4(backend pid)))

The router computes it (it reads the shard's key from the catalog) and passes it to
the shard's fence function as a bound parameter; the fence verifies it against the
keys in ``tenantry.fence_keys``, a table the routing role cannot read, and leaves in
the transaction's settings a token — the same HMAC over ``0x00 || tenant || pid ||
the transaction's start time`` — that the row-level-security policies verify on every
statement. A signature names one tenant on one server connection, a token one
transaction too: neither can be replayed for another tenant, on another connection,
or (the token) in a later transaction.

Every shard keeps at most two keys: the current one and the one before it, so a key
can be rotated while routers still sign with the old one (``tenantry shard
rotate-key``). Keys are never printed or logged; :class:`FenceKey` hides its secret
from ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import Connection

__all__ = [
    "FENCE_SCHEMA",
    "KEYS_TABLE",
    "FenceKey",
    "current_key",
    "install_key",
    "new_key",
]

#: The schema of tenantry's fence objects on a PostgreSQL shard.
FENCE_SCHEMA = "tenantry"
KEYS_TABLE = f"{FENCE_SCHEMA}.fence_keys"
_BLOCK = 64  # SHA-256's block size


@dataclass(frozen=True, slots=True)
class FenceKey:
    """One shard's HMAC key and its id."""

    key_id: int
    secret: bytes = field(repr=False)
    #: HMAC-SHA256 keyed with the secret, not yet fed: a signature copies it instead of
    #: deriving the padded keys from the secret each time.
    _keyed: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keyed", hmac.new(self.secret, digestmod=hashlib.sha256))

    def _mac(self, message: bytes) -> str:
        """``<key id>:`` and the hex HMAC-SHA256 of *message* under this key."""
        mac = self._keyed.copy()
        mac.update(message)
        return f"{self.key_id}:{mac.hexdigest()}"

    def sign(self, tenant_id: str, backend_pid: int) -> str:
        """The signature the fence verifies for *tenant_id* on this server connection."""
        return self._mac(tenant_id.encode() + backend_pid.to_bytes(4, "big", signed=True))

    def sign_pooled(self, tenant_id: str, backend_pid: int, micros: int) -> str:
        """The signature ``tenantry.fence_pooled`` verifies for *tenant_id* in the one
        transaction that began at *micros* on server connection *backend_pid* (what
        ``tenantry.fence_nonce()`` returned in it)."""
        message = b"".join(
            (
                b"\0",
                tenant_id.encode(),
                b"\0",
                backend_pid.to_bytes(4, "big", signed=True),
                micros.to_bytes(8, "big", signed=True),
            )
        )
        return self._mac(message)

    def pads(self) -> tuple[bytes, bytes]:
        """HMAC's inner and outer padded keys, as the shard stores them.

        With them the shard computes HMAC-SHA256 as
        ``sha256(opad || sha256(ipad || message))``, with built-in functions only.
        """
        key = self.secret if len(self.secret) <= _BLOCK else hashlib.sha256(self.secret).digest()
        key = key.ljust(_BLOCK, b"\0")
        return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def new_key(key_id: int) -> FenceKey:
    """A fresh random key (32 bytes from the operating system's CSPRNG)."""
    return FenceKey(key_id, secrets.token_bytes(32))


_KEYS = sa.table(
    "fence_keys",
    sa.column("key_id", sa.Integer),
    sa.column("secret", sa.LargeBinary),
    sa.column("ipad", sa.LargeBinary),
    sa.column("opad", sa.LargeBinary),
    sa.column("created_at", sa.DateTime(timezone=True)),
    schema=FENCE_SCHEMA,
)


def current_key(conn: Connection) -> FenceKey | None:
    """The shard's newest key (through its operations role), or None when it has none."""
    if conn.dialect.name != "postgresql":
        return None
    if conn.exec_driver_sql(f"SELECT to_regclass('{KEYS_TABLE}')").scalar() is None:
        return None
    row = conn.execute(
        sa.select(_KEYS.c.key_id, _KEYS.c.secret).order_by(_KEYS.c.key_id.desc()).limit(1)
    ).first()
    return FenceKey(int(row[0]), bytes(row[1])) if row is not None else None


def install_key(conn: Connection, *, retire_previous: bool = False) -> FenceKey:
    """Add a new current key on the shard; keep only the one before it (or none).

    Runs in the caller's transaction, as the operations role. Routers that still sign
    with the previous key keep working until it is retired.
    """
    newest = conn.execute(sa.select(sa.func.max(_KEYS.c.key_id))).scalar()
    key = new_key((newest or 0) + 1)
    ipad, opad = key.pads()
    conn.execute(
        _KEYS.insert().values(
            key_id=key.key_id,
            secret=key.secret,
            ipad=ipad,
            opad=opad,
            created_at=sa.func.now(),
        )
    )
    keep_from = key.key_id if retire_previous else key.key_id - 1
    conn.execute(_KEYS.delete().where(_KEYS.c.key_id < keep_from))
    return key
