"""Meshes, logical-axis rules and expert parallelism over `jax.sharding` meshes."""

from jmoe.sharding.balance import (
    BALANCE_LOSS_SCOPES,
    BalanceLossScope,
    balance_loss,
    global_balance_loss,
    global_bias_update,
)
from jmoe.sharding.exchange import A2A_KINDS, A2AKind
from jmoe.sharding.expert_parallel import expert_parallel_ffn, resolve_mesh
from jmoe.sharding.mesh import MESH_AXES, MeshConfig, axis_size, batch_axes, make_mesh
from jmoe.sharding.rules import (
    DEFAULT_RULES,
    LogicallyPartitioned,
    abstract_variables,
    batch_sharding,
    logical_specs,
    mesh_shardings,
    mesh_specs,
    nnx_sharding_metadata,
    restore_targets,
    rules_for_mesh,
    sharded_init,
    with_logical_partitioning,
)

__all__ = [
    "A2A_KINDS",
    "A2AKind",
    "BALANCE_LOSS_SCOPES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "BalanceLossScope",
    "LogicallyPartitioned",
    "MeshConfig",
    "abstract_variables",
    "axis_size",
    "balance_loss",
    "batch_axes",
    "batch_sharding",
    "expert_parallel_ffn",
    "global_balance_loss",
    "global_bias_update",
    "logical_specs",
    "make_mesh",
    "mesh_shardings",
    "mesh_specs",
    "nnx_sharding_metadata",
    "resolve_mesh",
    "restore_targets",
    "rules_for_mesh",
    "sharded_init",
    "with_logical_partitioning",
]
