"""The signed fence: only a router's fence can say which tenant a transaction acts for.

PostgreSQL only (a no-op on SQLite). In a schema ``tenantry`` owned by the operations
role:

- ``tenantry.fence_keys``: the shard's HMAC keys (the current one and the one before
  it), readable by no other role;
- ``tenantry.open_session()``: run once on every new routed connection. It makes the
  connection's *stamp*, a temporary sequence ``pg_temp.tenantry_transaction`` owned by
  the operations role, that every role may read (``currval``) and only its owner may
  set. It refuses a routing role that may create temporary objects (unless the role
  bypasses row-level security anyway, or the router was told to allow unsafe routing
  roles): such a role could drop the stamp and make one of its own;
- ``tenantry.fence(tenant, signature)``: the first statement of every routed
  transaction. It verifies the router's signature, an HMAC of (tenant, this backend's
  pid) under the shard's key, sets ``tenantry.tenant_id``, sets the stamp to
  ``hashtextextended(tenant, the transaction's start time)``, reads the tenant's
  residency row, makes a frozen tenant's transaction read-only, and returns the
  residency state;
- ``tenantry.tenant()``: the tenant in ``tenantry.tenant_id`` when the stamp matches it
  and this transaction, else NULL. The row-level-security policies compare the tenant
  column with it, once per statement (an InitPlan), at the cost of a few simple
  expressions: no table read, no hash of a secret;
- ``tenantry.writable_tenant()``: the same, and an error (SQLSTATE 25006) unless the
  tenant's residency row here is ``active``: the shard itself refuses writes to a
  frozen or moved tenant, whatever SQL the application sends.

So changing ``tenantry.tenant_id`` by hand (SET, set_config, RESET, savepoints) only
ever makes the policies admit nothing; only the fence can set the stamp, and a stamp
is worthless once its transaction ends (a raw ``COMMIT``, the next request on the
pooled connection). Setting the stamp touches a temporary object, so PostgreSQL
refuses ``PREPARE TRANSACTION`` in a routed transaction: no prepared transaction can
outlive a freeze. ``tenantry.signature`` only says which key and stamp the fence used.
The functions name every object and operator with its schema.
"""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.keys import install_key

revision = "s0004"
down_revision = "s0003"

#: The stamp of the current transaction for *tenant* (an int8), as SQL.
_STAMP = (
    "pg_catalog.hashtextextended({tenant}, (pg_catalog.date_part('epoch',"
    " pg_catalog.transaction_timestamp()) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8)"
)

_TENANT_BODY = """
DECLARE
  v_tenant pg_catalog.text := pg_catalog.current_setting('tenantry.tenant_id', true);
BEGIN
  IF v_tenant IS NULL OR v_tenant OPERATOR(pg_catalog.=) ''
     OR pg_catalog.to_regclass('pg_temp.tenantry_transaction') IS NULL THEN
    RETURN NULL;
  END IF;
  IF pg_catalog.currval('pg_temp.tenantry_transaction') OPERATOR(pg_catalog.=) {stamp} THEN
    RETURN v_tenant;
  END IF;
  RETURN NULL;
END
""".replace("{stamp}", _STAMP.replace("{tenant}", "v_tenant"))

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

_OPEN_BODY = """
DECLARE
  v_mine boolean;
BEGIN
  SELECT c.relowner = (SELECT o.oid FROM pg_roles o WHERE o.rolname = current_user)
    INTO v_mine FROM pg_class c WHERE c.oid = to_regclass('pg_temp.tenantry_transaction');
  IF v_mine THEN
    RETURN;
  ELSIF NOT v_mine THEN
    RAISE EXCEPTION 'tenantry: pg_temp.tenantry_transaction was not made by tenantry'
      USING ERRCODE = '42501';
  END IF;
  IF NOT p_allow_temporary
     AND has_database_privilege(session_user, current_database(), 'TEMPORARY')
     AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r
               WHERE r.rolname = session_user) THEN
    RAISE EXCEPTION 'tenantry: the routing role "%" may create temporary tables, so it '
      'could replace the fence''s stamp', session_user
      USING ERRCODE = '42501',
      HINT = 'run `tenantry migrate upgrade` or `tenantry shard secure`: they revoke it';
  END IF;
  CREATE SEQUENCE pg_temp.tenantry_transaction AS bigint
    MINVALUE -9223372036854775808 MAXVALUE 9223372036854775807;
  GRANT SELECT ON SEQUENCE pg_temp.tenantry_transaction TO PUBLIC;
  PERFORM setval('pg_temp.tenantry_transaction', 0, true);
END
"""

_FENCE_BODY = """
DECLARE
  v_ipad bytea;
  v_opad bytea;
  v_state text;
  v_stamp int8;
  v_done text;
BEGIN
  IF p_tenant IS NULL OR p_signature IS NULL
     OR p_signature !~ '^[0-9]{1,9}:[0-9a-f]{64}$' THEN
    RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
  END IF;
  SELECT k.ipad, k.opad, r.state INTO v_ipad, v_opad, v_state
    FROM tenantry.fence_keys k LEFT JOIN {residency} r ON r.tenant_id = p_tenant
   WHERE k.key_id = split_part(p_signature, ':', 1)::int4;
  IF v_ipad IS NULL OR sha256(v_opad || sha256(v_ipad || convert_to(p_tenant, 'UTF8')
       || int4send(pg_backend_pid()))) <> decode(split_part(p_signature, ':', 2), 'hex') THEN
    RAISE EXCEPTION 'tenantry: the fence signature for tenant "%" does not verify here',
      p_tenant USING ERRCODE = '28000',
      HINT = 'the shard''s fence key was rotated: the router reads it again from the catalog';
  END IF;
  IF to_regclass('pg_temp.tenantry_transaction') IS NULL THEN
    -- Dropped since the connection opened (DISCARD TEMP): make it again. The routing
    -- role was checked when the connection opened, and without TEMPORARY it cannot have
    -- made a stamp of its own.
    PERFORM tenantry.open_session(true);
  ELSIF has_sequence_privilege(session_user, 'pg_temp.tenantry_transaction', 'UPDATE')
        -- (a routing role that is the operations role, a superuser or BYPASSRLS is
        -- bound by no policy anyway: refused by the router unless explicitly allowed)
        AND session_user <> current_user
        AND NOT (SELECT o.rolsuper OR o.rolbypassrls FROM pg_roles o
                  WHERE o.rolname = session_user) THEN
    RAISE EXCEPTION 'tenantry: the routing role "%" may set the fence''s stamp', session_user
      USING ERRCODE = '42501';
  END IF;
  -- Assignments, not PERFORM: plpgsql evaluates them without starting an executor.
  v_stamp := setval('pg_temp.tenantry_transaction', {stamp}, true);
  v_done := set_config('tenantry.tenant_id', p_tenant, true);
  v_done := set_config('tenantry.signature', split_part(p_signature, ':', 1) || ':' || v_stamp,
                       true);
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
""".replace("{stamp}", _STAMP.replace("{tenant}", "p_tenant"))


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
        " LANGUAGE plpgsql STABLE PARALLEL RESTRICTED"
        f" AS $tenantry${_TENANT_BODY}$tenantry$"
    )
    op.execute(
        "CREATE FUNCTION tenantry.writable_tenant() RETURNS pg_catalog.text"
        " LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED"
        f" AS $tenantry${_WRITABLE_BODY.replace('{residency}', residency)}$tenantry$"
    )
    op.execute(
        "CREATE FUNCTION tenantry.open_session(p_allow_temporary boolean DEFAULT false)"
        " RETURNS void"
        " LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp"
        f" AS $tenantry${_OPEN_BODY}$tenantry$"
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
