"""Foreign keys a move must honour by itself (PostgreSQL).

Moves copy and clean with ``session_replication_role = replica`` and online moves
apply changes through logical replication: no foreign-key trigger fires for the rows a
move writes. So the mover checks, from ``pg_constraint``:

- **cross-tenant references**: a foreign key between tenant tables whose columns do
  not tie the child's tenant column to the parent's lets one tenant's row reference
  another tenant's. Any such pair of rows involving the moving tenant refuses the move
  (:func:`cross_tenant_problems`);
- **shared reference tables**: a foreign key from a tenant table to a table that does
  not move (``countries``) needs the referenced rows at the target
  (:func:`missing_references`), checked before freezing and again before the switch;
- **what a dropped database holds**: ``demote --drop-source`` drops a database only
  while no tenant table of any schema holds another tenant's row, or a row of the
  moving tenant left uncleaned (:func:`rows_left`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.moves.tables import APP_SCHEMAS_SQL, TenantTable, quoted_name
from tenantry.moves.verify import rendering_settings

__all__ = [
    "ForeignKey",
    "Key",
    "absent_keys",
    "check_references",
    "cross_tenant_problems",
    "describe_missing",
    "foreign_keys",
    "missing_references",
    "referenced_keys",
    "rows_left",
]

#: A key's values, as text.
Key = tuple[str, ...]

#: Keys of a shared reference table checked at the target per statement.
_BATCH = 5_000
#: Missing keys named in a refusal.
_SHOWN = 5


@dataclass(frozen=True, slots=True)
class ForeignKey:
    """A foreign key of a tenant table: ``child (columns) REFERENCES parent
    (parent_columns)``. ``parent`` is None when the referenced table does not move
    with the tenant; ``parent_sql`` is its schema-qualified, quoted name either way."""

    name: str
    child: TenantTable
    columns: tuple[str, ...]
    parent: TenantTable | None
    parent_sql: str
    parent_label: str
    parent_columns: tuple[str, ...]
    parent_types: tuple[str, ...]

    def ties(self, column: str) -> bool:
        """Whether the key pairs the child's tenant column with the parent's."""
        return (column, column) in zip(self.columns, self.parent_columns, strict=True)


_FOREIGN_KEYS = sa.text(
    """
    WITH moved AS (
        SELECT u.i, to_regclass(u.n) AS oid
          FROM unnest(CAST(:tables AS text[])) WITH ORDINALITY AS u(n, i))
    SELECT k.conname AS name, cm.i AS child, pm.i AS parent,
           quote_ident(pn.nspname) || '.' || quote_ident(p.relname) AS parent_sql,
           k.confrelid::regclass::text AS parent_label,
           ARRAY(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY AS c(n, o)
                   JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = c.n
                  ORDER BY c.o) AS columns,
           ARRAY(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY AS c(n, o)
                   JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = c.n
                  ORDER BY c.o) AS parent_columns,
           ARRAY(SELECT format_type(a.atttypid, a.atttypmod)
                   FROM unnest(k.confkey) WITH ORDINALITY AS c(n, o)
                   JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = c.n
                  ORDER BY c.o) AS parent_types
      FROM pg_constraint k
      JOIN moved cm ON cm.oid = k.conrelid
      JOIN pg_class p ON p.oid = k.confrelid
      JOIN pg_namespace pn ON pn.oid = p.relnamespace
      LEFT JOIN moved pm ON pm.oid = COALESCE(pg_partition_root(k.confrelid), k.confrelid)
     WHERE k.contype = 'f' AND k.conparentid = 0
     ORDER BY cm.i, k.conname
    """
)


def foreign_keys(conn: Connection, tables: Sequence[TenantTable]) -> list[ForeignKey]:
    """The foreign keys of *tables* (PostgreSQL; empty on SQLite), in table order."""
    if conn.dialect.name != "postgresql" or not tables:
        return []
    rows = conn.execute(_FOREIGN_KEYS, {"tables": [quoted_name(conn, t) for t in tables]})
    return [
        ForeignKey(
            name=row.name,
            child=tables[int(row.child) - 1],
            columns=tuple(row.columns),
            parent=None if row.parent is None else tables[int(row.parent) - 1],
            parent_sql=row.parent_sql,
            parent_label=row.parent_label,
            parent_columns=tuple(row.parent_columns),
            parent_types=tuple(row.parent_types),
        )
        for row in rows
    ]


def cross_tenant_problems(
    conn: Connection, tenant_id: str, tables: Sequence[TenantTable], column: str = "tenant_id"
) -> list[str]:
    """One line per foreign key between tenant tables, not tied by the tenant column,
    with rows that tie *tenant_id* to another tenant: another tenant's row referencing
    the tenant's, or the tenant's referencing another tenant's. One query per such key
    and direction (an index on the key makes it a lookup per row of the tenant)."""
    quote = conn.dialect.identifier_preparer.quote
    col = quote(column)
    found = []
    for key in foreign_keys(conn, tables):
        if key.parent is None or key.ties(column):
            continue
        on = " AND ".join(
            f"c.{quote(a)} = p.{quote(b)}"
            for a, b in zip(key.columns, key.parent_columns, strict=True)
        )
        base = f"FROM {quoted_name(conn, key.child)} c JOIN {key.parent_sql} p ON {on}"
        child, parent = key.child.qualified_name, key.parent.qualified_name
        for where, says in (
            (
                f"p.{col} = :t AND c.{col} IS DISTINCT FROM :t",
                "{other} row(s) of {child} reference its {parent} rows",
            ),
            (
                f"c.{col} = :t AND p.{col} IS DISTINCT FROM :t",
                "its {child} rows reference {other} row(s) of {parent}",
            ),
        ):
            hit = conn.execute(
                sa.text(
                    f"SELECT (CASE WHEN p.{col} = :t THEN c.{col} ELSE p.{col} END)::text "
                    f"{base} WHERE {where} LIMIT 1"
                ),
                {"t": tenant_id},
            ).first()
            if hit is not None:
                other = f"tenant {hit[0]!r}'s"
                found.append(
                    f"foreign key {key.name!r} of table {child!r} does not tie {column} "
                    f"to {column} and tenant {tenant_id!r} shares rows with another "
                    f"tenant through it ({says.format(other=other, child=child, parent=parent)}"
                    f"): a move would break the reference; make the key include {column} "
                    f"on both sides, e.g. FOREIGN KEY ({column}, ...) REFERENCES "
                    f"{parent} ({column}, ...), or fix those rows"
                )
                break
    return found


def missing_references(
    source: Connection,
    target: Connection,
    tenant_id: str,
    tables: Sequence[TenantTable],
    column: str = "tenant_id",
) -> list[str]:
    """One line per foreign key from a tenant table to a table that does not move
    whose rows, referenced by the tenant's rows at *source*, are missing at *target*
    (the first few keys named). Both PostgreSQL; runs in the connections' current
    transactions (snapshots, when the caller gives them)."""
    found, _ = check_references(source, target, tenant_id, tables, column)
    return found


def check_references(
    source: Connection,
    target: Connection,
    tenant_id: str,
    tables: Sequence[TenantTable],
    column: str = "tenant_id",
) -> tuple[list[str], list[tuple[ForeignKey, list[Key]]]]:
    """:func:`missing_references`, and the keys it checked, by foreign key (for a
    later check of the same keys and of the rows changed since)."""
    if source.dialect.name != "postgresql" or target.dialect.name != "postgresql":
        return [], []
    found = []
    checked = []
    for key in foreign_keys(source, tables):
        if key.parent is not None:
            continue
        keys = referenced_keys(source, tenant_id, key, column)
        checked.append((key, keys))
        missing = absent_keys(target, key, keys)
        if missing:
            found.append(describe_missing(tenant_id, key, missing))
    return found, checked


def referenced_keys(
    conn: Connection, tenant_id: str, key: ForeignKey, column: str = "tenant_id"
) -> list[Key]:
    """The distinct values (as text) of *key*'s columns in the tenant's rows, rows
    with a NULL among them aside (a foreign key does not check those)."""
    quote = conn.dialect.identifier_preparer.quote
    columns = ", ".join(f"{quote(c)}::text" for c in key.columns)
    present = " AND ".join(f"{quote(c)} IS NOT NULL" for c in key.columns)
    with rendering_settings(conn):
        return [
            tuple(str(v) for v in row)
            for row in conn.execute(
                sa.text(
                    f"SELECT DISTINCT {columns} FROM {quoted_name(conn, key.child)}"
                    f" WHERE {quote(column)} = :t AND {present}"
                ),
                {"t": tenant_id},
            )
        ]


def absent_keys(conn: Connection, key: ForeignKey, keys: Sequence[Key]) -> list[Key]:
    """The *keys* (text) that *key*'s referenced table lacks at *conn*, in order."""
    missing: list[Key] = []
    for start in range(0, len(keys), _BATCH):
        missing += _absent(conn, key, keys[start : start + _BATCH])
    return missing


def describe_missing(tenant_id: str, key: ForeignKey, missing: Sequence[Key]) -> str:
    """One line: which referenced rows the target lacks, the first few named."""
    shown = ", ".join("(" + ", ".join(k) + ")" if len(k) > 1 else k[0] for k in missing[:_SHOWN])
    more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
    return (
        f"table {key.parent_label!r} at the target lacks {len(missing)} row(s) that "
        f"tenant {tenant_id!r}'s {key.child.qualified_name} rows reference through "
        f"foreign key {key.name!r} ({', '.join(key.parent_columns)} = {shown}{more}): "
        "add them at the target first"
    )


def _absent(conn: Connection, key: ForeignKey, keys: Sequence[Key]) -> list[Key]:
    """The *keys* (text) that *key*'s referenced table at *conn* lacks."""
    quote = conn.dialect.identifier_preparer.quote
    slots = [f"k{i}" for i in range(len(key.parent_columns))]
    arrays = ", ".join(f"CAST(:{s} AS text[])" for s in slots)
    match = " AND ".join(
        f"r.{quote(c)} = CAST(k.{s} AS {t})"
        for c, s, t in zip(key.parent_columns, slots, key.parent_types, strict=True)
    )
    params = {s: [k[i] for k in keys] for i, s in enumerate(slots)}
    with rendering_settings(conn):
        rows = conn.execute(
            sa.text(
                f"SELECT {', '.join(f'k.{s}' for s in slots)}"
                f" FROM unnest({arrays}) WITH ORDINALITY AS k({', '.join(slots)}, n)"
                f" WHERE NOT EXISTS (SELECT 1 FROM {key.parent_sql} r WHERE {match})"
                " ORDER BY k.n"
            ),
            params,
        ).all()
    return [tuple(str(v) for v in row) for row in rows]


def rows_left(
    conn: Connection, tenant_id: str, column: str = "tenant_id", *, own: bool = True
) -> str | None:
    """What keeps a dedicated source database from being dropped: the first table with
    *column*, in any application schema (tenantry's own tables aside), that holds a
    row of another tenant or (with *own*) of *tenant_id*, a row the cleanup did not
    delete. None: there is none. PostgreSQL."""
    tables = conn.execute(
        sa.text(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
            "  c.oid::regclass::text"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = :column"
            "  AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
            "  AND c.relpersistence <> 't' AND c.relname NOT LIKE 'tenantry\\_%'"
            f" AND {APP_SCHEMAS_SQL}"
            " ORDER BY n.nspname, c.relname"
        ),
        {"column": column},
    ).all()
    col = conn.dialect.identifier_preparer.quote(column)
    for name, label in tables:
        other = conn.execute(
            sa.text(f"SELECT {col}::text FROM {name} WHERE {col} IS DISTINCT FROM :t LIMIT 1"),
            {"t": tenant_id},
        ).first()
        if other is not None:
            return f"table {label!r} holds rows of tenant {other[0]!r}"
        if (
            own
            and conn.execute(
                sa.text(f"SELECT 1 FROM {name} WHERE {col} = :t LIMIT 1"), {"t": tenant_id}
            ).first()
        ):
            return f"table {label!r} still holds rows of tenant {tenant_id!r}"
    return None
