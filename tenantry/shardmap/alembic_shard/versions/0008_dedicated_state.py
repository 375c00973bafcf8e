"""A dedicated database's residency state in its fence: no table read per transaction
(issue 19).

PostgreSQL only (a no-op on SQLite). With s0007's constant installed, the fence's one
remaining piece of work was reading the tenant's residency row, for its state
(``active``, ``frozen`` or ``incoming``: a ``moved`` tenant puts the stamp back). Alone,
that read was most of what the fence cost (on a fresh backend ~1 ms of the server's
CPU, on a warm one ~60 µs of its ~150); in a routed transaction, whose own first
statement then opens a relation first, the transaction costs the server ~0.27 ms less
on a new backend and ~25 µs less on a warm one. The state changes only when the
residency table does, and every change already runs ``tenantry.refresh_dedicated()``
in the same transaction (s0007's trigger), so the refresh now installs the state in
the fence as a constant too, beside the tenant: the fence returns it, and makes a
``frozen`` tenant's transaction read-only, without reading anything.

- ``tenantry.dedicated.installed_state``: the state installed (NULL: the stamp);
- ``tenantry.refresh_dedicated()`` installs the fence again when the state changes,
  and ``tenantry.tenant()`` only when the tenant or the database's name does (the
  planner inlines it into every policy's plan: replacing it invalidates them all).

Why a transaction sees the state a row read would show it: the freeze replaces the
fence in the transaction that writes ``frozen``. PostgreSQL sends the catalog change's
invalidation before that transaction's COMMIT returns, and every transaction takes the
invalidations sent before it began (``AtStart_Cache``), which makes PL/pgSQL compile
the new body: a transaction that begins after the freeze committed gets the frozen
fence, as its snapshot would have shown it the frozen row — what ``wait_out`` counts
on. And the fence is not what refuses a frozen tenant's writes: ``writable_tenant()``
still reads the residency row at every write, so a state the fence got wrong (a
trigger disabled by the table's owner) costs the client its early ``TenantFrozen``,
not a write.

The downgrade installs s0007's fence (with its row read) and drops the column.
"""

from __future__ import annotations

from types import ModuleType

from alembic import op

from tenantry.shardmap.scripts import SHARD

revision = "s0008"
down_revision = "s0007"

#: s0007's fence with the constant, changed: no residency read; format()'s %3$L is the
#: state, %4$s what a frozen tenant's fence adds (%1$L, %2$L: the name, the tenant).
_FENCE_CHANGES = (
    ("  v_state text;\n", ""),
    ("  SELECT r.state INTO v_state FROM {residency} r WHERE r.tenant_id = p_tenant;\n", ""),
    (
        """  v_done := set_config('tenantry.tenant_id', p_tenant, true)
            || set_config('tenantry.signature', 'dedicated', true);
  IF v_state = 'frozen' THEN
    v_done := set_config('transaction_read_only', 'on', true);
  END IF;
  RETURN v_state;""",
        """  -- The residency state, installed by tenantry.refresh_dedicated() (s0008).
  v_done := set_config('tenantry.tenant_id', p_tenant, true)
            || set_config('tenantry.signature', 'dedicated', true)%4$s;
  RETURN %3$L;""",
    ),
)

#: What a frozen tenant's fence adds to its settings.
_READ_ONLY = "\n            || set_config('transaction_read_only', 'on', true)"

#: s0007's refresh, changed: the state wanted and installed beside the tenant, the
#: fence installed again when either changes, tenant() only when the tenant or the
#: database's name does.
_REFRESH_CHANGES = (
    ("  v_in name;\n", "  v_in name;\n  v_installed_state text;\n  v_state text;\n"),
    (
        """  SELECT t.database_oid = v_oid, t.installed, t.installed_in
    INTO v_marked, v_installed, v_in FROM""",
        """  SELECT t.database_oid = v_oid, t.installed, t.installed_in, t.installed_state
    INTO v_marked, v_installed, v_in, v_installed_state FROM""",
    ),
    (
        "SELECT min(r.tenant_id), count(*) INTO v_want, v_count",
        "SELECT min(r.tenant_id), min(r.state), count(*) INTO v_want, v_state, v_count",
    ),
    ("      v_want := NULL;\n", "      v_want := NULL;\n      v_state := NULL;\n"),
    (
        "  IF v_want IS NOT DISTINCT FROM v_installed\n",
        "  IF v_want IS NOT DISTINCT FROM v_installed"
        " AND v_state IS NOT DISTINCT FROM v_installed_state\n",
    ),
    (
        """    EXECUTE format($q${constant_tenant}$q$, current_database(), v_want);
    EXECUTE format($q${constant_fence}$q$, current_database(), v_want);""",
        """    IF v_want IS DISTINCT FROM v_installed
       OR v_in IS DISTINCT FROM current_database() THEN
      EXECUTE format($q${constant_tenant}$q$, current_database(), v_want);
    END IF;
    EXECUTE format($q${constant_fence}$q$, current_database(), v_want, v_state,
                   CASE WHEN v_state = 'frozen' THEN $q${read_only}$q$ ELSE '' END);""",
    ),
    (
        "UPDATE tenantry.dedicated SET installed = v_want, installed_in = current_database()",
        "UPDATE tenantry.dedicated\n"
        "     SET installed = v_want, installed_state = v_state, installed_in = current_database()",
    ),
)


def _changed(body: str, changes: tuple[tuple[str, str], ...]) -> str:
    for old, new in changes:
        if old not in body:
            raise AssertionError(f"s0007 changed: update s0008 ({old.strip()[:40]!r})")
        body = body.replace(old, new)
    return body


def _s0007() -> ModuleType:
    return SHARD.revision_module("0007_dedicated_constant.py")


def refresh_body(residency: str) -> str:
    s0007 = _s0007()
    bodies = s0007._bodies(residency)
    fence = _changed(s0007._CONSTANT_FENCE_BODY, _FENCE_CHANGES)
    bodies["constant_fence"] = s0007._FENCE_HEAD + s0007._dollar(fence)
    bodies["read_only"] = _READ_ONLY
    body = _changed(s0007._REFRESH_BODY, _REFRESH_CHANGES).replace("{residency}", residency)
    for name, statement in bodies.items():
        if "$q$" in statement:
            raise AssertionError("a function body holds $q$")
        body = body.replace("{" + name + "}", statement)
    return body


def _replace_refresh(body: str) -> None:
    op.execute(
        "CREATE OR REPLACE FUNCTION tenantry.refresh_dedicated() RETURNS text"
        + _s0007()._DEFINER
        + _s0007()._dollar(body, "r")
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    residency = SHARD.revision_module("0004_fence.py")._residency_table()
    op.execute("ALTER TABLE tenantry.dedicated ADD COLUMN installed_state text")
    _replace_refresh(refresh_body(residency))
    # A database with the constant installed gets the fence with its state now.
    op.execute("SELECT tenantry.refresh_dedicated()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    residency = SHARD.revision_module("0004_fence.py")._residency_table()
    _replace_refresh(_s0007().refresh_body(residency))
    # s0007's refresh installs again only what changed: make it install its own fence.
    op.execute("UPDATE tenantry.dedicated SET installed_in = NULL WHERE installed IS NOT NULL")
    op.execute("SELECT tenantry.refresh_dedicated()")
    op.execute("ALTER TABLE tenantry.dedicated DROP COLUMN installed_state")
