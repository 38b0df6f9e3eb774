"""Dispatchers: move token rows to experts and back.

`dropless`: sort the active slots by expert and run a grouped GEMM over the sorted rows;
nothing is dropped. `capacity`: per-expert buffers of C rows (C = ceil(cf * T * K / E)),
position by token order or router priority (V-MoE batch-prioritised routing); slots past C
are dropped and counted. Both are index based: no one-hot [T, E, C] tensors.
"""

import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import struct

from jmoe import ops
from jmoe.routing.types import Routing

DispatchKind = Literal["dropless", "capacity"]
DISPATCH_KINDS: tuple[str, ...] = get_args(DispatchKind)


@struct.dataclass
class DroplessPlan:
    """Slot permutation of a dropless dispatch."""

    order_N: jax.Array  # sorted position -> slot (slot = t * K + k)
    inv_N: jax.Array  # slot -> sorted position
    group_sizes_E: jax.Array


def dropless_plan(routing: Routing, num_experts: int) -> DroplessPlan:
    """The slot order grouping active slots by expert (inactive slots last)."""
    order, inv, sizes = ops.sort_by_expert(
        routing.expert_ids, routing.active(num_experts), num_experts
    )
    return DroplessPlan(order, inv, sizes)


def dropless_dispatch(x_TxD, routing: Routing, num_experts: int):
    """Returns rows sorted by expert `[T*K, D]` (inactive slots last) and the plan."""
    plan = dropless_plan(routing, num_experts)
    inv_TxK = plan.inv_N.reshape(routing.expert_ids.shape)
    return ops.dispatch_rows(x_TxD, plan.order_N, inv_TxK), plan


def weighted_sum_slots(y_TxKxD, w_TxK):
    """sum_k w[:, k] * y[:, k], accumulated in fp32 as an explicit sum over k."""
    out = y_TxKxD[:, 0].astype(jnp.float32) * w_TxK[:, :1]
    for j in range(1, y_TxKxD.shape[1]):
        out = out + y_TxKxD[:, j].astype(jnp.float32) * w_TxK[:, j : j + 1]
    return out


def combine_weights(routing: Routing, num_experts: int):
    """The routing weights of active slots, 0 for inactive ones: the combine's ``w_TxK``."""
    return jnp.where(routing.active(num_experts), routing.weights, 0.0)


def dropless_combine(ys_NxD, plan: DroplessPlan, routing: Routing, num_experts: int):
    """Unsorts expert outputs and sums each token's slots weighted by the routing weights."""
    w = combine_weights(routing, num_experts)
    y_TxD = ops.combine_rows(ys_NxD, plan.order_N, plan.inv_N.reshape(w.shape), w)
    return y_TxD.astype(ys_NxD.dtype)


def capacity(
    num_tokens: int,
    slots_per_token: int,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int = 0,
) -> int:
    """C = max(ceil(capacity_factor * T * K / E), min_capacity)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    return max(
        math.ceil(capacity_factor * num_tokens * slots_per_token / num_experts), min_capacity, 1
    )


@struct.dataclass
class CapacityPlan:
    """Buffer positions of a capacity dispatch."""

    pos_TxK: jax.Array  # position in the expert buffer; -1 for inactive slots
    capacity: int = struct.field(pytree_node=False)
    dropped: jax.Array  # number of active slots past the capacity
    active: jax.Array  # number of active slots


def capacity_dispatch(
    x_TxD,
    routing: Routing,
    num_experts: int,
    cap: int,
    *,
    batch_priority: bool = False,
    implementation=None,
):
    """Returns per-expert buffers [E, C, D] and the plan; overflow slots are dropped.

    With `batch_priority`, positions go in order of each token's largest routing weight (V-MoE,
    Riquelme et al., 2021, sec. 3.1), so the most confident tokens survive an overflow.
    """
    active = routing.active(num_experts)
    prio = None
    if batch_priority:
        top_w = jnp.max(jnp.where(active, routing.weights, -jnp.inf), axis=-1, keepdims=True)
        prio = jnp.broadcast_to(top_w, active.shape)
    pos = ops.capacity_positions(routing.expert_ids, active, num_experts, priority_TxK=prio)
    dropped = jnp.sum(pos >= cap).astype(jnp.int32)
    buf = ops.capacity_dispatch(
        x_TxD, routing.expert_ids, pos, num_experts, cap, implementation=implementation
    )
    return buf, CapacityPlan(pos, cap, dropped, jnp.sum(active).astype(jnp.int32))


def capacity_combine(
    buf_ExCxD, plan: CapacityPlan, routing: Routing, num_experts: int, *, implementation=None
):
    """Weighted sum of each token's kept slots; dropped slots contribute 0."""
    w = jnp.where(routing.active(num_experts), routing.weights, 0.0)
    return ops.capacity_combine(
        buf_ExCxD, routing.expert_ids, plan.pos_TxK, w, implementation=implementation
    )
