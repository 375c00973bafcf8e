"""Where tests' and benchmarks' PostgreSQL servers come from.

:class:`PostgresServers` finds servers in this order and never skips silently:

1. ``TENANTRY_TEST_PG_URLS``: comma-separated superuser URLs of running servers;
2. :class:`TempPostgres` servers started with the local ``initdb`` and ``pg_ctl``;
3. testcontainers' PostgreSQL, when a Docker daemon answers;
4. else :class:`NoPostgresAvailable`, whose message says how to provide one.

:func:`tenantry.testing.create_database` and :func:`tenantry.testing.drop_database`
make and remove databases on them (``tenantry.testing.databases``);
:class:`TempPostgres` is one server (``tenantry.testing.server``).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tenantry.testing.server import (
    DEFAULT_SETTINGS,
    DOCKER_IMAGE,
    DRIVER,
    SUPERUSER,
    URLS_ENV,
    NoPostgresAvailable,
    TempPostgres,
    TempPostgresError,
    find_pg_bindir,
    safe_url,
)

__all__ = ["PostgresServers", "docker_available"]


def docker_available() -> bool:
    """Whether a Docker daemon answers a ping."""
    try:
        # imported by name: the docker SDK ships no type information
        docker = importlib.import_module("docker")
        client = docker.from_env()
    except Exception:  # no SDK, no socket, bad DOCKER_HOST: all mean "no Docker"
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


class _Stoppable(Protocol):
    def stop(self) -> object: ...


_T = TypeVar("_T", bound=_Stoppable)


def _start_all(starters: Sequence[Callable[[], _T]]) -> list[_T]:
    """Run the starters in parallel; if any fails, stop the others and raise its error."""
    with ThreadPoolExecutor(max_workers=len(starters)) as pool:
        futures = [pool.submit(start) for start in starters]
    started: list[_T] = []
    error: BaseException | None = None
    for future in futures:
        exc = future.exception()
        if exc is None:
            started.append(future.result())
        elif error is None:
            error = exc
    if error is not None:
        for item in started:
            item.stop()
        raise error
    return started


Source = Literal["env", "initdb", "docker"]


class PostgresServers:
    """``count`` superuser URLs of PostgreSQL servers from the first source that works.

    A context manager: servers it started are stopped and removed on exit. With
    ``TENANTRY_TEST_PG_URLS`` naming fewer servers than ``count``, they are reused in
    turn (one URL serves as both servers of a pair). ``env``, ``bindir`` and ``docker``
    are seams for tests: ``"auto"`` means look, ``None``/``False`` means there is none.
    """

    def __init__(
        self,
        count: int = 2,
        *,
        env: Mapping[str, str] | None = None,
        bindir: Path | Literal["auto"] | None = "auto",
        docker: bool | Literal["auto"] = "auto",
        settings: Mapping[str, str] | None = None,
        name: str = "tenantry",
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self.count = count
        self.urls: list[str] = []
        self.source: Source | None = None
        self._env = os.environ if env is None else env
        self._bindir = bindir
        self._docker = docker
        self._settings = dict(settings or {})
        self._name = name
        self._stoppables: list[_Stoppable] = []

    def start(self) -> Self:
        """Find or start the servers; raises :class:`NoPostgresAvailable` if none."""
        if self.source is not None:
            raise RuntimeError("these PostgresServers are already started")
        tried: list[str] = []
        raw = [u.strip() for u in self._env.get(URLS_ENV, "").split(",") if u.strip()]
        if raw:
            self.urls = _check_env_urls(raw, self.count)
            self.source = "env"
            return self
        tried.append(f"{URLS_ENV}: not set")

        bindir = find_pg_bindir() if self._bindir == "auto" else self._bindir
        if bindir is None:
            tried.append("initdb: no PostgreSQL server binaries found")
        else:
            try:
                servers = _start_all(
                    [
                        lambda: TempPostgres.start(
                            name=self._name, settings=self._settings, bindir=bindir
                        )
                    ]
                    * self.count
                )
            except TempPostgresError as exc:
                # Fall through to Docker, but say why: binaries that fail are a bug to fix.
                warnings.warn(f"throwaway PostgreSQL failed: {exc}", RuntimeWarning, stacklevel=2)
                tried.append(f"initdb in {bindir}: {str(exc).splitlines()[0]}")
            else:
                self._stoppables += servers
                self.urls = [s.url for s in servers]
                self.source = "initdb"
                return self

        if not (docker_available() if self._docker == "auto" else self._docker):
            tried.append("Docker: no daemon answers")
            raise NoPostgresAvailable(tried)
        try:
            containers = _start_all([self._start_container] * self.count)
        except Exception as exc:  # image pull, port mapping, readiness: all end here
            tried.append(f"Docker: {DOCKER_IMAGE} did not start: {exc}")
            raise NoPostgresAvailable(tried) from exc
        self._stoppables += containers
        self.urls = [
            make_url(c.get_connection_url(driver="psycopg")).render_as_string(hide_password=False)
            for c in containers
        ]
        self.source = "docker"
        return self

    def _start_container(self) -> Any:
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before the community package split
            from testcontainers.postgres import PostgresContainer
        # The image listens on all addresses itself; 127.0.0.1 would hide it from the host.
        settings = {**DEFAULT_SETTINGS, **self._settings}
        settings.pop("listen_addresses", None)
        command = ["postgres"]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        container = PostgresContainer(
            DOCKER_IMAGE,
            username=SUPERUSER,
            password=SUPERUSER,
            dbname="postgres",
            driver="psycopg",
        ).with_command(command)
        container.start()
        return container

    def stop(self) -> None:
        """Stop and remove every server these started; idempotent."""
        while self._stoppables:
            self._stoppables.pop().stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<PostgresServers {self.source or 'not started'} {[safe_url(u) for u in self.urls]}>"
        )


def _check_env_urls(raw: Sequence[str], count: int) -> list[str]:
    urls: list[str] = []
    for text in raw:
        url = make_url(text)
        if url.get_backend_name() != "postgresql":
            raise ValueError(f"{URLS_ENV}: {safe_url(url)} is not a PostgreSQL URL")
        url = url.set(drivername=DRIVER)
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.DBAPIError as exc:
            raise NoPostgresAvailable(
                [f"{URLS_ENV}: {safe_url(url)} does not answer: {str(exc.orig).strip()}"]
            ) from exc
        finally:
            engine.dispose()
        urls.append(url.render_as_string(hide_password=False))
    return [urls[i % len(urls)] for i in range(count)]
