"""The signed fence: only a router's fence can say which tenant a transaction acts for.

PostgreSQL only (a no-op on SQLite). In a schema ``tenantry`` owned by the operations
role:

- ``tenantry.fence_keys``: the shard's HMAC keys (the current one and the one before
  it), readable by no other role;
- ``tenantry.fence(tenant, signature)``: the first statement of every routed
  transaction. It verifies the router's signature of (tenant, this backend's pid),
  stores the tenant and a token — an HMAC of (tenant, pid, the transaction's start
  time) — in transaction-local settings, reads the tenant's residency row, makes a
  frozen tenant's transaction read-only, and returns the residency state;
- ``tenantry.tenant()``: the tenant of the transaction when the token in the settings
  verifies for this backend and this transaction, else NULL. The row-level-security
  policies compare the tenant column with it (once per statement: an InitPlan);
- ``tenantry.writable_tenant()``: the same, and an error (SQLSTATE 25006) unless the
  tenant's residency row here is ``active``: the shard itself refuses writes to a
  frozen or moved tenant, whatever SQL the application sends.

Changing ``tenantry.tenant_id`` or ``tenantry.signature`` by hand (SET, set_config,
RESET, savepoints) only ever makes the policies admit nothing, and a token copied into
a session-wide setting is worthless once its transaction ends (a raw ``COMMIT``, or
the next request on the pooled connection). The functions are
SECURITY DEFINER and name every object with its schema (the per-statement ones name
their operators too, instead of paying for a ``SET search_path`` on every call).

Revision ID: s0004
Revises: s0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.keys import install_key

revision = "s0004"
down_revision = "s0003"
branch_labels = None
depends_on = None

_TENANT_BODY = """
DECLARE
  v_tenant pg_catalog.text := pg_catalog.current_setting('tenantry.tenant_id', true);
  v_signature pg_catalog.text := pg_catalog.current_setting('tenantry.signature', true);
  v_ipad pg_catalog.bytea;
  v_opad pg_catalog.bytea;
BEGIN
  IF v_signature IS NULL OR v_tenant IS NULL
     OR v_signature OPERATOR(pg_catalog.!~) '^[0-9]{1,9}:[0-9a-f]{64}$' THEN
    RETURN NULL;
  END IF;
  SELECT k.ipad, k.opad INTO v_ipad, v_opad FROM tenantry.fence_keys k
   WHERE k.key_id OPERATOR(pg_catalog.=)
         pg_catalog.split_part(v_signature, ':', 1)::pg_catalog.int4;
  IF pg_catalog.sha256(v_opad OPERATOR(pg_catalog.||) pg_catalog.sha256(
       v_ipad OPERATOR(pg_catalog.||) '\\x00'::pg_catalog.bytea
       OPERATOR(pg_catalog.||) pg_catalog.convert_to(v_tenant, 'UTF8')
       OPERATOR(pg_catalog.||) pg_catalog.int4send(pg_catalog.pg_backend_pid())
       OPERATOR(pg_catalog.||) pg_catalog.timestamptz_send(pg_catalog.transaction_timestamp())))
     OPERATOR(pg_catalog.=) pg_catalog.decode(pg_catalog.split_part(v_signature, ':', 2), 'hex')
  THEN
    RETURN v_tenant;
  END IF;
  RETURN NULL;
END
"""

_WRITABLE_BODY = """
DECLARE
  v_tenant pg_catalog.text := tenantry.tenant();
  v_state pg_catalog.text;
BEGIN
  IF v_tenant IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT r.state INTO v_state FROM {residency} r WHERE r.tenant_id OPERATOR(pg_catalog.=) v_tenant;
  IF v_state IS NOT DISTINCT FROM 'active' THEN
    RETURN v_tenant;
  END IF;
  RAISE EXCEPTION 'tenantry: tenant "%" is % on this shard: writes are refused', v_tenant,
    COALESCE(v_state, 'not resident')
    USING ERRCODE = '25006',
          HINT = 'a move is copying the tenant or has moved it: retry through the router';
END
"""

_FENCE_BODY = """
DECLARE
  v_ipad bytea;
  v_opad bytea;
  v_state text;
BEGIN
  IF p_tenant IS NULL OR p_signature IS NULL
     OR p_signature !~ '^[0-9]{1,9}:[0-9a-f]{64}$' THEN
    RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
  END IF;
  SELECT k.ipad, k.opad,
         (SELECT r.state FROM {residency} r WHERE r.tenant_id = p_tenant)
    INTO v_ipad, v_opad, v_state
    FROM tenantry.fence_keys k
   WHERE k.key_id = split_part(p_signature, ':', 1)::int4;
  IF v_ipad IS NULL OR sha256(v_opad || sha256(v_ipad || convert_to(p_tenant, 'UTF8')
       || int4send(pg_backend_pid()))) <> decode(split_part(p_signature, ':', 2), 'hex') THEN
    RAISE EXCEPTION 'tenantry: the fence signature for tenant "%" does not verify here',
      p_tenant USING ERRCODE = '28000',
      HINT = 'the shard''s fence key was rotated: the router reads it again from the catalog';
  END IF;
  -- What the policies verify is not the router's signature (which never leaves this
  -- function) but a token bound to this transaction too: settings stashed by hand in
  -- one transaction admit nothing in the next one on the same connection.
  PERFORM set_config('tenantry.tenant_id', p_tenant, true),
          set_config('tenantry.signature', split_part(p_signature, ':', 1) || ':' || encode(
            sha256(v_opad || sha256(v_ipad || '\\x00'::bytea || convert_to(p_tenant, 'UTF8')
              || int4send(pg_backend_pid()) || timestamptz_send(transaction_timestamp()))),
            'hex'), true);
  IF v_state = 'frozen' THEN
    PERFORM set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
"""


def _residency_table() -> str:
    """tenantry_residency, named with its schema (where the operations role made it)."""
    name = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass('tenantry_residency')"
        )
        .scalar_one()
    )
    return str(name)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    residency = _residency_table()
    op.execute("CREATE SCHEMA IF NOT EXISTS tenantry")
    op.execute("REVOKE ALL ON SCHEMA tenantry FROM PUBLIC")
    op.execute("GRANT USAGE ON SCHEMA tenantry TO PUBLIC")
    op.execute(
        "CREATE TABLE tenantry.fence_keys ("
        " key_id integer PRIMARY KEY,"
        " secret bytea NOT NULL,"
        " ipad bytea NOT NULL,"
        " opad bytea NOT NULL,"
        " created_at timestamptz NOT NULL)"
    )
    op.execute("REVOKE ALL ON tenantry.fence_keys FROM PUBLIC")
    op.execute(
        "CREATE FUNCTION tenantry.tenant() RETURNS pg_catalog.text"
        " LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED"
        f" AS $tenantry${_TENANT_BODY}$tenantry$"
    )
    op.execute(
        "CREATE FUNCTION tenantry.writable_tenant() RETURNS pg_catalog.text"
        " LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED"
        f" AS $tenantry${_WRITABLE_BODY.replace('{residency}', residency)}$tenantry$"
    )
    op.execute(
        "CREATE FUNCTION tenantry.fence(p_tenant text, p_signature text) RETURNS text"
        " LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp"
        f" AS $tenantry${_FENCE_BODY.replace('{residency}', residency)}$tenantry$"
    )
    # The residency rows are read through the fence only.
    op.execute(f"REVOKE ALL ON {residency} FROM PUBLIC")
    install_key(bind)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP SCHEMA tenantry CASCADE")
