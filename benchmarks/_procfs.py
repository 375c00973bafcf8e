"""Local PostgreSQL servers' processes and CPU time, read from /proc (Linux).

tiers.py pins each server's processes to cores of their own; move_throughput.py counts
the CPU seconds a copy cost both servers. Where a server is not on this machine these
give None.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool


def schedstat_ns(pid: int) -> int:
    """CPU nanoseconds process *pid* has run (``/proc/<pid>/schedstat``; all its
    threads: a PostgreSQL backend has one). Waiting for a core does not count."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (the name may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields is not None else None


def server_processes(postmaster: int) -> list[int]:
    """The postmaster and every process it started."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


class ServerCpu:
    """CPU seconds used so far by local PostgreSQL servers: every process of theirs,
    and their exited backends (counted in the postmaster's children's time once it has
    reaped them), from /proc. Wall time on a shared machine says how busy the
    neighbours were; CPU time says what the copy cost. None where a server is not
    local (``--pg-url`` elsewhere)."""

    def __init__(self, urls: Sequence[str]) -> None:
        pids = [postmaster_from_data_dir(url) for url in urls]
        self.postmasters: list[int] | None = [p for p in pids if p is not None]
        if len(self.postmasters) != len(pids):
            self.postmasters = None
        self.tick = os.sysconf("SC_CLK_TCK")

    def _children(self) -> dict[int, list[str]]:
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = proc_stat(int(entry.name))
                if fields is not None and self.postmasters and int(fields[1]) in self.postmasters:
                    found[int(entry.name)] = fields
        return found

    def backends(self) -> set[int]:
        """The servers' processes now."""
        return set(self._children()) if self.postmasters else set()

    def settle(self, before: set[int], timeout: float = 5.0) -> None:
        """Wait until every process started since *before* was taken has been reaped:
        only then is its CPU time counted."""
        deadline = time.monotonic() + timeout
        while self.postmasters and time.monotonic() < deadline:
            if self.backends() <= before:
                return
            time.sleep(0.01)

    def seconds(self) -> float | None:
        if self.postmasters is None:
            return None
        ticks = 0
        for pid in self.postmasters:
            fields = proc_stat(pid)
            if fields is None:
                return None
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        for fields in self._children().values():
            ticks += int(fields[11]) + int(fields[12])
        return ticks / self.tick


def postmaster_from_data_dir(url: str) -> int | None:
    """The server's main process from its data directory's postmaster.pid, if the
    server runs on this machine and this user may read it (else None)."""
    db = sa.create_engine(url, poolclass=NullPool)
    try:
        with db.connect() as conn:
            data_dir = conn.exec_driver_sql("SHOW data_directory").scalar_one()
        pid = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, sa.exc.SQLAlchemyError):
        return None
    finally:
        db.dispose()
    return pid if proc_stat(pid) is not None else None


class CpuMeter:
    """The CPU one stretch of work costs: this process (or its reaped children, the
    psql processes), and both servers, counted once the work's backends have ended.
    The waiting for them is left out of the client's CPU and reported as ``paused``."""

    def __init__(self, servers: ServerCpu, *, children: bool = False) -> None:
        self.servers = servers
        self.children = children
        self.paused = 0.0

    def _client(self) -> float:
        if self.children:
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            return used.ru_utime + used.ru_stime
        return time.process_time()

    def start(self) -> None:
        self.before = self.servers.backends()
        self.client = self._client()
        self.server = self.servers.seconds()

    def stop(self) -> dict[str, float | None]:
        client = self._client() - self.client
        waited = time.perf_counter()
        self.servers.settle(self.before)
        server = self.servers.seconds()
        self.paused = time.perf_counter() - waited
        used = None if server is None or self.server is None else server - self.server
        return {"client_cpu_s": client, "server_cpu_s": used}
