"""Fixtures of the evcharge example's tests (helpers are in evfleet.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_tenantry_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's TENANTRY_* settings (a catalog URL, say) must not change what these
    # tests see; the suite's own (tests/conftest.py) stay.
    kept = ("TENANTRY_TEST_PG_URLS", "TENANTRY_ALLOW_UNSAFE_ROUTING_ROLE")
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key not in kept:
            monkeypatch.delenv(key)
