"""Which tables move: every table with the tenant column, parents before children.

The mover needs no application code: :func:`tenant_tables` reflects the database
(PostgreSQL catalogs or SQLite pragmas) and returns the tenant tables in foreign-key
order, refusing a table that breaks the schema contract of DESIGN.md before anything
is frozen.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import Connection

from tenantry.errors import SchemaContractError

__all__ = [
    "TenantTable",
    "analyze_tables",
    "check_same_tables",
    "check_whole_database",
    "quoted_name",
    "table_shapes",
    "tenant_tables",
    "unindexed_foreign_keys",
]

#: tenantry's own tables (residency, catalog) never move with a tenant.
_OWN_PREFIX = "tenantry_"
_WITHOUT_ROWID = re.compile(r"\)\s*WITHOUT\s+ROWID\s*[;,]?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TenantTable:
    """One table of tenant rows, as reflected from a database.

    ``columns`` are the copyable columns in table order (generated columns are left
    out: the target computes them); ``column_types`` gives each one's type as the
    database spells it (PostgreSQL ``format_type``, SQLite the declared type);
    ``sequences`` pairs a serial or identity column with its schema-qualified
    sequence (PostgreSQL only). ``schema`` is None for the connection's default
    schema.
    """

    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    sequences: tuple[tuple[str, str], ...] = ()
    column_types: tuple[str, ...] = ()
    schema: str | None = None
    #: SQLite only: a ``WITHOUT ROWID`` table (batched deletes go by primary key).
    without_rowid: bool = False

    @property
    def qualified_name(self) -> str:
        """``schema.name``, or the bare name in the default schema (for messages)."""
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def column_type(self, column: str) -> str | None:
        """The type of *column*, or None if it is not a copyable column."""
        try:
            return self.column_types[self.columns.index(column)]
        except (ValueError, IndexError):
            return None


@dataclass(slots=True)
class _Reflected:
    name: str
    schema: str | None = None  # None: the connection's default schema
    columns: list[tuple[str, str]] = field(default_factory=list)  # copyable: (name, type)
    all_columns: set[str] = field(default_factory=set)  # generated ones too
    primary_key: list[str] = field(default_factory=list)
    sequences: list[tuple[str, str]] = field(default_factory=list)
    #: tables it references (qualified as :attr:`TenantTable.qualified_name`) -> the
    #: name of the first foreign key that does ("" where the database names none)
    parents: dict[str, str] = field(default_factory=dict)
    without_rowid: bool = False
    #: in a schema that moves (PostgreSQL: see *schemas* of :func:`tenant_tables`)
    movable: bool = True


def tenant_tables(
    conn: Connection,
    *,
    column: str = "tenant_id",
    schema: str | None = None,
    schemas: Iterable[str] | None = None,
) -> list[TenantTable]:
    """The tables holding tenant rows, parents before children by their foreign keys.

    Every table that has *column* is taken, except tenantry's own ``tenantry_*``
    tables. On PostgreSQL the tables of every application schema are taken: all but
    ``pg_catalog``, ``information_schema``, ``pg_toast*``, ``pg_temp*`` and tenantry's
    own schema ``tenantry``; *schemas*, when not empty, limits them to those schemas and
    the connection's default one (the ``move_schemas`` setting). Tables of the default
    schema (``current_schema()``) have ``schema=None``, the others carry theirs. With
    *schema*, only that schema is reflected and every table carries it. SQLite is one
    schema (*schema* names an attached database).

    The order is topological over qualified names (a foreign key between schemas
    orders too): among the tables whose parents are all placed, the first by qualified
    name goes next, so the order is deterministic. Self-references are ignored. The
    tables of a foreign-key cycle stay together, after all their parents and before
    all their children, the one with the fewest unplaced parents first (ties by name);
    a copy of a cycle relies on deferred constraint checks (SQLite always, PostgreSQL
    for ``DEFERRABLE`` keys).

    Raises :class:`SchemaContractError` for a table whose primary key lacks *column*
    (or that has no primary key), and for a table that does not move (no *column*, or
    in a schema *schemas* leaves out) whose foreign key references a tenant table: its
    rows would be left behind by a move.
    """
    if conn.dialect.name == "postgresql":
        reflected = _reflect_postgresql(conn, schema, schemas)
    elif conn.dialect.name == "sqlite":
        reflected = _reflect_sqlite(conn, schema)
    else:
        raise NotImplementedError(f"tenant moves do not support {conn.dialect.name!r}")
    tenant = {
        key: table
        for key, table in reflected.items()
        if column in table.all_columns and not table.name.startswith(_OWN_PREFIX) and table.movable
    }
    _check_keys(tenant, column)
    _check_left_behind(reflected, tenant, column)
    return [
        TenantTable(
            name=tenant[key].name,
            columns=tuple(c for c, _ in tenant[key].columns),
            primary_key=tuple(tenant[key].primary_key),
            sequences=tuple(tenant[key].sequences),
            column_types=tuple(t for _, t in tenant[key].columns),
            schema=tenant[key].schema,
            without_rowid=tenant[key].without_rowid,
        )
        for key in _parents_first({k: set(t.parents) & set(tenant) for k, t in tenant.items()})
    ]


def _check_keys(tenant: Mapping[str, _Reflected], column: str) -> None:
    """Every tenant table's primary key includes *column* (SchemaContractError)."""
    for key in sorted(tenant):
        table = tenant[key]
        if not table.primary_key:
            raise SchemaContractError(
                key,
                f"it has a {column} column but no primary key: add one that includes "
                f"{column}, e.g. PRIMARY KEY ({column}, id)",
            )
        if column not in table.primary_key:
            raise SchemaContractError(
                key,
                f"its primary key ({', '.join(table.primary_key)}) does not include "
                f"{column}, so the tenant's rows cannot be copied and verified by key: "
                f"make {column} part of the primary key, e.g. PRIMARY KEY "
                f"({column}, {', '.join(c for c in table.primary_key if c != column)})",
            )


def _check_left_behind(
    reflected: Mapping[str, _Reflected], tenant: Mapping[str, _Reflected], column: str
) -> None:
    """No table that does not move references a tenant table (SchemaContractError)."""
    for key in sorted(set(reflected) - set(tenant)):
        table = reflected[key]
        if table.name.startswith(_OWN_PREFIX):
            continue
        referenced = sorted(set(table.parents) & set(tenant))
        if not referenced:
            continue
        constraint = table.parents[referenced[0]]
        named = f"its foreign key {constraint!r}" if constraint else "it"
        if column in table.all_columns:
            fix = (
                f"add schema {table.schema!r} to TENANTRY_MOVE_SCHEMAS, or drop the key"
                if not table.movable
                else "drop the key"
            )
            why = "its schema does not move"
        else:
            fix = f"add {column} to it (and to its primary key), or drop the key"
            why = f"it has no {column} column"
        raise SchemaContractError(
            key,
            f"{named} references tenant table {referenced[0]!r} but {why}, so a move "
            "would leave its rows behind (or delete them through ON DELETE CASCADE): " + fix,
        )


def table_shapes(tables: Iterable[TenantTable]) -> dict[str, list[str]]:
    """Each table's columns and types, and its primary key, as reflected: what a move
    records when planned and compares before it switches."""
    return {
        table.qualified_name: [
            *(f"{c} {t}" for c, t in zip(table.columns, table.column_types, strict=False)),
            f"PRIMARY KEY ({', '.join(table.primary_key)})",
        ]
        for table in tables
    }


def analyze_tables(conn: Connection, tables: Iterable[TenantTable]) -> None:
    """Refresh the planner's statistics of *tables* after a bulk copy into them (until
    autovacuum gets to it, they may describe the tables as they were before, e.g.
    empty). ANALYZE samples a bounded number of rows, whatever the table's size.
    PostgreSQL only; nothing on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    quote = conn.dialect.identifier_preparer.quote
    for table in tables:
        name = f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
        conn.exec_driver_sql(f"ANALYZE {name}")


def unindexed_foreign_keys(conn: Connection, tables: Iterable[TenantTable]) -> list[str]:
    """One line for each foreign key between *tables* that no index of the referencing
    table leads with: deleting a tenant's parent rows (a move's cleanup) then checks
    each one by scanning the child table. PostgreSQL only; empty on SQLite."""
    if conn.dialect.name != "postgresql":
        return []
    names = [f"{_quote(t.schema)}.{_quote(t.name)}" if t.schema else _quote(t.name) for t in tables]
    rows = conn.execute(
        sa.text(
            "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text,"
            " ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY AS k(n, o)"
            "       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n"
            "       ORDER BY k.o)"
            " FROM pg_constraint c"
            " WHERE c.contype = 'f'"
            " AND c.conrelid = ANY(ARRAY(SELECT to_regclass(n) FROM unnest(CAST(:t AS text[])) n))"
            " AND c.confrelid = ANY(ARRAY(SELECT to_regclass(n) FROM unnest(CAST(:t AS text[])) n))"
            " AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid"
            "   AND i.indpred IS NULL"
            "   AND (string_to_array(i.indkey::text, ' ')::int2[])"
            "       [1:array_length(c.conkey, 1)] @> c.conkey)"
            " ORDER BY 1, 2"
        ),
        {"t": names},
    ).all()
    return [
        f"table {child} has no index on ({', '.join(columns)}) for its foreign key to "
        f"{parent}: deleting a tenant's {parent} rows (a move's cleanup) scans {child} "
        f"once per row; CREATE INDEX ON {child} ({', '.join(columns)})"
        for child, parent, columns in rows
    ]


def check_whole_database(
    conn: Connection, tables: Iterable[TenantTable], *, column: str = "tenant_id"
) -> None:
    """Refuse (SchemaContractError) a foreign key to a tenant table from a table that
    does not move with the tenant, found in ``pg_constraint`` in any schema (tenantry's
    and the ones ``move_schemas`` leaves out included): its rows would stay behind, or
    be lost to an ``ON DELETE CASCADE`` when the source is cleaned. Refused before
    anything is frozen, naming the key, its table and the fix. A partition counts as
    its partitioned table. PostgreSQL only (a SQLite file is one schema, and
    :func:`tenant_tables` refuses such a table there).
    """
    if conn.dialect.name != "postgresql":
        return
    names = [quoted_name(conn, table) for table in tables]
    if not names:
        return
    found = conn.execute(
        sa.text(
            "WITH moved AS (SELECT array_agg(to_regclass(n)) AS oids"
            "  FROM unnest(CAST(:t AS text[])) n)"
            " SELECT k.conname, k.conrelid::regclass::text, k.confrelid::regclass::text"
            " FROM pg_constraint k, moved"
            " WHERE k.contype = 'f' AND k.conparentid = 0"
            "  AND COALESCE(pg_partition_root(k.confrelid), k.confrelid) = ANY(moved.oids)"
            "  AND NOT COALESCE(pg_partition_root(k.conrelid), k.conrelid) = ANY(moved.oids)"
            " ORDER BY 2, 1 LIMIT 1"
        ),
        {"t": names},
    ).first()
    if found is not None:
        constraint, child, parent = found
        raise SchemaContractError(
            child,
            f"its foreign key {constraint!r} references tenant table {parent!r} but it does "
            "not move with the tenant, so a move would leave its rows behind (or delete them "
            f"through ON DELETE CASCADE): make it a tenant table ({column} in its primary "
            "key, in a schema that moves), or drop the key",
        )


def quoted_name(conn: Connection, table: TenantTable) -> str:
    """The table's name for SQL: quoted, with its schema when it has one."""
    quote = conn.dialect.identifier_preparer.quote
    if table.schema:
        return f"{quote(table.schema)}.{quote(table.name)}"
    return quote(table.name)


def check_same_tables(source: list[TenantTable], target: list[TenantTable]) -> None:
    """Raise :class:`SchemaContractError` for the first source table the target lacks.

    A table differs when the target has no table of that name or another set of
    copyable columns (the order may differ: copies name their columns).
    """
    by_name = {(t.schema, t.name): t for t in target}
    for table in source:
        other = by_name.get((table.schema, table.name))
        if other is None:
            raise SchemaContractError(
                table.qualified_name,
                "it is missing on the target: run `tenantry migrate` so that every "
                "shard has the same schema",
            )
        if set(table.columns) != set(other.columns):
            missing = [c for c in table.columns if c not in other.columns]
            extra = [c for c in other.columns if c not in table.columns]
            parts = []
            if missing:
                parts.append(f"the target lacks {', '.join(missing)}")
            if extra:
                parts.append(f"the target has {', '.join(extra)} in addition")
            raise SchemaContractError(
                table.qualified_name,
                f"its columns differ between source and target ({'; '.join(parts)}): "
                "run `tenantry migrate` so that every shard has the same schema",
            )


def _qualify(schema: str | None, name: str) -> str:
    return f"{schema}.{name}" if schema else name


def _parents_first(parents: Mapping[str, Iterable[str]]) -> list[str]:
    """Topological order of *parents* (name -> names it references), deterministic.

    Tables of a foreign-key cycle (a strongly connected component) stay together, after
    every parent of the cycle and before every child; inside it the table with the
    fewest unplaced parents goes first, ties by name.
    """
    graph = {name: sorted(set(refs) & parents.keys() - {name}) for name, refs in parents.items()}
    component = _components(graph)
    members: dict[int, list[str]] = {}
    for name in sorted(graph):
        members.setdefault(component[name], []).append(name)
    waiting = {c: {component[r] for n in ns for r in graph[n]} - {c} for c, ns in members.items()}
    children: dict[int, set[int]] = {c: set() for c in members}
    for c, refs in waiting.items():
        for ref in refs:
            children[ref].add(c)
    ready = [(ns[0], c) for c, ns in members.items() if not waiting[c]]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, c = heapq.heappop(ready)
        order += _break_cycle(members[c], graph)
        for child in children[c]:
            waiting[child].discard(c)
            if not waiting[child]:
                heapq.heappush(ready, (members[child][0], child))
    return order


def _break_cycle(names: list[str], graph: Mapping[str, list[str]]) -> list[str]:
    """Order the tables of one cycle: fewest unplaced parents first, then by name."""
    if len(names) == 1:
        return names
    left = set(names)
    order: list[str] = []
    while left:
        name = min(left, key=lambda n: (sum(r in left for r in graph[n]), n))
        left.discard(name)
        order.append(name)
    return order


def _components(graph: Mapping[str, list[str]]) -> dict[str, int]:
    """Strongly connected components (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}
    found = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, refs = work[-1]
            for ref in refs:
                if ref not in index:
                    index[ref] = low[ref] = len(index)
                    stack.append(ref)
                    on_stack.add(ref)
                    work.append((ref, iter(graph[ref])))
                    break
                if ref in on_stack:
                    low[node] = min(low[node], index[ref])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component[member] = found
                        if member == node:
                            break
                    found += 1
    return component


# PostgreSQL ---------------------------------------------------------------------------

#: The namespaces of application tables (pg_namespace ``n``): all but the system's
#: and tenantry's own; or the one named ``:schema``.
_PG_SCHEMAS = """
    CASE WHEN CAST(:schema AS text) IS NULL
         THEN n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenantry')
              AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
         ELSE n.nspname = CAST(:schema AS text) END
"""

#: Application schemas, for queries of other modules (pg_namespace ``n``).
APP_SCHEMAS_SQL = """
    n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenantry')
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
"""

_PG_COLUMNS = sa.text(
    f"""
    SELECT n.nspname AS schema_name, c.relname AS table_name, a.attname AS column_name,
           format_type(a.atttypid, a.atttypmod) AS column_type,
           a.attgenerated <> '' AS generated,
           COALESCE(
               pg_get_serial_sequence(
                   quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname),
               (SELECT quote_ident(sn.nspname) || '.' || quote_ident(s.relname)
                  FROM pg_attrdef ad
                  JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass
                                  AND d.objid = ad.oid
                                  AND d.refclassid = 'pg_class'::regclass
                  JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
                  JOIN pg_namespace sn ON sn.oid = s.relnamespace
                 WHERE ad.adrelid = c.oid AND ad.adnum = a.attnum
                 LIMIT 1)
           ) AS sequence_name
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
     WHERE {_PG_SCHEMAS}
       AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't'
     ORDER BY n.nspname, c.relname, a.attnum
    """
)

_PG_KEYS = sa.text(
    f"""
    SELECT n.nspname AS schema_name, c.relname AS table_name, k.contype AS kind,
           k.conname AS constraint_name,
           ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, i)
                   JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum
                  ORDER BY u.i) AS columns,
           rn.nspname AS referenced_schema, r.relname AS referenced
      FROM pg_constraint k
      JOIN pg_class c ON c.oid = k.conrelid
      JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_class r ON r.oid = k.confrelid
      LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
     WHERE {_PG_SCHEMAS}
       AND k.contype IN ('p', 'f') AND NOT c.relispartition
       AND k.conparentid = 0
     ORDER BY n.nspname, c.relname, k.conname
    """
)


def _reflect_postgresql(
    conn: Connection, schema: str | None, schemas: Iterable[str] | None
) -> dict[str, _Reflected]:
    """Tables by qualified name (:attr:`TenantTable.qualified_name`)."""
    default = None if schema else conn.execute(sa.text("SELECT current_schema()")).scalar()
    allowed = set(schemas or ())

    def key(nsp: str, rel: str) -> str:
        return rel if nsp == default else f"{nsp}.{rel}"

    tables: dict[str, _Reflected] = {}
    for row in conn.execute(_PG_COLUMNS, {"schema": schema}):
        name = key(row.schema_name, row.table_name)
        table = tables.get(name)
        if table is None:
            own = None if row.schema_name == default else row.schema_name
            movable = not allowed or own is None or own in allowed
            table = tables[name] = _Reflected(row.table_name, own, movable=movable)
        table.all_columns.add(row.column_name)
        if not row.generated:
            table.columns.append((row.column_name, row.column_type))
        if row.sequence_name:
            table.sequences.append((row.column_name, row.sequence_name))
    for row in conn.execute(_PG_KEYS, {"schema": schema}):
        keyed = tables.get(key(row.schema_name, row.table_name))
        if keyed is None:
            continue
        if row.kind == "p":
            keyed.primary_key = list(row.columns)
        elif row.referenced:
            parent = key(row.referenced_schema, row.referenced)
            keyed.parents.setdefault(parent, row.constraint_name)
    return tables


# SQLite -------------------------------------------------------------------------------


def _reflect_sqlite(conn: Connection, schema: str | None) -> dict[str, _Reflected]:
    prefix = f"{_quote(schema)}." if schema else ""
    rows = conn.exec_driver_sql(
        f"SELECT name, sql FROM {prefix}sqlite_master "
        "WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).all()
    tables: dict[str, _Reflected] = {}
    for name, ddl in rows:
        table = _Reflected(name, schema)
        table.without_rowid = bool(ddl and _WITHOUT_ROWID.search(ddl))
        keyed: list[tuple[int, str]] = []
        # table_xinfo: cid, name, type, notnull, dflt_value, pk, hidden
        for info in conn.exec_driver_sql(f"PRAGMA {prefix}table_xinfo({_quote(name)})"):
            column, declared, pk, hidden = info[1], info[2], info[5], info[6]
            table.all_columns.add(column)
            if hidden == 0:  # 2 and 3 are generated columns, 1 virtual-table hidden ones
                table.columns.append((column, declared or ""))
            if pk:
                keyed.append((pk, column))
        table.primary_key = [c for _, c in sorted(keyed)]
        # foreign_key_list: id, seq, table, from, to, on_update, on_delete, match
        for fk in conn.exec_driver_sql(f"PRAGMA {prefix}foreign_key_list({_quote(name)})"):
            table.parents.setdefault(fk[2], "")
        tables[name] = table
    # SQLite matches table names case-insensitively, foreign keys included.
    names = {name.lower(): name for name in tables}
    for table in tables.values():
        table.parents = {
            _qualify(schema, names.get(p.lower(), p)): c for p, c in table.parents.items()
        }
    # Keyed as TenantTable.qualified_name: by schema too when one was named.
    return {_qualify(schema, name): table for name, table in tables.items()}


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
