"""Every database's schema in step: fleet migrations, row-level security, provisioning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantry.lazy import exports, lazy_module

if TYPE_CHECKING:
    from tenantry.migrations.fleet import FleetRun, ShardMigration, downgrade, upgrade
    from tenantry.migrations.fleet_status import FleetStatus, ShardStatus, status
    from tenantry.migrations.provision import (
        SecuredShard,
        add_secured_shard,
        provision,
        secure_shard,
    )
    from tenantry.migrations.rls import install_rls, policy_statements

__all__ = [
    "FleetRun",
    "FleetStatus",
    "SecuredShard",
    "ShardMigration",
    "ShardStatus",
    "add_secured_shard",
    "downgrade",
    "install_rls",
    "policy_statements",
    "provision",
    "secure_shard",
    "status",
    "upgrade",
]


#: Imported on first use (see tenantry.lazy).
__getattr__, __dir__ = lazy_module(
    __name__,
    exports(
        ("tenantry.migrations.fleet", ("FleetRun", "ShardMigration", "downgrade", "upgrade")),
        ("tenantry.migrations.fleet_status", ("FleetStatus", "ShardStatus", "status")),
        (
            "tenantry.migrations.provision",
            ("SecuredShard", "add_secured_shard", "provision", "secure_shard"),
        ),
        ("tenantry.migrations.rls", ("install_rls", "policy_statements")),
    ),
)
