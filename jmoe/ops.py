"""Array ops the pure MoE modules build on; each picks a kernel from `pallas_kernels`."""

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch as dispatch_kernels
from pallas_kernels import gmm as gmm_kernels


def grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G, *, implementation=None):
    """out[m] = lhs[m] @ rhs[group(m)], groups laid out contiguously; rows past the groups are 0.

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: one weight matrix per group.
      group_sizes_G: int32 rows per group (sum <= M).
      implementation: kernel name or sequence of names (see `pallas_kernels.gmm`); None picks
        the best for the backend.
    """
    return gmm_kernels.gmm(
        lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), implementation=implementation
    )


@jax.custom_vjp
def permute_rows(x_NxD, perm_N, inv_perm_N):
    """x[perm]; the gradient is a gather by the inverse permutation, not a scatter-add."""
    return x_NxD[perm_N]


def _permute_fwd(x, perm, inv):
    return x[perm], (perm, inv)


def _permute_bwd(res, dy):
    perm, inv = res
    return dy[inv], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def sort_by_expert(expert_ids_TxK, active_TxK, num_experts: int):
    """Slot order grouping active slots by expert (inactive slots last) and the group sizes."""
    e_N = jnp.where(active_TxK, expert_ids_TxK, num_experts).reshape(-1).astype(jnp.int32)
    order_N = jnp.argsort(e_N, stable=True).astype(jnp.int32)
    inv_N = jnp.zeros_like(order_N).at[order_N].set(jnp.arange(order_N.shape[0], dtype=jnp.int32))
    sizes = jnp.bincount(e_N, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order_N, inv_N, sizes


def capacity_positions(expert_ids_TxK, valid_TxK, num_experts, *, priority_TxK=None):
    """Each slot's position in its expert's buffer (-1 when not valid)."""
    return dispatch_kernels.positions(
        expert_ids_TxK, valid_TxK, num_experts, priority_TxK=priority_TxK
    )


def capacity_dispatch(
    x_TxD, expert_ids_TxK, pos_TxK, num_experts, capacity, *, implementation=None
):
    """Gathers token rows into per-expert buffers [E, C, D]; overflow slots are not written."""
    return dispatch_kernels.dispatch(
        x_TxD, expert_ids_TxK, pos_TxK, num_experts, capacity, implementation=implementation
    )


def capacity_combine(buf_ExCxD, expert_ids_TxK, pos_TxK, weights_TxK, *, implementation=None):
    """y[t] = sum_k w[t, k] * buf[e[t, k], pos[t, k]] over kept slots."""
    return dispatch_kernels.combine(
        buf_ExCxD, expert_ids_TxK, pos_TxK, weights_TxK, implementation=implementation
    )
