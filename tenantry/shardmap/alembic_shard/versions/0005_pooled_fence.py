"""The fence behind a connection pooler: signed for one transaction, not one connection.

PostgreSQL only (a no-op on SQLite). Behind a pooler in transaction mode (PgBouncer, RDS
Proxy and the like) a client connection has no server connection of its own: each of
its transactions may run on another, and every server connection serves many clients.
The router cannot know the server's pid without asking (the pooler hands clients a pid
of its own), and a signature bound to a server connection alone could be replayed by
any client whose transaction later lands on it (the routing role sees the fence
statements of its other sessions in ``pg_stat_activity``). So, on a shard whose routing
URL is pooled:

- ``tenantry.fence_nonce()`` returns ``'<pid>:<µs>'``: this server connection's pid and
  the start of the current transaction in microseconds since the epoch — what no other
  transaction has;
- ``tenantry.fence_pooled(tenant, signature)`` verifies an HMAC of
  (NUL, tenant, NUL, pid, µs) under the shard's key — a message no direct fence
  signature can equal, since a tenant never starts with NUL — and then runs
  ``tenantry.fence`` with the signature of this connection, made here: everything else
  (stamp, residency, freeze) is the fence's own. It first closes any ``WITH HOLD``
  cursor an earlier transaction left on the server connection (``reset_connections``
  cannot reach it through a pooler).

A router on a pooled shard sends BEGIN with ``fence_nonce()`` in one message, then the
fence: one more round trip than a direct connection, and no state left on the server
connection that a later transaction could use.
"""

from __future__ import annotations

from alembic import op

revision = "s0005"
down_revision = "s0004"

#: The current transaction's start, in microseconds since the epoch, as SQL.
_MICROS = (
    "(pg_catalog.date_part('epoch', pg_catalog.transaction_timestamp())"
    " OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8"
)

_NONCE_BODY = f"""
  SELECT pg_catalog.pg_backend_pid()::pg_catalog.text OPERATOR(pg_catalog.||) ':'
         OPERATOR(pg_catalog.||) {_MICROS}::pg_catalog.text
"""

_POOLED_BODY = f"""
DECLARE
  v_key int4;
  v_ipad bytea;
  v_opad bytea;
  v_message bytea;
BEGIN
  IF p_tenant IS NULL OR p_signature IS NULL
     OR p_signature !~ '^[0-9]{{1,9}}:[0-9a-f]{{64}}$' THEN
    RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
  END IF;
  v_key := split_part(p_signature, ':', 1)::int4;
  SELECT k.ipad, k.opad INTO v_ipad, v_opad FROM tenantry.fence_keys k WHERE k.key_id = v_key;
  v_message := '\\x00'::bytea || convert_to(p_tenant, 'UTF8') || '\\x00'::bytea
               || int4send(pg_backend_pid()) || int8send({_MICROS});
  IF v_ipad IS NULL OR sha256(v_opad || sha256(v_ipad || v_message))
       <> decode(split_part(p_signature, ':', 2), 'hex') THEN
    RAISE EXCEPTION 'tenantry: the fence signature for tenant "%" does not verify here',
      p_tenant USING ERRCODE = '28000',
      HINT = 'the shard''s fence key was rotated: the router reads it again from the catalog';
  END IF;
  -- A WITH HOLD cursor an earlier transaction left on this server connection, another
  -- client's perhaps, is closed before this one can fetch from it.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_cursors c WHERE c.is_holdable) THEN
    EXECUTE 'CLOSE ALL';
  END IF;
  RETURN tenantry.fence(p_tenant, v_key || ':' || encode(sha256(v_opad || sha256(v_ipad
    || convert_to(p_tenant, 'UTF8') || int4send(pg_backend_pid()))), 'hex'));
END
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION tenantry.fence_nonce() RETURNS pg_catalog.text"
        " LANGUAGE sql STABLE"
        f" AS $tenantry${_NONCE_BODY}$tenantry$"
    )
    op.execute(
        "CREATE FUNCTION tenantry.fence_pooled(p_tenant text, p_signature text) RETURNS text"
        " LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp"
        f" AS $tenantry${_POOLED_BODY}$tenantry$"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION tenantry.fence_pooled(text, text)")
    op.execute("DROP FUNCTION tenantry.fence_nonce()")
