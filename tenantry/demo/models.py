"""The demo application's ORM models: EV-charger operator groups.

Every table is a tenant table: ``tenant_id`` leads its primary key and every foreign
key, so a tenant's rows can be copied with ``WHERE tenant_id = :t`` unchanged.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import DateTime, ForeignKeyConstraint, Index, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from tenantry.router.scoping import TenantScoped

__all__ = ["Base", "Charger", "ChargingSession", "User"]


class Base(DeclarativeBase):
    """Declarative base of the demo app."""


class User(TenantScoped, Base):
    """A driver of the operator group."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))

    sessions: Mapped[list[ChargingSession]] = relationship(
        back_populates="user", overlaps="charger,sessions"
    )


class Charger(TenantScoped, Base):
    """A charging point the operator group runs."""

    __tablename__ = "chargers"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    location: Mapped[str] = mapped_column(String(200))
    power_kw: Mapped[Decimal] = mapped_column(Numeric(8, 2))
    status: Mapped[str] = mapped_column(String(20), default="available")

    sessions: Mapped[list[ChargingSession]] = relationship(
        back_populates="charger", overlaps="user,sessions"
    )


class ChargingSession(TenantScoped, Base):
    """One charge: a user at a charger, and the energy delivered."""

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

    charger: Mapped[Charger] = relationship(back_populates="sessions", overlaps="sessions,user")
    user: Mapped[User] = relationship(back_populates="sessions", overlaps="charger,sessions")
