"""Rebalancing the shared pool: tenant sizes, plans (pure functions) and applying a
plan through the mover. Rebalancing runs moves; no move needs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantry.lazy import exports, lazy_module

if TYPE_CHECKING:
    from tenantry.rebalance.apply import AppliedMove, apply_plan, plan_for, start_drain
    from tenantry.rebalance.planner import (
        BASE_FRACTION,
        BY_COUNT,
        BY_SIZE,
        STRATEGIES,
        CostFunction,
        Plan,
        PlannedMove,
        TenantSize,
        base_cost,
        by_count,
        by_size,
        by_size_and_count,
        plan_rebalance,
        spread,
    )
    from tenantry.rebalance.sizes import measure_shard, measure_sizes, stale_sizes, stored_sizes

__all__ = [
    "BASE_FRACTION",
    "BY_COUNT",
    "BY_SIZE",
    "STRATEGIES",
    "AppliedMove",
    "CostFunction",
    "Plan",
    "PlannedMove",
    "TenantSize",
    "apply_plan",
    "base_cost",
    "by_count",
    "by_size",
    "by_size_and_count",
    "measure_shard",
    "measure_sizes",
    "plan_for",
    "plan_rebalance",
    "spread",
    "stale_sizes",
    "start_drain",
    "stored_sizes",
]


#: Imported on first use (see tenantry.lazy).
__getattr__, __dir__ = lazy_module(
    __name__,
    exports(
        ("tenantry.rebalance.apply", ("AppliedMove", "apply_plan", "plan_for", "start_drain")),
        (
            "tenantry.rebalance.planner",
            (
                "BASE_FRACTION",
                "BY_COUNT",
                "BY_SIZE",
                "STRATEGIES",
                "CostFunction",
                "Plan",
                "PlannedMove",
                "TenantSize",
                "base_cost",
                "by_count",
                "by_size",
                "by_size_and_count",
                "plan_rebalance",
                "spread",
            ),
        ),
        (
            "tenantry.rebalance.sizes",
            ("measure_shard", "measure_sizes", "stale_sizes", "stored_sizes"),
        ),
    ),
)
