"""The columns of tenantry's own tables as the revision that creates each table makes
them: that Alembic script creates the table from them, and :mod:`schema` declares the
table with them (plus what later revisions added).

Never change a list here: a migration must always make the same table. A later change
to a table is a new script, and its columns are added in :mod:`schema` beside the list.
Each call returns new column objects (a column belongs to one table).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

__all__ = [
    "fence_key_columns",
    "move_columns",
    "move_sentinel_columns",
    "residency_columns",
    "shard_columns",
    "shard_identity_columns",
    "tenant_columns",
    "tenant_size_columns",
]

Columns = list[sa.Column[Any]]


def _name(name: str, *, primary_key: bool = False) -> sa.Column[Any]:
    """A tenant id or shard name column (63 characters, PostgreSQL's identifier limit)."""
    return sa.Column(name, sa.String(63), primary_key=primary_key, nullable=False)


def _word(name: str) -> sa.Column[Any]:
    """A required short word: a state, tier, kind or mode."""
    return sa.Column(name, sa.String(16), nullable=False)


def _when(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    """A point in time, stored with its time zone."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def shard_columns() -> Columns:
    """``tenantry_shards`` as catalog revision c0001 makes it."""
    return [
        _name("name", primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("admin_url", sa.Text, nullable=True),
        _word("tier"),
        _word("state"),
        sa.Column("weight", sa.Integer, nullable=False),
        _when("created_at"),
    ]


def tenant_columns() -> Columns:
    """``tenantry_tenants`` as catalog revision c0001 makes it."""
    shard_fk = sa.ForeignKey("tenantry_shards.name", name="tenantry_tenants_shard_fk")
    return [
        _name("id", primary_key=True),
        sa.Column("shard", sa.String(63), shard_fk, nullable=False),
        _word("tier"),
        sa.Column("pinned", sa.Boolean, nullable=False),
        _word("state"),
        _when("created_at"),
    ]


def move_columns() -> Columns:
    """``tenantry_moves`` (the move journal) as catalog revision c0002 makes it."""
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _name("tenant_id"),
        _name("source"),
        _name("target"),
        _word("kind"),
        _word("mode"),
        _word("state"),
        *(sa.Column(name, sa.JSON, nullable=False) for name in ("options", "artifacts", "stats")),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        _when("created_at"),
        _when("updated_at"),
        _when("ended_at", nullable=True),
    ]


def tenant_size_columns() -> Columns:
    """``tenantry_tenant_sizes`` as catalog revision c0003 makes it."""
    counts = [sa.Column(name, sa.BigInteger, nullable=False) for name in ("rows", "bytes")]
    return [_name("tenant_id", primary_key=True), _name("shard"), *counts, _when("measured_at")]


def fence_key_columns() -> Columns:
    """``tenantry_fence_keys`` as catalog revision c0006 makes it."""
    key_id = sa.Column("key_id", sa.Integer, nullable=False)
    secret = sa.Column("secret", sa.LargeBinary, nullable=False)
    return [_name("shard", primary_key=True), key_id, secret, _when("updated_at")]


def residency_columns() -> Columns:
    """``tenantry_residency`` as shard revision s0001 makes it."""
    version = sa.Column("map_version", sa.BigInteger, nullable=False)
    return [_name("tenant_id", primary_key=True), _word("state"), version, _when("updated_at")]


def shard_identity_columns() -> Columns:
    """``tenantry_shard_identity`` as shard revision s0003 makes it."""
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("database_id", sa.String(64), nullable=False),
        sa.Column("system_identifier", sa.String(32), nullable=True),
        sa.Column("database_oid", sa.BigInteger, nullable=True),
        _when("created_at"),
    ]


def move_sentinel_columns() -> Columns:
    """``tenantry_move_sentinel`` (online moves' sentinel rows) as shard revision s0002
    makes it."""
    move_id = sa.Column("move_id", sa.Integer, nullable=False)
    token = sa.Column("token", sa.String(64), nullable=False)
    return [_name("tenant_id"), move_id, token, _when("written_at")]
