"""The evcharge API: FastAPI on a tenantry Router; the group comes from the request.

:class:`~tenantry.router.TenantMiddleware` finds the group (the tenant) in the
``X-Tenant`` header or the host, ``<group>.evcharge.example``, answers 400 for a missing
or malformed one and 404 for a group the shard map does not know, and makes the group
current for the request. Every endpoint then opens ``router.session()`` with no tenant
argument: the router takes the current group, routes to its shard (shared or dedicated)
and scopes every statement to it. No endpoint filters by ``tenant_id`` itself.

Errors the router calls retryable (a group frozen for a moment by a move, a shard that
cannot be reached, a connection lost mid-request) are answered ``503`` with a
``Retry-After`` header and ``{"error": ..., "retryable": true}``: send the request
again. Commands take an ``Idempotency-Key`` header, so a command sent again after a 503
or a timeout is made once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from examples.evcharge.models import (
    COMMAND_STATES,
    Charger,
    ChargerCommand,
    ChargingSession,
    User,
)
from tenantry import Router
from tenantry.errors import RoutingError, ShardUnavailable, UnknownTenant
from tenantry.router import (
    RequestInfo,
    TenantMiddleware,
    TenantSession,
    current_tenant,
    header_resolver,
    subdomain_resolver,
)

__all__ = ["BASE_DOMAIN", "TENANT_HEADER", "GroupResolver", "create_app"]

logger = logging.getLogger("evcharge")

#: The header that names the group, and the domain whose subdomains are groups.
TENANT_HEADER = "x-tenant"
BASE_DOMAIN = "evcharge.example"
#: How often a write retries its id when a concurrent write of the group took it.
_ID_ATTEMPTS = 20

T = TypeVar("T")


# ----------------------------------------------------------------------- the group


@dataclass(frozen=True)
class GroupResolver:
    """The group from the host's subdomain or, failing that, the header.

    A request that names two different groups (host and header) gets the two joined,
    which is not a valid id: the middleware answers 400 rather than pick one.
    """

    header: str = TENANT_HEADER
    base_domain: str = BASE_DOMAIN

    def __call__(self, request: RequestInfo, /) -> str | None:
        by_host = subdomain_resolver(self.base_domain)(request)
        by_header = header_resolver(self.header)(request)
        if by_host and by_header and by_host != by_header:
            return f"{by_host}, {by_header}"
        return by_host or by_header

    @property
    def hint(self) -> str:
        """Where a client names its group (shown in the 400's message)."""
        return f"send the group in the {self.header!r} header or use <group>.{self.base_domain}"


# ------------------------------------------------------------------------- schemas


class UserIn(BaseModel):
    email: str = Field(min_length=3, max_length=200)
    name: str = Field(min_length=1, max_length=200)


class UserOut(BaseModel):
    id: int
    email: str
    name: str


class ChargerIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    location: str = Field(min_length=1, max_length=200)
    power_kw: Decimal = Field(gt=0, le=1000, max_digits=8, decimal_places=2)


class ChargerOut(BaseModel):
    id: int
    name: str
    location: str
    power_kw: float
    status: str


class SessionStart(BaseModel):
    user_id: int


class SessionStop(BaseModel):
    energy_kwh: Decimal = Field(ge=0, max_digits=10, decimal_places=3)


class SessionOut(BaseModel):
    id: int
    charger_id: int
    user_id: int
    started_at: datetime
    ended_at: datetime | None
    energy_kwh: float
    active: bool


class CommandIn(BaseModel):
    command: Literal["start", "stop", "reboot", "unlock"]


class CommandUpdate(BaseModel):
    status: Literal["accepted", "rejected", "done", "failed"]


class CommandOut(BaseModel):
    id: int
    charger_id: int
    command: str
    status: str
    client_ref: str | None
    requested_at: datetime
    updated_at: datetime | None


class Home(BaseModel):
    shard: str
    tier: str


class StatsOut(BaseModel):
    group: str
    home: Home
    users: int
    chargers: dict[str, int]
    sessions: int
    active_sessions: int
    energy_kwh: float
    commands: dict[str, int]


def _utc(moment: datetime) -> datetime:
    # SQLite gives back naive datetimes: the app stored them in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def _user(u: User) -> UserOut:
    return UserOut(id=u.id, email=u.email, name=u.name)


def _charger(c: Charger) -> ChargerOut:
    return ChargerOut(
        id=c.id, name=c.name, location=c.location, power_kw=float(c.power_kw), status=c.status
    )


def _session(s: ChargingSession) -> SessionOut:
    return SessionOut(
        id=s.id,
        charger_id=s.charger_id,
        user_id=s.user_id,
        started_at=_utc(s.started_at),
        ended_at=_utc_or_none(s.ended_at),
        energy_kwh=float(s.energy_kwh),
        active=s.ended_at is None,
    )


def _command(c: ChargerCommand) -> CommandOut:
    return CommandOut(
        id=c.id,
        charger_id=c.charger_id,
        command=c.command,
        status=c.status,
        client_ref=c.client_ref,
        requested_at=_utc(c.requested_at),
        updated_at=_utc_or_none(c.updated_at),
    )


# ------------------------------------------------------------------------- helpers


def _db(request: Request) -> Iterator[TenantSession]:
    """A session of the request's group: the router takes the group the middleware
    made current, routes to its shard and scopes every statement to it."""
    router: Router = request.app.state.router
    finished = False
    try:
        with router.session(expire_on_commit=False) as session:
            yield session
            finished = True
    except DBAPIError as exc:
        if not (finished and exc.connection_invalidated):
            raise
        # The endpoint's work was done (committed, or a read whose answer is ready);
        # only closing the session failed, on a connection the server dropped since
        # (a restart). The pool has discarded it; the answer stands.
        logger.warning("connection lost after the request was served: %s", exc.orig)


#: Closed before the response is sent ("function" scope), so that an error closing
#: the session is answered (a 503) rather than raised after a 200 went out.
DB = Annotated[TenantSession, Depends(_db, scope="function")]


def _next_id(
    session: TenantSession, model: type[User | Charger | ChargingSession | ChargerCommand]
) -> int:
    # The group's own ids count from 1 (the router scopes max() to the group). Two
    # concurrent writes may pick the same one: the loser's commit fails, and it retries.
    found = session.scalar(select(func.coalesce(func.max(model.id), 0)))
    return int(found or 0) + 1


def _committed(session: TenantSession, write: Callable[[], T]) -> T:
    """Run *write* and commit; on a key collision (a concurrent write took the id),
    roll back and run it again."""
    for _ in range(_ID_ATTEMPTS):
        result = write()
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return result
    raise HTTPException(409, "too many concurrent writes to this group: retry")


def _get(session: TenantSession, model: type[T], ident: int, what: str, *, lock: bool = False) -> T:
    query = select(model).where(model.id == ident)  # type: ignore[attr-defined]
    if lock:
        query = query.with_for_update()
    found = session.scalars(query).first()
    if found is None:
        raise HTTPException(404, f"{what} {ident} not found")
    return found


def _now() -> datetime:
    return datetime.now(UTC)


def _retry_later(message: str, retry_after: float = 1.0) -> JSONResponse:
    return JSONResponse(
        {"error": message, "retryable": True},
        status_code=503,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


# ---------------------------------------------------------------------------- app


def create_app(
    router: Router, *, header: str = TENANT_HEADER, base_domain: str = BASE_DOMAIN
) -> FastAPI:
    """The API on *router* (the caller opens and closes it)."""
    app = FastAPI(
        title="evcharge",
        summary="An EV-charger operator's API; charger groups are tenantry tenants.",
    )
    app.state.router = router
    app.add_middleware(
        TenantMiddleware,
        resolver=GroupResolver(header, base_domain),
        router=router,
        exempt_paths=["/healthz", "/docs", "/openapi.json"],
    )

    # -- errors --------------------------------------------------------------------

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The same shape as the middleware's 400s and 404s: {"error": "..."}.
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RoutingError)
    async def routing_error(request: Request, exc: RoutingError) -> JSONResponse:
        if exc.retryable:  # frozen by a move, a stale route, a rotated key, busy engines
            return _retry_later(str(exc), getattr(exc, "retry_after", 1.0))
        raise exc  # a bug (no tenant, a cross-tenant write): a 500, and logged

    @app.exception_handler(ShardUnavailable)
    async def shard_unavailable(request: Request, exc: ShardUnavailable) -> JSONResponse:
        return _retry_later(str(exc))

    @app.exception_handler(UnknownTenant)
    async def unknown_tenant(request: Request, exc: UnknownTenant) -> JSONResponse:
        # removed from the map after the middleware looked the group up
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            # The connection died under the request (a restarted server): the pool
            # has dropped it. A write may or may not have committed: retry with the
            # same Idempotency-Key.
            return _retry_later("the group's database connection was lost: retry")
        raise exc

    # -- endpoints -----------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return {"ok": True, "map_version": router.snapshot.version}

    @app.get("/users")
    def list_users(db: DB) -> list[UserOut]:
        return [_user(u) for u in db.scalars(select(User).order_by(User.id))]

    @app.post("/users", status_code=201)
    def create_user(body: UserIn, db: DB) -> UserOut:
        def write() -> User:
            user = User(id=_next_id(db, User), email=body.email, name=body.name)
            db.add(user)
            return user

        return _user(_committed(db, write))

    @app.get("/chargers")
    def list_chargers(db: DB) -> list[ChargerOut]:
        return [_charger(c) for c in db.scalars(select(Charger).order_by(Charger.id))]

    @app.post("/chargers", status_code=201)
    def create_charger(body: ChargerIn, db: DB) -> ChargerOut:
        def write() -> Charger:
            charger = Charger(
                id=_next_id(db, Charger),
                name=body.name,
                location=body.location,
                power_kw=body.power_kw,
                status="available",
            )
            db.add(charger)
            return charger

        return _charger(_committed(db, write))

    @app.get("/chargers/{charger_id}")
    def get_charger(charger_id: int, db: DB) -> ChargerOut:
        return _charger(_get(db, Charger, charger_id, "charger"))

    @app.post("/chargers/{charger_id}/sessions", status_code=201)
    def start_session(charger_id: int, body: SessionStart, db: DB) -> SessionOut:
        def write() -> ChargingSession:
            charger = _get(db, Charger, charger_id, "charger", lock=True)
            _get(db, User, body.user_id, "driver")
            if charger.status != "available":
                raise HTTPException(409, f"charger {charger_id} is {charger.status}")
            charger.status = "charging"
            started = ChargingSession(
                id=_next_id(db, ChargingSession),
                charger_id=charger_id,
                user_id=body.user_id,
                started_at=_now(),
                ended_at=None,
                energy_kwh=Decimal(0),
            )
            db.add(started)
            return started

        return _session(_committed(db, write))

    @app.post("/sessions/{session_id}/stop")
    def stop_session(session_id: int, body: SessionStop, db: DB) -> SessionOut:
        charging = _get(db, ChargingSession, session_id, "session", lock=True)
        if charging.ended_at is not None:
            raise HTTPException(409, f"session {session_id} has ended already")
        charging.ended_at = _now()
        charging.energy_kwh = body.energy_kwh
        charger = _get(db, Charger, charging.charger_id, "charger", lock=True)
        charger.status = "available"
        db.commit()
        return _session(charging)

    @app.get("/sessions")
    def list_sessions(
        db: DB,
        charger_id: Annotated[int | None, Query()] = None,
        active: Annotated[bool | None, Query()] = None,
    ) -> list[SessionOut]:
        query = select(ChargingSession).order_by(ChargingSession.id)
        if charger_id is not None:
            query = query.where(ChargingSession.charger_id == charger_id)
        if active is not None:
            ended = ChargingSession.ended_at
            query = query.where(ended.is_(None) if active else ended.is_not(None))
        return [_session(s) for s in db.scalars(query)]

    @app.get("/sessions/{session_id}")
    def get_session(session_id: int, db: DB) -> SessionOut:
        return _session(_get(db, ChargingSession, session_id, "session"))

    @app.post("/chargers/{charger_id}/commands", status_code=201)
    def send_command(
        charger_id: int,
        body: CommandIn,
        db: DB,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=100)] = None,
    ) -> CommandOut:
        def write() -> ChargerCommand:
            if idempotency_key is not None:
                sent = db.scalars(
                    select(ChargerCommand).where(ChargerCommand.client_ref == idempotency_key)
                ).first()
                if sent is not None:
                    response.status_code = 200  # made already: the same command again
                    return sent
            _get(db, Charger, charger_id, "charger")
            command = ChargerCommand(
                id=_next_id(db, ChargerCommand),
                charger_id=charger_id,
                command=body.command,
                status="pending",
                client_ref=idempotency_key,
                requested_at=_now(),
                updated_at=None,
            )
            db.add(command)
            return command

        return _command(_committed(db, write))

    @app.get("/commands")
    def list_commands(
        db: DB,
        charger_id: Annotated[int | None, Query()] = None,
        status: Annotated[str | None, Query()] = None,
    ) -> list[CommandOut]:
        query = select(ChargerCommand).order_by(ChargerCommand.id)
        if charger_id is not None:
            query = query.where(ChargerCommand.charger_id == charger_id)
        if status is not None:
            query = query.where(ChargerCommand.status == status)
        return [_command(c) for c in db.scalars(query)]

    @app.get("/commands/{command_id}")
    def get_command(command_id: int, db: DB) -> CommandOut:
        return _command(_get(db, ChargerCommand, command_id, "command"))

    @app.patch("/commands/{command_id}")
    def update_command(command_id: int, body: CommandUpdate, db: DB) -> CommandOut:
        """The charger's gateway reports what became of a command."""
        command = _get(db, ChargerCommand, command_id, "command", lock=True)
        if body.status not in COMMAND_STATES[command.status]:
            raise HTTPException(
                409, f"command {command_id} is {command.status}: it cannot become {body.status}"
            )
        command.status = body.status
        command.updated_at = _now()
        db.commit()
        return _command(command)

    @app.get("/stats")
    def stats(db: DB) -> StatsOut:
        shard = router.shard_for()  # the current group's home, by the map
        chargers = db.execute(select(Charger.status, func.count()).group_by(Charger.status))
        commands = db.execute(
            select(ChargerCommand.status, func.count()).group_by(ChargerCommand.status)
        )
        sessions, active, energy = db.execute(
            select(
                func.count(),
                func.count().filter(ChargingSession.ended_at.is_(None)),
                func.coalesce(func.sum(ChargingSession.energy_kwh), 0),
            )
        ).one()
        return StatsOut(
            group=current_tenant(),
            home=Home(shard=shard.name, tier=shard.tier.value),
            users=db.scalar(select(func.count()).select_from(User)) or 0,
            chargers={status: n for status, n in chargers},
            sessions=sessions,
            active_sessions=active,
            energy_kwh=float(energy),
            commands={status: n for status, n in commands},
        )

    return app
