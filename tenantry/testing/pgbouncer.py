"""One throwaway PgBouncer in transaction mode, in front of a test PostgreSQL server.

Started like :class:`~tenantry.testing.TempPostgres`: a temporary directory holding its
configuration, run as the ``postgres`` OS user when running as root (PgBouncer refuses
root), stopped at interpreter exit if :meth:`TempPgBouncer.stop` was never called.
Every database of the server is reachable through it (a ``*`` entry), so a test points a
shard's routing URL at :attr:`TempPgBouncer.port` and keeps the server's port for its
operations URL.

Clients authenticate with ``trust`` (the server's own method in tests); the users it
admits are listed when it starts and can be added later (:meth:`TempPgBouncer.add_users`).
A small ``default_pool_size`` makes every tenant share the same few server connections.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

import psycopg
from sqlalchemy.engine import make_url

from tenantry.testing.server import default_base_dir, free_port, log_tail, run_as_postgres

__all__ = ["NoPgBouncerAvailable", "TempPgBouncer", "find_pgbouncer"]

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


class NoPgBouncerAvailable(RuntimeError):
    """No ``pgbouncer`` binary was found; the message says how to install one."""


def find_pgbouncer(path: str | None = None) -> Path | None:
    """The ``pgbouncer`` binary: on ``path`` (default ``PATH``), then in the sbin folders."""
    found = shutil.which("pgbouncer", path=path)
    if found is None:
        found = shutil.which("pgbouncer", path=os.pathsep.join(_SEARCH))
    return Path(found) if found else None


class TempPgBouncer:
    """PgBouncer in front of one server, in *pool_mode* (``transaction`` by default)."""

    def __init__(self, directory: Path, server_port: int, users: Iterable[str]) -> None:
        self.directory = directory
        self.server_port = server_port
        self.port = 0
        self.users = set(users)
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def log_file(self) -> Path:
        """PgBouncer's log file."""
        return self.directory / "pgbouncer.log"

    def url(self, server_url: str) -> str:
        """*server_url* (any user, any database of the server) through this PgBouncer."""
        url = make_url(server_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    @classmethod
    def start(
        cls,
        server_url: str,
        *,
        users: Iterable[str] = ("postgres",),
        pool_mode: str = "transaction",
        default_pool_size: int = 2,
        settings: Mapping[str, str] | None = None,
        binary: Path | None = None,
        timeout: float = 20.0,
    ) -> TempPgBouncer:
        """Start PgBouncer in front of the server of *server_url* (its host and port).

        Raises :class:`NoPgBouncerAvailable` when no binary is found (``make test``
        installs Debian's ``pgbouncer`` package where it can).
        """
        binary = binary or find_pgbouncer()
        if binary is None:
            raise NoPgBouncerAvailable(
                "no pgbouncer binary on PATH or in /usr/sbin: install it "
                "(apt-get install pgbouncer, or brew install pgbouncer)"
            )
        server = make_url(server_url)
        _, account = run_as_postgres()
        directory = Path(tempfile.mkdtemp(prefix="tenantry-pgbouncer-", dir=default_base_dir()))
        bouncer = cls(directory, server.port or 5432, users)
        atexit.register(bouncer.stop)
        try:
            if account is not None:
                os.chown(directory, account.pw_uid, account.pw_gid)
            values = {
                "listen_addr": "127.0.0.1",
                "unix_socket_dir": "",
                "auth_type": "trust",
                "auth_file": str(directory / "users.txt"),
                "pool_mode": pool_mode,
                "default_pool_size": str(default_pool_size),
                "min_pool_size": "0",
                "reserve_pool_size": "0",
                "max_client_conn": "2000",
                "max_db_connections": "0",
                "server_lifetime": "3600",
                "server_idle_timeout": "600",
                "query_wait_timeout": "60",
                "pidfile": str(directory / "pgbouncer.pid"),
                "admin_users": "postgres",
                "ignore_startup_parameters": "extra_float_digits,options",
                **(settings or {}),
            }
            host = server.host or "127.0.0.1"
            for attempt in range(3):
                bouncer.port = free_port()
                bouncer._write(values | {"listen_port": str(bouncer.port)}, host, account)
                argv = [str(binary), str(directory / "pgbouncer.ini")]
                if bouncer._launch(argv, account, timeout):
                    break
                if attempt == 2:
                    raise RuntimeError(f"pgbouncer did not start:\n{log_tail(bouncer.log_file)}")
        except BaseException:
            bouncer.stop()
            raise
        return bouncer

    def _write(
        self, values: Mapping[str, str], host: str, account: pwd.struct_passwd | None
    ) -> None:
        lines = ["[databases]", f"* = host={host} port={self.server_port}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in values.items()]
        (self.directory / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        self._write_users()
        if account is not None:
            for name in ("pgbouncer.ini", "users.txt"):
                os.chown(self.directory / name, account.pw_uid, account.pw_gid)

    def _write_users(self) -> None:
        text = "".join(f'"{user}" ""\n' for user in sorted(self.users))
        (self.directory / "users.txt").write_text(text)

    def add_users(self, *users: str) -> None:
        """Admit more users (PgBouncer reads its user list again on SIGHUP)."""
        new = set(users) - self.users
        if not new:
            return
        self.users |= new
        self._write_users()
        if self._process is not None:
            self._process.send_signal(signal.SIGHUP)
            self._wait_admitted(sorted(new)[0])

    def _wait_admitted(self, user: str, timeout: float = 10.0) -> None:
        """Return once PgBouncer admits *user* (it reloads between two turns of its
        event loop)."""
        deadline = time.monotonic() + timeout
        conninfo = f"host=127.0.0.1 port={self.port} dbname=postgres user={user}"
        while True:
            try:
                psycopg.connect(conninfo, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _launch(self, argv: list[str], account: pwd.struct_passwd | None, timeout: float) -> bool:
        log = self.log_file.open("ab")
        # Run as the account directly (not through runuser): the process to signal and
        # kill is PgBouncer itself.
        self._process = subprocess.Popen(
            argv,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            user=account.pw_uid if account is not None else None,
            group=account.pw_gid if account is not None else None,
            extra_groups=[] if account is not None else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        self._process.kill()
        self._process = None
        return False

    def stop(self) -> None:
        """Stop PgBouncer at once and remove its directory; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"port={self.port}"
        return f"<TempPgBouncer {state} -> {self.server_port}>"
