"""A dedicated database's tenant as a constant: no stamp, no signature (issue 19).

PostgreSQL only (a no-op on SQLite). A dedicated database holds one tenant, so its
policies can compare ``tenant_id`` with that tenant as a constant: a new connection then
makes no stamp (a temporary sequence: about half of a new server session's cost) and
the fence verifies no signature. What it keeps:

- ``tenantry.dedicated`` (one row, readable by no other role) says whether tenantry
  marked this database dedicated (``database_oid``: the oid of the database it was
  marked in, so a copy made with ``CREATE DATABASE … TEMPLATE`` or restored is not
  marked), and which constant is installed (``installed``, ``installed_in``: the
  tenant and the database's name; NULL: the stamp);
- ``tenantry.mark_dedicated(boolean)``: tenantry's own call (at ``shard add``, ``shard
  create``, ``promote --server`` and every ``migrate upgrade``, from the catalog's tier)
  that marks or unmarks the database; no other role may execute it;
- ``tenantry.refresh_dedicated()``: installs the constant exactly while the database is
  marked and its residency rows name exactly one tenant that is not ``moved``;
  otherwise the stamp. A trigger on the residency table (``ENABLE ALWAYS``: it fires
  for logical replication's apply workers too) runs it after every change, in the same
  transaction: a second tenant arriving, a demote's switch (``moved``), an aborted
  promote (the row deleted) put the stamp back before they commit.

With the constant installed:

- ``tenantry.tenant()`` is ``SELECT CASE WHEN current_database() = '<name>' THEN
  '<tenant>' END``: inlined by the planner, no setting, no stamp. In a copy under
  another name it is NULL: the copy shows nothing;
- ``tenantry.fence(tenant, signature)`` returns NULL (not resident: a stale route) for
  any other tenant, refuses a renamed or copied database (SQLSTATE 55000, "run
  `tenantry migrate upgrade`"), reads the residency row, sets ``tenantry.tenant_id``
  (and ``tenantry.signature`` to ``dedicated``), makes a frozen tenant's
  transaction read-only, and — when the server allows prepared transactions — runs
  ``LISTEN``/``UNLISTEN`` so that PostgreSQL refuses ``PREPARE TRANSACTION`` in a routed
  transaction, as the stamp's temporary object makes it do;
- ``tenantry.open_session()`` checks the routing role as before and makes no stamp;
  routers do not call it there (their connect statement calls it only where
  ``tenantry.tenant()`` is NULL: ``tenantry.router.router.OPEN_SESSION``).

What gets weaker, and only there: any session of the routing role in a dedicated
database acts for its tenant without a fence (reads; writes while the tenant is
``active``). Other tenants' rows stay hidden, and writes of a frozen or moved tenant
stay refused (``writable_tenant()`` reads the residency).

With the stamp installed the functions are s0006's, but for one change to the fence: a
connection that has no stamp (opened while the constant was in place, or after
``DISCARD TEMP``) in a read-only transaction, where the stamp cannot be made, gets
SQLSTATE ``TY001``; the router then retries on a fresh connection, whose
``open_session`` makes the stamp. Before, that transaction failed with PostgreSQL's
"cannot execute CREATE SEQUENCE in a read-only transaction".

Shard revisions after this one that change ``tenantry.tenant()`` or ``tenantry.fence``
change both versions: the bodies live in ``refresh_dedicated``.
"""

from __future__ import annotations

from alembic import op

from tenantry.shardmap.scripts import SHARD

revision = "s0007"
down_revision = "s0006"


#: SQLSTATE of a routed connection without a stamp in a read-only transaction.
NO_STAMP = "TY001"

_FENCE_HEAD = (
    "CREATE OR REPLACE FUNCTION tenantry.fence(p_tenant text, p_signature text)"
    " RETURNS text LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
    " SET search_path = pg_catalog, pg_temp AS "
)
_TENANT_HEAD = "CREATE OR REPLACE FUNCTION tenantry.tenant() RETURNS pg_catalog.text "

#: The fence with the stamp: s0006's, and a clear error where the stamp cannot be made.
_MISSING_STAMP = """  IF v_stamp IS NULL THEN
    -- Dropped since the connection opened (DISCARD TEMP): make it again. The routing
    -- role was checked when the connection opened, and without TEMPORARY it cannot have
    -- made a stamp of its own.
    PERFORM tenantry.open_session(true);"""
_MISSING_STAMP_READ_ONLY = """  IF v_stamp IS NULL THEN
    -- Opened while this database's tenant was a constant (no stamp made), or the stamp
    -- was dropped since (DISCARD TEMP): make it. The routing role was checked when the
    -- connection opened, and without TEMPORARY it cannot have made a stamp of its own.
    -- A read-only transaction cannot make it: the router retries on a new connection.
    IF current_setting('transaction_read_only') = 'on' THEN
      RAISE EXCEPTION 'tenantry: this connection has no fence stamp, and a read-only '
        'transaction cannot make one' USING ERRCODE = '{code}',
        HINT = 'the router opens a new connection and retries';
    END IF;
    PERFORM tenantry.open_session(true);""".replace("{code}", NO_STAMP)

#: The fence with the constant (%L: the database's name, the tenant; format()).
_CONSTANT_FENCE_BODY = """
DECLARE
  v_state text;
  v_done text;
BEGIN
  IF current_database() <> %1$L THEN
    RAISE EXCEPTION 'tenantry: this database was renamed or copied since it was made dedicated'
      USING ERRCODE = '55000',
      HINT = 'run `tenantry migrate upgrade`: it marks the database again';
  END IF;
  IF p_tenant IS DISTINCT FROM %2$L THEN
    RETURN NULL;  -- not resident here: a stale route
  END IF;
  SELECT r.state INTO v_state FROM {residency} r WHERE r.tenant_id = p_tenant;
  IF current_setting('max_prepared_transactions') <> '0' THEN
    -- PostgreSQL refuses PREPARE TRANSACTION after LISTEN or UNLISTEN, as it does after
    -- the stamp's temporary object: no routed transaction can outlive a freeze.
    LISTEN tenantry_fence;
    UNLISTEN tenantry_fence;
  END IF;
  v_done := set_config('tenantry.tenant_id', p_tenant, true)
            || set_config('tenantry.signature', 'dedicated', true);
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;
END
"""

_OPEN_RETURN = """  CREATE SEQUENCE pg_temp.tenantry_transaction"""
_OPEN_CONSTANT = """  IF tenantry.tenant() IS NOT NULL THEN
    RETURN;  -- this database's tenant is a constant: no stamp (s0007)
  END IF;
  CREATE SEQUENCE pg_temp.tenantry_transaction"""

_REFRESH_BODY = """
DECLARE
  v_oid oid;
  v_marked boolean;
  v_installed text;
  v_in name;
  v_want text;
  v_count int8;
BEGIN
  SELECT d.oid INTO v_oid FROM pg_database d WHERE d.datname = current_database();
  SELECT t.database_oid = v_oid, t.installed, t.installed_in
    INTO v_marked, v_installed, v_in FROM tenantry.dedicated t WHERE t.id = 1;
  IF v_marked IS NOT TRUE AND v_installed IS NULL THEN
    RETURN NULL;  -- a shared database: nothing to do, and no lock taken
  END IF;
  -- One refresh at a time; then read again what the one before us left.
  LOCK TABLE tenantry.dedicated IN SHARE ROW EXCLUSIVE MODE;
  SELECT t.database_oid = v_oid, t.installed, t.installed_in
    INTO v_marked, v_installed, v_in FROM tenantry.dedicated t WHERE t.id = 1;
  IF v_marked THEN
    SELECT min(r.tenant_id), count(*) INTO v_want, v_count
      FROM {residency} r WHERE r.state <> 'moved';
    IF v_count <> 1 THEN
      v_want := NULL;
    END IF;
  END IF;
  IF v_want IS NOT DISTINCT FROM v_installed
     AND (v_want IS NULL OR v_in = current_database()) THEN
    RETURN v_want;
  END IF;
  IF v_want IS NULL THEN
    EXECUTE $q${stamp_tenant}$q$;
    EXECUTE $q${stamp_fence}$q$;
  ELSE
    EXECUTE format($q${constant_tenant}$q$, current_database(), v_want);
    EXECUTE format($q${constant_fence}$q$, current_database(), v_want);
  END IF;
  UPDATE tenantry.dedicated SET installed = v_want, installed_in = current_database()
   WHERE id = 1;
  RETURN v_want;
END
"""

_MARK_BODY = """
DECLARE
  v_oid oid;
  v_now oid;
BEGIN
  SELECT d.oid INTO v_oid FROM pg_database d WHERE d.datname = current_database();
  SELECT t.database_oid INTO v_now FROM tenantry.dedicated t WHERE t.id = 1;
  IF (v_now IS NOT DISTINCT FROM v_oid) IS DISTINCT FROM p_dedicated THEN
    -- Wait for residency writers in flight, and hold new ones until we commit: the
    -- refresh below then counts every tenant, and theirs sees the mark.
    LOCK TABLE {residency} IN SHARE MODE;
    UPDATE tenantry.dedicated SET database_oid = CASE WHEN p_dedicated THEN v_oid END
     WHERE id = 1;
  END IF;
  RETURN tenantry.refresh_dedicated();
END
"""

_TRIGGER_BODY = """
BEGIN
  PERFORM tenantry.refresh_dedicated();
  RETURN NULL;
END
"""

_DEFINER = " LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS "


def _dollar(body: str, tag: str = "b") -> str:
    if f"${tag}$" in body:
        raise AssertionError(f"a function body holds ${tag}$")
    return f"${tag}${body}${tag}$"


def _bodies(residency: str) -> dict[str, str]:
    """The four CREATE OR REPLACE statements refresh_dedicated runs."""
    s0004 = SHARD.revision_module("0004_fence.py")
    s0006 = SHARD.revision_module("0006_fence_cost.py")
    stamp_fence = s0006._FENCE_BODY.replace("{residency}", residency)
    if _MISSING_STAMP not in stamp_fence:
        raise AssertionError("s0006's fence body changed: update s0007")
    stamp_fence = stamp_fence.replace(_MISSING_STAMP, _MISSING_STAMP_READ_ONLY)
    constant_tenant = (
        "SELECT CASE WHEN pg_catalog.current_database()"
        " OPERATOR(pg_catalog.=) %1$L::pg_catalog.name THEN %2$L::pg_catalog.text END"
    )
    return {
        "stamp_tenant": _TENANT_HEAD
        + "LANGUAGE plpgsql STABLE PARALLEL RESTRICTED AS "
        + _dollar(s0004._TENANT_BODY),
        "stamp_fence": _FENCE_HEAD + _dollar(stamp_fence),
        # format(): every other % doubled (there is none in these two bodies).
        "constant_tenant": _TENANT_HEAD
        + "LANGUAGE sql STABLE PARALLEL SAFE AS "
        + _dollar(constant_tenant),
        "constant_fence": _FENCE_HEAD
        + _dollar(_CONSTANT_FENCE_BODY.replace("{residency}", residency)),
    }


def refresh_body(residency: str) -> str:
    body = _REFRESH_BODY.replace("{residency}", residency)
    for name, statement in _bodies(residency).items():
        if "$q$" in statement:
            raise AssertionError("a function body holds $q$")
        body = body.replace("{" + name + "}", statement)
    return body


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    s0004 = SHARD.revision_module("0004_fence.py")
    residency = s0004._residency_table()
    op.execute(
        "CREATE TABLE tenantry.dedicated ("
        " id integer PRIMARY KEY CHECK (id = 1),"
        " database_oid oid,"
        " installed text,"
        " installed_in name)"
    )
    op.execute("REVOKE ALL ON tenantry.dedicated FROM PUBLIC")
    op.execute("INSERT INTO tenantry.dedicated (id) VALUES (1)")
    op.execute(
        "CREATE FUNCTION tenantry.refresh_dedicated() RETURNS text"
        + _DEFINER
        + _dollar(refresh_body(residency), "r")
    )
    op.execute(
        "CREATE FUNCTION tenantry.mark_dedicated(p_dedicated boolean) RETURNS text"
        + _DEFINER
        + _dollar(_MARK_BODY.replace("{residency}", residency), "r")
    )
    op.execute(
        "CREATE FUNCTION tenantry.residency_changed() RETURNS trigger"
        + _DEFINER
        + _dollar(_TRIGGER_BODY, "r")
    )
    for function in (
        "tenantry.refresh_dedicated()",
        "tenantry.mark_dedicated(boolean)",
        "tenantry.residency_changed()",
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    op.execute(
        "CREATE TRIGGER tenantry_dedicated AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
        f" ON {residency} FOR EACH STATEMENT EXECUTE FUNCTION tenantry.residency_changed()"
    )
    op.execute(f"ALTER TABLE {residency} ENABLE ALWAYS TRIGGER tenantry_dedicated")
    _replace_open(s0004._OPEN_BODY.replace(_OPEN_RETURN, _OPEN_CONSTANT))
    # The fence without a stamp in a read-only transaction: the new body from now on.
    op.execute(_bodies(residency)["stamp_fence"])


def _replace_open(body: str) -> None:
    if _OPEN_RETURN not in body:
        raise AssertionError("s0004's open_session body changed: update s0007")
    op.execute(
        "CREATE OR REPLACE FUNCTION tenantry.open_session(p_allow_temporary boolean DEFAULT false)"
        " RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS " + _dollar(body)
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    s0004 = SHARD.revision_module("0004_fence.py")
    residency = s0004._residency_table()
    bodies = _bodies(residency)
    op.execute(f"DROP TRIGGER tenantry_dedicated ON {residency}")
    op.execute(bodies["stamp_tenant"])
    s0006 = SHARD.revision_module("0006_fence_cost.py")
    op.execute(_FENCE_HEAD + _dollar(s0006._FENCE_BODY.replace("{residency}", residency)))
    _replace_open(s0004._OPEN_BODY)
    op.execute("DROP FUNCTION tenantry.mark_dedicated(boolean)")
    op.execute("DROP FUNCTION tenantry.residency_changed()")
    op.execute("DROP FUNCTION tenantry.refresh_dedicated()")
    op.execute("DROP TABLE tenantry.dedicated")
