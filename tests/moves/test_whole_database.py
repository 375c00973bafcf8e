"""A move sees the whole database.

Tenant tables of every application schema move; a table that does not move may not
reference a tenant table; rows tied to another tenant's through a foreign key, and
shared reference rows missing at the target, refuse the move before anything is
frozen (or roll it back when found at verification); ``demote --drop-source`` keeps a
database that holds another tenant's rows. Each outcome is a correct move or a
refusal that changed nothing, checked by every tenant table's rows (in every schema)
of the moving tenant and of its neighbour, at both ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from movefleet import AtCheckpoint, Fleet, build_fleet, drop_replication, residency, seed

from tenantry import moves
from tenantry.errors import MoveError, MoveRefused, SchemaContractError, VerificationFailed
from tenantry.moves.removal import remove_tenant
from tenantry.rebalance.sizes import measure_sizes

Sums = dict[str, tuple[int, str | None]]

#: A tenant table in another schema, with foreign keys across schemas both ways.
BILLING = [
    "CREATE SCHEMA billing",
    "CREATE TABLE billing.invoices (tenant_id varchar(63), id int, user_id int,"
    " amount numeric(10, 2), PRIMARY KEY (tenant_id, id),"
    " FOREIGN KEY (tenant_id, user_id) REFERENCES public.users (tenant_id, id))",
    "CREATE TABLE public.invoice_lines (tenant_id varchar(63), id serial, invoice_id int,"
    " text text, PRIMARY KEY (tenant_id, id), FOREIGN KEY (tenant_id, invoice_id)"
    " REFERENCES billing.invoices (tenant_id, id) ON DELETE CASCADE)",
]

#: Shared reference data: a table without the tenant column that tenant rows reference.
COUNTRIES = [
    "CREATE TABLE countries (code char(2) PRIMARY KEY, name text)",
    "CREATE SCHEMA billing",
    "CREATE TABLE billing.addresses (tenant_id varchar(63), id int, country char(2)"
    " REFERENCES countries (code), PRIMARY KEY (tenant_id, id))",
]


@pytest.fixture
def fleet(make_pg_database) -> Iterator[Fleet]:
    """s1 (server 0) with tenants acme and neighbor, s2 (server 1) with other; d1, an
    empty dedicated shard on server 1."""
    built = build_fleet(
        make_pg_database(0),
        [
            ("s1", make_pg_database(0), "shared"),
            ("s2", make_pg_database(1), "shared"),
            ("d1", make_pg_database(1), "dedicated"),
        ],
    )
    for tenant, shard in (("acme", "s1"), ("neighbor", "s1"), ("other", "s2")):
        built.catalog.add_tenant(tenant, shard=shard)
        engine = built.engine(shard)
        seed(engine, tenant, sessions=10)
        engine.dispose()
    try:
        yield built
    finally:
        drop_replication(built)
        built.close()


def execute(fleet: Fleet, shard: str, *statements: str, replica: bool = False) -> None:
    engine = fleet.engine(shard)
    with engine.begin() as conn:
        if replica:  # as a move or an apply worker writes: no foreign-key triggers
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(sa.text(statement))
    engine.dispose()


def everywhere(fleet: Fleet, *statements: str) -> None:
    """DDL on every shard: the fleet's schema stays one."""
    for shard in fleet.urls:
        execute(fleet, shard, *statements)


def checksums(fleet: Fleet, shard: str, tenant: str) -> Sums:
    """Count and md5 of the tenant's rows in every table with tenant_id, every schema
    (tenantry's own tables aside)."""
    engine = fleet.engine(shard)
    found: Sums = {}
    with engine.connect() as conn:
        conn.exec_driver_sql("SET TimeZone = 'UTC'")
        names = conn.execute(
            sa.text(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'"
                " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
                "  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenantry')"
                "  AND c.relname NOT LIKE 'tenantry%' ORDER BY 1"
            )
        ).scalars()
        for name in names:
            count, digest = conn.execute(
                sa.text(
                    f"SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text))"
                    f" FROM {name} t WHERE tenant_id = :t"
                ),
                {"t": tenant},
            ).one()
            found[name] = (int(count), digest)
    engine.dispose()
    return found


def state(fleet: Fleet, tenants: tuple[str, ...] = ("acme", "neighbor")) -> dict[str, Sums]:
    """Every tenant's rows on every shard."""
    return {
        f"{shard}/{tenant}": checksums(fleet, shard, tenant)
        for shard in fleet.urls
        for tenant in tenants
    }


def rows_of(sums: Sums) -> int:
    return sum(count for count, _ in sums.values())


def assert_unchanged(fleet: Fleet, before: dict[str, Sums]) -> None:
    """A refusal: nothing frozen, nothing copied or deleted, no live move."""
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    engine = fleet.engine("s1")
    assert residency(engine, "acme") == "active"
    engine.dispose()
    assert state(fleet) == before
    assert not moves.list_moves(fleet.catalog, live=True)


def assert_moved(fleet: Fleet, before: dict[str, Sums], *, to: str) -> None:
    """acme's rows of every table are at *to* exactly as they were at s1, none remain at
    s1; neighbor's are untouched."""
    after = state(fleet)
    assert fleet.catalog.get_tenant("acme").shard == to
    assert after[f"{to}/acme"] == before["s1/acme"]
    assert rows_of(after["s1/acme"]) == 0
    assert after["s1/neighbor"] == before["s1/neighbor"]
    assert after[f"{to}/neighbor"] == before[f"{to}/neighbor"]
    assert not moves.list_moves(fleet.catalog, live=True)


# -- tenant tables of every schema move -----------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_tenant_tables_of_another_schema_move_with_their_rows(fleet: Fleet, mode: str) -> None:
    everywhere(fleet, *BILLING)
    for tenant in ("acme", "neighbor"):
        execute(
            fleet,
            "s1",
            f"INSERT INTO billing.invoices VALUES ('{tenant}', 1, 1, 10.50),"
            f" ('{tenant}', 2, 2, 99.99), ('{tenant}', 3, 1, 0)",
            f"INSERT INTO invoice_lines (tenant_id, invoice_id, text) VALUES"
            f" ('{tenant}', 1, 'a'), ('{tenant}', 1, 'b'), ('{tenant}', 3, 'c')",
        )
    before = state(fleet)
    assert before["s1/acme"]["billing.invoices"][0] == 3
    assert before["s1/acme"]["public.invoice_lines"][0] == 3

    def write_after_the_cut() -> None:
        # online: rows of both schemas change after the cut, found by the tail
        execute(
            fleet,
            "s1",
            "UPDATE billing.invoices SET amount = 1.25 WHERE tenant_id = 'acme' AND id = 2",
            "INSERT INTO invoice_lines (tenant_id, invoice_id, text) VALUES ('acme', 2, 'x')",
        )
        before["s1/acme"] = checksums(fleet, "s1", "acme")

    hooks = AtCheckpoint("online-cut", write_after_the_cut)
    done = moves.move(fleet.catalog, "acme", "s2", mode=mode, hooks=hooks)

    assert done.succeeded and done.mode.value == mode
    assert hooks.ran == (mode == "online")
    if mode == "online":
        assert done.stats["tail_rows"] == 2
    assert_moved(fleet, before, to="s2")
    assert done.stats["verified"]["billing.invoices"]["rows"] == 3
    assert done.stats["verified"]["invoice_lines"]["rows"] == 3  # online: at the cut
    # the target's sequence of the serial key went past the copied ids
    engine = fleet.engine("s2")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO invoice_lines (tenant_id, invoice_id, text) VALUES ('acme', 2, 'd')"
            )
        )
    engine.dispose()


# -- foreign keys from tables that do not move ----------------------------------------------

REFUSED = {
    "non-tenant-table-in-another-schema": (
        [
            "CREATE SCHEMA notes",
            "CREATE TABLE notes.user_notes (id int PRIMARY KEY, tenant varchar(63),"
            " user_id int, CONSTRAINT notes_user FOREIGN KEY (tenant, user_id)"
            " REFERENCES public.users (tenant_id, id) ON DELETE CASCADE)",
        ],
        "INSERT INTO notes.user_notes VALUES (1, 'acme', 1), (2, 'acme', 2)",
        ("notes.user_notes", "notes_user"),
    ),
    "other-tenants-row-references-the-tenants": (
        [
            "CREATE TABLE referrals (tenant_id varchar(63), id int, by_tenant varchar(63),"
            " by_user int, PRIMARY KEY (tenant_id, id), CONSTRAINT referred_by"
            " FOREIGN KEY (by_tenant, by_user) REFERENCES users (tenant_id, id))",
        ],
        "INSERT INTO referrals VALUES ('neighbor', 1, 'acme', 2)",
        ("referrals", "referred_by", "neighbor"),
    ),
    "the-tenants-row-references-another-tenants": (
        [
            "CREATE SCHEMA growth",
            "CREATE TABLE growth.referrals (tenant_id varchar(63), id int,"
            " by_tenant varchar(63), by_user int, PRIMARY KEY (tenant_id, id),"
            " CONSTRAINT referred_by FOREIGN KEY (by_tenant, by_user)"
            " REFERENCES users (tenant_id, id))",
        ],
        "INSERT INTO growth.referrals VALUES ('acme', 1, 'acme', 1), ('acme', 2, 'neighbor', 3)",
        ("growth.referrals", "referred_by", "neighbor"),
    ),
}


@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_a_move_that_would_break_a_foreign_key_is_refused_before_anything_changes(
    fleet: Fleet, case: str, mode: str
) -> None:
    ddl, rows_sql, named = REFUSED[case]
    everywhere(fleet, *ddl)
    execute(fleet, "s1", rows_sql)
    before = state(fleet)

    with pytest.raises((SchemaContractError, MoveRefused)) as refused:
        moves.move(fleet.catalog, "acme", "s2", mode=mode)

    message = str(refused.value)
    assert all(word in message for word in named), message
    assert "\n" not in message
    assert_unchanged(fleet, before)
    assert not moves.list_moves(fleet.catalog)  # refused at plan time: nothing recorded


def test_a_foreign_key_that_does_not_tie_tenants_moves_when_the_rows_stay_within_one(
    fleet: Fleet,
) -> None:
    everywhere(fleet, *REFUSED["the-tenants-row-references-another-tenants"][0])
    execute(
        fleet,
        "s1",
        "INSERT INTO growth.referrals VALUES ('acme', 1, 'acme', 1), ('acme', 2, 'acme', 3),"
        " ('neighbor', 1, 'neighbor', 2), ('neighbor', 2, NULL, NULL)",
    )
    before = state(fleet)
    assert before["s1/acme"]["growth.referrals"][0] == 2

    done = moves.move(fleet.catalog, "acme", "s2", mode="offline")

    assert done.succeeded
    assert_moved(fleet, before, to="s2")


# -- shared reference tables ------------------------------------------------------------------


def _with_countries(fleet: Fleet) -> None:
    everywhere(fleet, *COUNTRIES)
    execute(
        fleet,
        "s1",
        "INSERT INTO countries VALUES ('FR', 'France'), ('DE', 'Germany'),"
        " ('NO', 'Norway'), ('IT', 'Italy')",
    )
    execute(fleet, "s2", "INSERT INTO countries VALUES ('FR', 'France'), ('NO', 'Norway')")
    execute(
        fleet,
        "s1",
        "INSERT INTO billing.addresses VALUES ('acme', 1, 'FR'), ('acme', 2, 'DE'),"
        " ('acme', 3, 'DE'), ('acme', 4, NULL), ('neighbor', 1, 'IT')",
    )


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_reference_rows_missing_at_the_target_refuse_the_move(fleet: Fleet, mode: str) -> None:
    _with_countries(fleet)
    before = state(fleet)

    with pytest.raises(MoveRefused) as refused:
        moves.move(fleet.catalog, "acme", "s2", mode=mode)

    message = str(refused.value)
    assert "'countries'" in message and "DE" in message and "billing.addresses" in message
    assert "IT" not in message and "FR" not in message  # the neighbour's, the target's
    assert "\n" not in message
    assert_unchanged(fleet, before)
    assert not moves.list_moves(fleet.catalog)

    # once the target has them, the move goes through
    execute(fleet, "s2", "INSERT INTO countries VALUES ('DE', 'Germany')")
    assert moves.move(fleet.catalog, "acme", "s2", mode=mode).succeeded
    assert_moved(fleet, before, to="s2")


@pytest.mark.parametrize(
    ("mode", "checkpoint"), [("offline", "verified"), ("online", "online-synced")]
)
def test_a_reference_row_deleted_at_the_target_during_the_move_rolls_it_back(
    fleet: Fleet, mode: str, checkpoint: str
) -> None:
    _with_countries(fleet)
    execute(fleet, "s2", "INSERT INTO countries VALUES ('DE', 'Germany')")
    before = state(fleet)

    def delete() -> None:
        # after the precheck: as a replicated or trigger-less delete would
        execute(fleet, "s2", "DELETE FROM countries WHERE code = 'DE'", replica=True)

    with pytest.raises(VerificationFailed) as failed:
        moves.move(fleet.catalog, "acme", "s2", mode=mode, hooks=AtCheckpoint(checkpoint, delete))

    message = str(failed.value)
    assert "'countries'" in message and "DE" in message and "\n" not in message
    (move,) = moves.list_moves(fleet.catalog)
    assert move.state.value == "aborted" and "countries" in (move.error or "")
    # rolled back: acme whole at s1 and active, nothing of it left at s2
    assert_unchanged(fleet, before)


# -- demote --drop-source ----------------------------------------------------------------------


@pytest.fixture
def dedicated(fleet: Fleet) -> Fleet:
    """acme promoted to d1, with a billing schema everywhere."""
    everywhere(fleet, *BILLING)
    execute(fleet, "s1", "INSERT INTO billing.invoices VALUES ('acme', 1, 1, 5), ('acme', 2, 3, 7)")
    assert moves.promote(fleet.catalog, "acme", to="d1", mode="offline").succeeded
    return fleet


def test_drop_source_refuses_while_another_tenants_row_is_in_a_second_schema(
    dedicated: Fleet,
) -> None:
    fleet = dedicated
    execute(fleet, "d1", "INSERT INTO billing.invoices VALUES ('stranger', 1, NULL, 1)")
    before = state(fleet, ("acme", "stranger"))

    with pytest.raises(MoveRefused) as refused:
        moves.demote(fleet.catalog, "acme", to="s1", drop_source=True, mode="offline")

    message = str(refused.value)
    assert "billing.invoices" in message and "'stranger'" in message and "\n" not in message
    assert fleet.catalog.get_tenant("acme").shard == "d1"
    assert fleet.catalog.get_shard("d1").state.value == "active"
    assert state(fleet, ("acme", "stranger")) == before
    assert not moves.list_moves(fleet.catalog, live=True)


def test_drop_source_checks_again_before_the_drop(dedicated: Fleet) -> None:
    """A row that arrives after the plan keeps the database: the move stops before the
    drop, and a resume drops it once the row is gone."""
    fleet = dedicated
    before = state(fleet, ("acme", "stranger"))

    def stranger() -> None:
        execute(fleet, "d1", "INSERT INTO billing.invoices VALUES ('stranger', 1, NULL, 1)")

    with pytest.raises(MoveError, match=r"billing\.invoices.*'stranger'.*moves resume") as stopped:
        moves.demote(
            fleet.catalog,
            "acme",
            to="s1",
            drop_source=True,
            mode="offline",
            hooks=AtCheckpoint("cleaned", stranger),
        )
    assert not isinstance(stopped.value, MoveRefused)  # the move switched already
    (live,) = moves.list_moves(fleet.catalog, live=True)
    assert f"moves resume {live.id}" in str(stopped.value)
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    assert checksums(fleet, "d1", "stranger")["billing.invoices"][0] == 1  # not dropped
    assert checksums(fleet, "s1", "acme") == before["d1/acme"]

    execute(fleet, "d1", "DELETE FROM billing.invoices WHERE tenant_id = 'stranger'")
    (done,) = moves.resume(fleet.catalog, live.id)
    assert done.succeeded
    assert "d1" not in {s.name for s in fleet.catalog.list_shards()}
    assert checksums(fleet, "s1", "acme") == before["d1/acme"]


AFTER_THE_CUT = {
    # a reference row the tenant uses, deleted at the target once the cut was verified
    "deleted-at-the-target": ("s2", "DELETE FROM countries WHERE code = 'DE'", "DE"),
    # a row written after the cut that references a row the target never had
    "new-reference-at-the-source": (
        "s1",
        "INSERT INTO countries VALUES ('SE', 'Sweden');"
        " INSERT INTO billing.addresses VALUES ('acme', 9, 'SE')",
        "SE",
    ),
}


@pytest.mark.parametrize("case", list(AFTER_THE_CUT))
def test_the_final_freeze_checks_the_references_again(fleet: Fleet, case: str) -> None:
    shard, statements, code = AFTER_THE_CUT[case]
    _with_countries(fleet)
    execute(fleet, "s2", "INSERT INTO countries VALUES ('DE', 'Germany')")
    before = state(fleet)

    def change() -> None:
        execute(fleet, shard, *statements.split("; "), replica=True)

    with pytest.raises(VerificationFailed) as failed:
        moves.move(
            fleet.catalog,
            "acme",
            "s2",
            mode="online",
            max_freeze=10.0,
            hooks=AtCheckpoint("online-cut", change),
        )

    message = str(failed.value)
    assert "'countries'" in message and code in message and "\n" not in message
    (move,) = moves.list_moves(fleet.catalog)
    assert move.state.value == "aborted"
    assert "verified" in move.stats  # the cut itself was verified: the freeze caught it
    after = state(fleet)
    assert fleet.catalog.get_tenant("acme").shard == "s1"
    assert rows_of(after["s2/acme"]) == 0
    assert after["s1/neighbor"] == before["s1/neighbor"]
    # acme whole at s1: as before, plus the row written after the cut
    written = 1 if shard == "s1" else 0
    assert after["s1/acme"].pop("billing.addresses")[0] == 4 + written
    assert after["s1/acme"] == {
        k: v for k, v in before["s1/acme"].items() if k != "billing.addresses"
    }
    engine = fleet.engine("s1")
    assert residency(engine, "acme") == "active"
    engine.dispose()


# -- the same tables for sizes and tenant removal ----------------------------------------------


def test_sizes_and_purge_see_every_schema(fleet: Fleet) -> None:
    everywhere(fleet, *BILLING)
    execute(
        fleet,
        "s1",
        "INSERT INTO billing.invoices VALUES ('acme', 1, 1, 5), ('acme', 2, 3, 7),"
        " ('neighbor', 1, 1, 1)",
    )
    before = state(fleet)
    sizes = measure_sizes(fleet.catalog, shards=["s1"])
    assert sizes["acme"].rows == rows_of(before["s1/acme"]) == 5 + 4 + 10 + 2

    done = remove_tenant(fleet.catalog, "acme", rows="purge")

    assert done.rows["billing.invoices"] == done.deleted["billing.invoices"] == 2
    assert done.rows["users"] == 5
    assert rows_of(checksums(fleet, "s1", "acme")) == 0
    assert checksums(fleet, "s1", "neighbor") == before["s1/neighbor"]
