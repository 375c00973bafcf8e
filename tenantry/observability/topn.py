"""The busiest tenants, in bounded memory: Space-Saving with exponentially decayed counts.

A router may serve 100,000 tenants; a Prometheus series per tenant would swamp any
monitoring system. :class:`TopTenants` keeps at most ``slots`` (tenant, shard)
entries — Metwally, Agrawal and El Abbadi's *Space-Saving* algorithm (2005) — and
exposes the ``top`` of them by a decaying score, as Citus's ``citus_stat_tenants``
ranks tenants by a score that halves every period.

- **Score**: each transaction adds 1, and every score halves every ``half_life``
  seconds, so a tenant's score is about its transactions of the last ``half_life /
  ln 2`` seconds. Decay is *forward* (Cormode, Shkapenyuk, Srivastava and Xu, 2009):
  a transaction at time t adds ``2 ** ((t - t0) / half_life)`` to a stored weight that
  is never decayed in place; the score is the weight scaled back to now. Every entry
  is rescaled (``t0`` moved forward) before the weights grow past 2**60.
- **Admission**: a transaction of a tenant not monitored, when every slot is taken,
  replaces the entry of least weight and inherits its weight as an *error*: the new
  entry's score overestimates the tenant's by at most that error (Space-Saving's
  bound). The least weight is found with a lazy min-heap: weights only grow, so a
  heap entry is a lower bound, refreshed when it comes up.
- **Counts**: transactions and seconds are counted exactly from an entry's admission
  (no inherited error): lower bounds of the tenant's totals. An entry evicted and
  admitted again starts from zero, which Prometheus reads as a counter reset.

Limits: any tenant whose decayed share of all transactions exceeds ``1 / slots``
is monitored, and the top ``top`` are right when the busiest tenants stand out; under
load spread evenly over many tenants, which tenants are shown is arbitrary (none is
hot). ``slots`` defaults to three times ``top`` (as Citus tracks three times its
limit). Memory: ``slots`` entries and a heap of at most ``4 * slots`` items.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TenantLoad", "TopTenants"]

#: Rescale every weight before the decay factor passes this (well within a float).
_MAX_EXPONENT = 60.0


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One monitored tenant: its transactions and seconds since it was admitted, its
    decayed score now, and the score's possible overestimate (``error``)."""

    tenant: str
    shard: str
    transactions: int
    seconds: float
    score: float
    error: float


class _Entry:
    __slots__ = ("error", "seconds", "transactions", "weight")

    def __init__(self, weight: float, error: float) -> None:
        self.weight = weight
        self.error = error
        self.transactions = 0
        self.seconds = 0.0


class TopTenants:
    """The busiest (tenant, shard) pairs by decayed transaction count (see the module).

    Thread-safe: :meth:`record` takes a lock for a few dictionary operations.
    """

    def __init__(
        self,
        top: int = 100,
        *,
        slots: int | None = None,
        half_life: float = 60.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if top < 0:
            raise ValueError(f"top must be >= 0, got {top!r}")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        self.top = top
        self.slots = max(top, slots if slots is not None else 3 * top)
        self.half_life = half_life
        self._rate = 1.0 / half_life
        self._clock = clock
        self._t0 = self._clock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, tenant: str, shard: str, seconds: float, now: float | None = None) -> None:
        """One transaction of *tenant* on *shard* that took *seconds*."""
        if self.slots == 0:
            return
        if now is None:
            now = self._clock()
        key = (tenant, shard)
        with self._lock:
            exponent = (now - self._t0) * self._rate
            if exponent > _MAX_EXPONENT:
                self._rescale(now)
                exponent = 0.0
            weight = 2.0**exponent
            entry = self._entries.get(key)
            if entry is None:
                entry = self._admit(key)
            entry.weight += weight
            entry.transactions += 1
            entry.seconds += seconds

    def _admit(self, key: tuple[str, str]) -> _Entry:
        """A new entry for *key*, in a free slot or in place of the least weight."""
        entries = self._entries
        if len(entries) < self.slots:
            entry = entries[key] = _Entry(0.0, 0.0)
            heapq.heappush(self._heap, (0.0, key))
            return entry
        heap = self._heap
        while True:
            weight, victim = heapq.heappop(heap)
            found = entries.get(victim)
            if found is None:
                continue  # a stale item of an entry evicted before
            if found.weight > weight:
                heapq.heappush(heap, (found.weight, victim))  # grew since: not the least
                continue
            del entries[victim]
            entry = entries[key] = _Entry(found.weight, found.weight)
            heapq.heappush(heap, (found.weight, key))
            if len(heap) > 4 * self.slots:
                self._heap = [(e.weight, k) for k, e in entries.items()]
                heapq.heapify(self._heap)
            return entry

    def _rescale(self, now: float) -> None:
        """Move ``t0`` to *now*: every weight scaled down by the factor passed."""
        factor = 2.0 ** (-(now - self._t0) * self._rate)
        for entry in self._entries.values():
            entry.weight *= factor
            entry.error *= factor
        self._heap = [(e.weight, k) for k, e in self._entries.items()]
        heapq.heapify(self._heap)
        self._t0 = now

    def busiest(self, n: int | None = None, now: float | None = None) -> list[TenantLoad]:
        """The *n* (default ``top``) entries of highest score, highest first."""
        n = self.top if n is None else n
        if now is None:
            now = self._clock()
        with self._lock:
            scale = 2.0 ** (-(now - self._t0) * self._rate)
            chosen = heapq.nlargest(n, self._entries.items(), key=lambda item: item[1].weight)
            return [
                TenantLoad(
                    tenant=tenant,
                    shard=shard,
                    transactions=entry.transactions,
                    seconds=entry.seconds,
                    score=entry.weight * scale,
                    error=entry.error * scale,
                )
                for (tenant, shard), entry in chosen
            ]

    def forget(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._heap.clear()
            self._t0 = self._clock()
