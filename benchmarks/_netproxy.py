"""A TCP proxy for benchmarks: counts round trips and can add network latency.

The proxy runs in a process of its own (so its work does not share the benchmark's
GIL), listens on a free port of 127.0.0.1 and forwards every connection to a target
server. Two things can be read or changed from the benchmark while it runs:

- ``round_trips``: how many times a client spoke after its server had (a request
  that waits for an answer): the round trips the client paid for, counted on the wire
  rather than assumed from the statements sent;
- ``delay_ms``: latency added to every chunk in each direction (half of it each way),
  to see what a real network's round-trip time does to the figures. It is added with
  ``time.sleep`` on the proxy's threads, so it overshoots by the sleep's granularity:
  measure the round-trip time actually added (``measured_rtt_ms``) rather than trust
  the setting.

Nothing here knows PostgreSQL's protocol; a chunk is whatever one ``recv`` returns.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from types import TracebackType
from typing import Any

__all__ = ["Proxy", "count_round_trips", "measured_rtt_ms"]

CHUNK = 1 << 16


class _Link:
    """One client connection and its server connection; who spoke last."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.last = "server"  # the server's greeting comes first for our purposes
        self.lock = threading.Lock()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _sender(sock: socket.socket, chunks: queue.Queue[tuple[float, bytes] | None]) -> None:
    """Send each chunk once its due time has come (the delayed direction)."""
    while (item := chunks.get()) is not None:
        due, data = item
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        try:
            sock.sendall(data)
        except OSError:
            return


def _pump(
    link: _Link,
    source: socket.socket,
    sink: socket.socket,
    side: str,
    turns: Synchronized[int],
    delay_us: Synchronized[int],
) -> None:
    """Forward *source* to *sink*; a client chunk after a server one is a round trip."""
    chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
    sender = threading.Thread(target=_sender, args=(sink, chunks), daemon=True)
    sender.start()
    try:
        while data := source.recv(CHUNK):
            with link.lock:
                if side == "client" and link.last == "server":
                    with turns.get_lock():
                        turns.value += 1
                link.last = side
            # Half the round-trip delay in each direction.
            chunks.put((time.perf_counter() + delay_us.value / 2e6, data))
    except OSError:
        pass
    finally:
        chunks.put(None)
        sender.join()
        link.close()


def _serve(
    target: tuple[str, int],
    ready: Any,
    turns: Synchronized[int],
    delay_us: Synchronized[int],
) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    ready.send(listener.getsockname()[1])
    while True:
        client, _addr = listener.accept()
        server = socket.create_connection(target)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, server)
        for source, sink, side in ((client, server, "client"), (server, client, "server")):
            threading.Thread(
                target=_pump, args=(link, source, sink, side, turns, delay_us), daemon=True
            ).start()


class Proxy:
    """A forwarding proxy to *host*:*port* in a child process (a context manager)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        context = mp.get_context("spawn")
        self._turns: Synchronized[int] = context.Value("q", 0)  # type: ignore[assignment]
        self._delay_us: Synchronized[int] = context.Value("q", 0)  # type: ignore[assignment]
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(self._target, child, self._turns, self._delay_us), daemon=True
        )
        self._process.start()
        self.port: int = parent.recv()

    @property
    def round_trips(self) -> int:
        """Round trips clients have made through the proxy since it started."""
        return int(self._turns.value)

    @property
    def delay_ms(self) -> float:
        return self._delay_us.value / 1000

    @delay_ms.setter
    def delay_ms(self, value: float) -> None:
        self._delay_us.value = round(value * 1000)

    def close(self) -> None:
        self._process.kill()
        self._process.join()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def count_round_trips(proxy: Proxy, fn: Callable[[], object], repeat: int) -> float:
    """Round trips per call of *fn* through *proxy* (mean over *repeat* calls)."""
    before = proxy.round_trips
    for _ in range(repeat):
        fn()
    return (proxy.round_trips - before) / repeat


def measured_rtt_ms(ping: Callable[[], object], repeat: int = 200) -> float:
    """Median time of *ping* (one round trip, e.g. ``SELECT 1`` in autocommit), in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        ping()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000
