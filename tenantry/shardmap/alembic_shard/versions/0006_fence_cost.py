"""The fence, cheaper: the same checks in fewer, cheaper steps (issue 17).

PostgreSQL only (a no-op on SQLite). ``tenantry.fence(tenant, signature)`` runs at the
start of every routed transaction; s0004's version cost the server about 50 µs of CPU
per transaction (``pg_stat_user_functions``, a fresh transaction each call), where the
old unsigned fence statement cost a few. Where it went, and what this revision does
instead, with the same result for every input:

- the signature's shape was checked with a regular expression
  (``'^[0-9]{1,9}:[0-9a-f]{64}$'``): PostgreSQL's regex engine builds its DFA states
  anew at every match, ~8-10 µs for 66 characters. Now: the position of the colon, the
  length, and ``ltrim`` of the allowed characters (the same strings pass; anything
  else is the same ``28000`` "a malformed fence signature");
- the HMAC was checked by a statement of its own after the key and residency read;
  now it is an output column of that read (one executor run, nothing more per
  transaction for the plpgsql expression);
- the check that the routing role cannot set the stamp read ``pg_roles`` (a view, a
  subquery, so a full executor run) on every call even though the first condition,
  ``has_sequence_privilege``, is false for every proper routing role: now the view is
  read only when that condition holds, and the privilege is checked on the stamp's
  oid (which the existence check found) instead of parsing its name again;
- the stamp, the tenant and the signature settings are set in one expression.

The stamp, the residency read, the read-only transaction of a frozen tenant, the
``SECURITY DEFINER`` with ``search_path = pg_catalog, pg_temp``, the errors and their
SQLSTATEs are s0004's. ``tenantry.fence_pooled`` (s0005) calls this function by name,
so it uses the new body too. The downgrade puts s0004's body back.

Also: ``tenantry.writable_tenant()`` (s0004) is ``SECURITY DEFINER`` but ran with the
caller's ``search_path``, and ``IS NOT DISTINCT FROM`` looks its ``=`` operator up
through it: a routing role allowed to create objects in any schema could put a
``=`` of its own first (``SET search_path = mine, pg_catalog``) and have it run as
the function's owner. It now runs with ``search_path = pg_catalog, pg_temp`` like the
fence (the downgrade resets it).
"""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.scripts import SHARD

revision = "s0006"
down_revision = "s0005"

_WRITABLE = "tenantry.writable_tenant()"

#: The stamp of the current transaction for p_tenant (an int8), as s0004 computes it.
_STAMP = (
    "pg_catalog.hashtextextended(p_tenant, (pg_catalog.date_part('epoch',"
    " pg_catalog.transaction_timestamp()) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8)"
)

_FENCE_BODY = """
DECLARE
  v_colon int4 := strpos(p_signature, ':');
  v_state text;
  v_valid boolean;
  v_stamp regclass;
  v_done text;
BEGIN
  -- '<key id: 1 to 9 digits>:<64 lowercase hex digits>', without a regular expression
  IF p_tenant IS NULL OR v_colon IS NULL OR v_colon < 2 OR v_colon > 10
     OR length(p_signature) <> v_colon + 64
     OR ltrim(left(p_signature, v_colon - 1), '0123456789') <> ''
     OR ltrim(substr(p_signature, v_colon + 1), '0123456789abcdef') <> '' THEN
    RAISE EXCEPTION 'tenantry: a malformed fence signature' USING ERRCODE = '28000';
  END IF;
  -- The key, the residency row and whether the signature verifies: one read.
  SELECT r.state,
         sha256(k.opad || sha256(k.ipad || convert_to(p_tenant, 'UTF8')
                                 || int4send(pg_backend_pid())))
           = decode(substr(p_signature, v_colon + 1), 'hex')
    INTO v_state, v_valid
    FROM tenantry.fence_keys k LEFT JOIN {residency} r ON r.tenant_id = p_tenant
   WHERE k.key_id = left(p_signature, v_colon - 1)::int4;
  IF v_valid IS NOT TRUE THEN
    RAISE EXCEPTION 'tenantry: the fence signature for tenant "%" does not verify here',
      p_tenant USING ERRCODE = '28000',
      HINT = 'the shard''s fence key was rotated: the router reads it again from the catalog';
  END IF;
  v_stamp := to_regclass('pg_temp.tenantry_transaction');
  IF v_stamp IS NULL THEN
    -- Dropped since the connection opened (DISCARD TEMP): make it again. The routing
    -- role was checked when the connection opened, and without TEMPORARY it cannot have
    -- made a stamp of its own.
    PERFORM tenantry.open_session(true);
  ELSIF has_sequence_privilege(session_user, v_stamp, 'UPDATE') THEN
    -- (a routing role that is the operations role, a superuser or BYPASSRLS is bound by
    -- no policy anyway: refused by the router unless explicitly allowed)
    IF session_user <> current_user
       AND NOT (SELECT o.rolsuper OR o.rolbypassrls FROM pg_roles o
                 WHERE o.rolname = session_user) THEN
      RAISE EXCEPTION 'tenantry: the routing role "%" may set the fence''s stamp', session_user
        USING ERRCODE = '42501';
    END IF;
  END IF;
  -- Assignments, not PERFORM: plpgsql evaluates them without starting an executor.
  v_done := set_config('tenantry.signature',
                       left(p_signature, v_colon)
                       || setval('pg_temp.tenantry_transaction', {stamp}, true), true)
            || set_config('tenantry.tenant_id', p_tenant, true);
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
""".replace("{stamp}", _STAMP)


def _s0004() -> object:
    """Shard revision s0004's module (its fence body, for the downgrade)."""
    return SHARD.revision_module("0004_fence.py")


def _replace_fence(body: str) -> None:
    residency = _s0004()._residency_table()  # type: ignore[attr-defined]
    op.execute(
        "CREATE OR REPLACE FUNCTION tenantry.fence(p_tenant text, p_signature text)"
        " RETURNS text"
        " LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp"
        f" AS $tenantry${body.replace('{residency}', residency)}$tenantry$"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _replace_fence(_FENCE_BODY)
    op.execute(f"ALTER FUNCTION {_WRITABLE} SET search_path = pg_catalog, pg_temp")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _replace_fence(_s0004()._FENCE_BODY)  # type: ignore[attr-defined]
    op.execute(f"ALTER FUNCTION {_WRITABLE} RESET search_path")
