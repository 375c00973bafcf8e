"""Which connections the connection budget closes: those of the engine least
frequently used lately (forward-decayed lease counts), not the least recently used.

SQLite shards (files): the policy is the registry's, whatever the database; the
PostgreSQL case, with the budget binding over many dedicated databases, is in
test_engines.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tenantry import Shard, Tier, load_settings
from tenantry.router import engines
from tenantry.router.connections import server_of
from tenantry.router.engines import EngineRegistry


def _registry(tmp_path: Path, count: int) -> tuple[EngineRegistry, list[Shard]]:
    settings = load_settings(
        catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        max_engines=count + 10,
        connection_budget=count + 10,
        pool_size_dedicated=1,
        max_overflow=0,
    )
    shards = [
        Shard(f"d{i:03d}", f"sqlite:///{tmp_path / f'd{i:03d}.db'}", tier=Tier.DEDICATED)
        for i in range(count)
    ]
    return EngineRegistry(settings), shards


def _use(registry: EngineRegistry, shard: Shard, times: int = 1) -> None:
    """*times* leases of the shard's engine, each with a connection checked out and in."""
    for _ in range(times):
        with registry.lease(shard) as engine, engine.connect():
            pass


def _holds(registry: EngineRegistry, shard: Shard) -> bool:
    """Whether the shard's engine holds an idle connection (without leasing it)."""
    slot = registry._slots.get(shard.url)
    return slot is not None and slot.engine.pool.checkedin() > 0  # type: ignore[attr-defined]


def test_the_least_used_engine_closes_its_connections_not_the_least_recent(
    tmp_path: Path,
) -> None:
    registry, (hot, cold, newer) = _registry(tmp_path, 3)
    try:
        _use(registry, hot, 10)  # used most, but longest ago
        _use(registry, cold)
        _use(registry, newer)
        assert registry._dispose_idle(None)
        # least recently used: hot; least used lately: cold (one lease, before newer's)
        assert [_holds(registry, s) for s in (hot, cold, newer)] == [True, False, True]
        assert registry._dispose_idle(None)
        assert [_holds(registry, s) for s in (hot, cold, newer)] == [True, False, False]
        assert registry._dispose_idle(None)
        assert not _holds(registry, hot)
        assert not registry._dispose_idle(None)  # nothing idle is left to close
        assert registry.stats().evicted == 3
        _use(registry, cold)  # connects again: a candidate again
        assert _holds(registry, cold)
        assert registry._dispose_idle(None)
        assert not _holds(registry, cold)
    finally:
        registry.close()


def test_an_engine_in_use_keeps_its_connections(tmp_path: Path) -> None:
    registry, (busy, idle) = _registry(tmp_path, 2)
    try:
        _use(registry, busy)
        _use(registry, idle, 5)
        with registry.lease(busy):  # leased, no connection checked out: still kept
            assert registry._dispose_idle(None)
            assert _holds(registry, busy) and not _holds(registry, idle)
            assert not registry._dispose_idle(None)
    finally:
        registry.close()


def test_hot_engines_keep_their_connections_among_many_sampled(tmp_path: Path) -> None:
    """More holders than twice the sample: the victim is the least used of a random
    sample; the few hot engines are never it while colder ones hold connections."""
    count = 3 * engines.EVICTION_SAMPLE + 8
    registry, shards = _registry(tmp_path, count)
    hot, cold = shards[:4], shards[4:]
    try:
        for shard in hot:
            _use(registry, shard, 20)
        for shard in cold:
            _use(registry, shard)
        for n in range(len(cold)):
            assert registry._dispose_idle(None)
            assert all(_holds(registry, s) for s in hot), n
        assert sum(_holds(registry, s) for s in cold) == 0
    finally:
        registry.close()


def test_scores_are_rescaled_before_they_overflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each lease doubles the next one's weight: a rescale every ~10 leases here
    monkeypatch.setattr(engines, "_GROWTH", 2.0)
    monkeypatch.setattr(engines, "_RESCALE_AT", 2.0**10)
    registry, (a, b) = _registry(tmp_path, 2)
    try:
        _use(registry, a, 3)
        for _ in range(200):  # far past 2**60 without rescaling
            _use(registry, b)
        scores = [registry._slots[s.url].score for s in (a, b)]
        assert all(math.isfinite(x) and x > 0 for x in scores)
        assert registry._weight <= 2.0**10
        assert scores[0] < scores[1]
        assert registry._dispose_idle(None)
        assert not _holds(registry, a) and _holds(registry, b)
    finally:
        registry.close()


def test_a_new_engine_whose_first_lease_rescales_is_rescaled_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "_GROWTH", 2.0)
    monkeypatch.setattr(engines, "_RESCALE_AT", 2.0**10)
    registry, (old, new) = _registry(tmp_path, 2)
    try:
        _use(registry, old, 10)  # the next weight is 2**10: the next lease rescales
        _use(registry, new)  # a new engine's first lease
        assert registry._weight == 1.0
        assert registry._slots[new.url].score <= 1.0  # rescaled with the others
        _use(registry, old, 5)  # old is used more lately
        assert registry._dispose_idle(None)
        assert _holds(registry, old) and not _holds(registry, new)
    finally:
        registry.close()


def test_a_servers_share_closes_connections_of_that_server_only(tmp_path: Path) -> None:
    registry, (busy_server, quiet_server) = _registry(tmp_path, 2)  # a server per file
    try:
        _use(registry, busy_server, 10)
        _use(registry, quiet_server)
        assert registry._dispose_idle(server_of(busy_server.url))
        assert not _holds(registry, busy_server) and _holds(registry, quiet_server)
        assert not registry._dispose_idle(server_of(busy_server.url))
    finally:
        registry.close()


def _pooled_registry(tmp_path: Path, count: int) -> tuple[EngineRegistry, list[Shard]]:
    """Engines whose pools keep up to three connections."""
    registry, shards = _registry(tmp_path, count)
    registry._settings = registry._settings.model_copy(update={"pool_size_dedicated": 3})
    return registry, shards


def _use_two_at_once(registry: EngineRegistry, shard: Shard, times: int = 1) -> None:
    """*times* pairs of overlapping leases, each with its own connection."""
    for _ in range(times):
        with registry.lease(shard) as first, first.connect():
            with registry.lease(shard) as second, second.connect():
                pass


def _held(registry: EngineRegistry, shard: Shard) -> int:
    slot = registry._slots.get(shard.url)
    return 0 if slot is None else engines._held(slot.engine.pool)


def test_a_rarely_needed_second_connection_closes_before_a_databases_only_one(
    tmp_path: Path,
) -> None:
    registry, (hot, warm) = _pooled_registry(tmp_path, 2)
    try:
        _use(registry, hot, 20)
        _use_two_at_once(registry, hot)  # two at once, once: hot holds two
        _use(registry, warm, 3)
        assert (_held(registry, hot), _held(registry, warm)) == (2, 1)
        connections = registry.stats().connections
        assert registry.stats().surplus == 1
        assert registry._dispose_idle(None)
        # hot's second connection (needed once) went, not warm's only one (3 leases)
        assert (_held(registry, hot), _held(registry, warm)) == (1, 1)
        assert registry.stats().connections == connections - 1  # counted closed
        assert registry.stats().surplus == 0
        assert registry._dispose_idle(None)
        assert (_held(registry, hot), _held(registry, warm)) == (1, 0)
    finally:
        registry.close()


def test_a_second_connection_often_needed_is_kept(tmp_path: Path) -> None:
    registry, (hot, warm) = _pooled_registry(tmp_path, 2)
    try:
        _use_two_at_once(registry, hot, 10)  # two at once, often
        _use(registry, warm, 3)
        assert registry._dispose_idle(None)
        assert (_held(registry, hot), _held(registry, warm)) == (2, 0)
        assert registry._dispose_idle(None)  # then the second: 10 pairs, against 20 leases
        assert _held(registry, hot) == 1
    finally:
        registry.close()


def test_an_idle_second_connection_closes_while_the_first_is_in_use(tmp_path: Path) -> None:
    registry, (hot, warm) = _pooled_registry(tmp_path, 2)
    try:
        _use(registry, warm, 50)
        _use_two_at_once(registry, hot)
        with registry.lease(hot) as engine, engine.connect():  # one of hot's two in use
            assert registry._dispose_idle(None)
            assert _held(registry, hot) == 1 and _held(registry, warm) == 1
            assert registry._dispose_idle(None)  # then warm's: hot's last is in use
            assert _held(registry, hot) == 1 and _held(registry, warm) == 0
            assert not registry._dispose_idle(None)
    finally:
        registry.close()


def test_connects_are_noted_once_per_engine_until_room_is_made(tmp_path: Path) -> None:
    """Without a binding budget nothing takes the noted engines in: a connection that
    closes on its return and opens again (beyond the pool's size) must not add to the
    notes each time."""
    registry, (shard,) = _registry(tmp_path, 1)
    registry._settings = registry._settings.model_copy(update={"max_overflow": 2})
    try:
        for _ in range(20):
            _use_two_at_once(registry, shard)  # the second connects and closes each time
        assert len(registry._connected_slots) == 1
        assert registry._dispose_idle(None)
        assert len(registry._connected_slots) == 0
    finally:
        registry.close()


def test_a_disposed_engine_leaves_the_candidates(tmp_path: Path) -> None:
    registry, (hot, warm) = _pooled_registry(tmp_path, 2)
    try:
        _use_two_at_once(registry, hot, 10)
        _use(registry, warm)
        assert registry._dispose_idle(None)  # warm's: hot's two are needed more
        slot = registry._slots[hot.url]
        assert registry._surplus == {slot}
        registry.dispose(hot.url)
        assert not registry._surplus and slot.holding < 0
    finally:
        registry.close()
