"""The example's ORM models: a group's drivers, chargers, charging sessions, commands.

The first three tables are the demo app's (``tenantry/demo``), mapped here again so the
example stands on its own; ``charger_commands`` is the example's own table (revision
e0001 in ``migrations/versions``). Every table is a tenant table: ``tenant_id`` leads
its primary key and every foreign key (DESIGN.md's schema contract), so tenantry can
scope, fence and move a group's rows.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    DateTime,
    ForeignKeyConstraint,
    Index,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tenantry import TenantScoped

__all__ = [
    "COMMANDS",
    "COMMAND_STATES",
    "Base",
    "Charger",
    "ChargerCommand",
    "ChargingSession",
    "User",
]

#: What an operator may ask a charger to do.
COMMANDS = ("start", "stop", "reboot", "unlock")
#: A command's states, and which may follow which (the charger's gateway reports them).
COMMAND_STATES: dict[str, tuple[str, ...]] = {
    "pending": ("accepted", "rejected"),
    "accepted": ("done", "failed"),
    "rejected": (),
    "done": (),
    "failed": (),
}


class Base(DeclarativeBase):
    """Declarative base of the example."""


class User(TenantScoped, Base):
    """A driver of the group."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))


class Charger(TenantScoped, Base):
    """A charging point: ``available``, ``charging`` or ``offline``."""

    __tablename__ = "chargers"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    location: Mapped[str] = mapped_column(String(200))
    power_kw: Mapped[Decimal] = mapped_column(Numeric(8, 2))
    status: Mapped[str] = mapped_column(String(20), default="available")


class ChargingSession(TenantScoped, Base):
    """One charge: a driver at a charger; open until ``ended_at`` is set."""

    __tablename__ = "charging_sessions"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "charger_id"], ["chargers.tenant_id", "chargers.id"]),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"]),
        Index("charging_sessions_by_charger", "tenant_id", "charger_id"),
        Index("charging_sessions_by_user", "tenant_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    charger_id: Mapped[int]
    user_id: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    energy_kwh: Mapped[Decimal] = mapped_column(Numeric(10, 3), default=Decimal(0))


class ChargerCommand(TenantScoped, Base):
    """A request sent to a charger (start, stop, reboot, unlock) and its state.

    ``client_ref`` is the client's ``Idempotency-Key``: a request sent again with the
    same key (after a timeout or a 503) finds the command it made the first time.
    """

    __tablename__ = "charger_commands"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "charger_id"], ["chargers.tenant_id", "chargers.id"]),
        UniqueConstraint("tenant_id", "client_ref", name="charger_commands_client_ref"),
        Index("charger_commands_by_charger", "tenant_id", "charger_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    charger_id: Mapped[int]
    command: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    client_ref: Mapped[str | None] = mapped_column(String(100))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
