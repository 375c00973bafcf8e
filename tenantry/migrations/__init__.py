"""Every database's schema in step: fleet migrations, row-level security, provisioning."""

from tenantry.migrations.fleet import FleetRun, ShardMigration, downgrade, upgrade
from tenantry.migrations.fleet_status import FleetStatus, ShardStatus, status
from tenantry.migrations.provision import SecuredShard, add_secured_shard, provision, secure_shard
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
