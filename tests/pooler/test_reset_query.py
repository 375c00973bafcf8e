"""The same probes behind a PgBouncer that resets each server connection after every
transaction (``server_reset_query_always``): the session state one transaction leaves
(cursors WITH HOLD, custom settings, defaults) never reaches the next client.

This is PgBouncer's own remedy for "applications that use session features over a
transaction-pooled PgBouncer"; the reset keeps the fence's stamp (no DISCARD TEMP), so
no fence has to make it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tenantry.testing.pgbouncer import TempPgBouncer
from tests.pooler.test_probes import shard, with_hold_unfenced  # noqa: F401 (fixture)
from tests.router.conftest import APP_ROLE
from tests.router.test_probes_pg import Ctx, Seen, Shard, _no_beta, stash_beta_then_read_as_alpha

RESET = "CLOSE ALL; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DEALLOCATE ALL"


@pytest.fixture(scope="module")
def pgbouncer(pg_servers: list[str]) -> Iterator[TempPgBouncer]:
    """This module's PgBouncer in front of server 0: resets after each transaction."""
    bouncer = TempPgBouncer.start(
        pg_servers[0],
        users=("postgres", APP_ROLE),
        settings={"server_reset_query": RESET, "server_reset_query_always": "1"},
    )
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_a_with_hold_cursor_never_reaches_an_unfenced_transaction(shard: Shard) -> None:  # noqa: F811
    shard.reset()
    seen = Seen()
    try:
        with_hold_unfenced(Ctx(shard, shard.new_router(), seen))
    finally:
        shard.close_routers()
    for value in seen.values:
        _no_beta(value)


def test_a_stash_of_beta_rows_never_reaches_alpha(shard: Shard) -> None:  # noqa: F811
    shard.reset()
    seen = Seen()
    try:
        stash_beta_then_read_as_alpha(Ctx(shard, shard.new_router(), seen))
    finally:
        shard.close_routers()
    assert seen.values in ([None], [""])  # reset when beta's transaction ended
