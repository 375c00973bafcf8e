"""Every database's schema in step: fleet migrations, row-level security, provisioning."""

from tenantry.migrations.fleet import (
    FleetRun,
    FleetStatus,
    ShardMigration,
    ShardStatus,
    downgrade,
    status,
    upgrade,
)
from tenantry.migrations.provision import provision
from tenantry.migrations.rls import install_rls, policy_statements

__all__ = [
    "FleetRun",
    "FleetStatus",
    "ShardMigration",
    "ShardStatus",
    "downgrade",
    "install_rls",
    "policy_statements",
    "provision",
    "status",
    "upgrade",
]
