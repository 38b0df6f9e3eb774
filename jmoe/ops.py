"""Array ops the pure MoE modules build on; each picks a kernel from `pallas_kernels`."""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch as dispatch_kernels
from pallas_kernels import gmm as gmm_kernels
from pallas_kernels import rows as rows_kernels
from pallas_kernels import topk as topk_kernels


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


def top_k(x_NxS, k: int, *, implementation=None):
    """The k largest entries along the last axis and their int32 indices.

    The order of ``jax.lax.top_k`` (descending, +NaN first, ties by index); values are
    gathered from ``x``, so they are differentiable. On CPU a native kernel picks the indices
    (XLA's TopK takes about 1 us a row); see ``pallas_kernels.topk``.
    """
    return topk_kernels.top_k(x_NxS, k, implementation=implementation)


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


@jax.custom_vjp
def dispatch_rows(x_TxD, order_N, inv_TxK):
    """Sorted slot rows ``x[order // K]`` straight from the token rows (no [T*K, D] copy).

    The gradient sums each token's K slot rows, gathered through the inverse permutation:
    one pass, no scatter-add.
    """
    return x_TxD[order_N // inv_TxK.shape[1]]


def _dispatch_rows_fwd(x_TxD, order_N, inv_TxK):
    return dispatch_rows(x_TxD, order_N, inv_TxK), (order_N, inv_TxK)


def _dispatch_rows_bwd(res, d_NxD):
    _, inv_TxK = res
    dx_TxD = d_NxD[inv_TxK[:, 0]]
    for k in range(1, inv_TxK.shape[1]):
        dx_TxD = dx_TxD + d_NxD[inv_TxK[:, k]]
    return dx_TxD, None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


def _static_impl(implementation):
    """``implementation`` as a hashable nondiff argument (a list becomes a tuple)."""
    return tuple(implementation) if isinstance(implementation, list) else implementation


def _slot_tokens(order_N, inv_TxK):
    """The token of each sorted row (slot ``t * K + k`` -> ``t``)."""
    return order_N // inv_TxK.shape[1]


def dispatch_matmul(x_TxD, order_N, inv_TxK, rhs_GxDxN, group_sizes_G, *, implementation=None):
    """``grouped_matmul(dispatch_rows(x, order, inv), rhs, group_sizes)`` without the sorted
    ``[T*K, D]`` rows where the kernel gathers them itself (the native CPU kernel: the forward
    and the weight gradient read the token rows by index; elsewhere they are gathered first).

    The gradient wrt x is that of ``dispatch_rows`` (a gather by the inverse permutation and a
    sum over the K slots); the sorted rows are not kept for the backward pass.
    """
    gs = group_sizes_G.astype(jnp.int32)
    return _dispatch_matmul(x_TxD, order_N, inv_TxK, rhs_GxDxN, gs, _static_impl(implementation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _dispatch_matmul(x_TxD, order_N, inv_TxK, rhs, group_sizes_G, impl):
    rows_N = _slot_tokens(order_N, inv_TxK)
    return gmm_kernels.gmm(x_TxD, rhs, group_sizes_G, lhs_rows=rows_N, implementation=impl)


def _dispatch_matmul_fwd(x_TxD, order_N, inv_TxK, rhs, group_sizes_G, impl):
    out = _dispatch_matmul(x_TxD, order_N, inv_TxK, rhs, group_sizes_G, impl)
    return out, (x_TxD, order_N, inv_TxK, rhs, group_sizes_G)


def _dispatch_matmul_bwd(impl, res, d_NxN):
    x_TxD, order_N, inv_TxK, rhs, group_sizes_G = res
    d_NxN = d_NxN.astype(x_TxD.dtype)
    dxs_NxD = gmm_kernels.gmm(d_NxN, rhs, group_sizes_G, transpose_rhs=True, implementation=impl)
    dx_TxD = _dispatch_rows_bwd((order_N, inv_TxK), dxs_NxD)[0]
    drhs = gmm_kernels.tgmm(
        x_TxD,
        d_NxN,
        group_sizes_G,
        num_groups=rhs.shape[0],
        preferred_element_type=rhs.dtype,
        lhs_rows=_slot_tokens(order_N, inv_TxK),
        implementation=impl,
    )
    return dx_TxD, None, None, drhs, None


_dispatch_matmul.defvjp(_dispatch_matmul_fwd, _dispatch_matmul_bwd)


@jax.custom_vjp
def combine_rows(ys_NxD, order_N, inv_TxK, w_TxK):
    """``y[t] = sum_k w[t, k] * ys[inv[t, k]]`` in fp32: unsort and weighted sum in one pass.

    Gradients: ``d ys[r] = w[slot] * dy[token]`` for the slot at sorted row r (a gather by the
    permutation) and ``d w[t, k] = <ys[inv[t, k]], dy[t]>``, in one pass over the sorted rows
    (``pallas_kernels.rows.combine_grad``: a native kernel on CPU).
    """
    y_TxD = ys_NxD[inv_TxK[:, 0]].astype(jnp.float32) * w_TxK[:, :1]
    for k in range(1, inv_TxK.shape[1]):
        y_TxD = y_TxD + ys_NxD[inv_TxK[:, k]].astype(jnp.float32) * w_TxK[:, k : k + 1]
    return y_TxD


def _combine_rows_fwd(ys_NxD, order_N, inv_TxK, w_TxK):
    return combine_rows(ys_NxD, order_N, inv_TxK, w_TxK), (ys_NxD, order_N, inv_TxK, w_TxK)


def _combine_rows_bwd(res, dy_TxD):
    ys_NxD, order_N, inv_TxK, w_TxK = res
    k = inv_TxK.shape[1]
    w_N = w_TxK.reshape(-1)[order_N]
    dys_NxD, dw_N = rows_kernels.combine_grad(ys_NxD, dy_TxD, order_N // k, w_N)
    return dys_NxD, None, None, dw_N[inv_TxK].astype(w_TxK.dtype)


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def matmul_combine(
    h_NxF, rhs_GxFxD, group_sizes_G, order_N, inv_TxK, w_TxK, *, implementation=None
):
    """``combine_rows(grouped_matmul(h, rhs, group_sizes), order, inv, w)``: an expert
    product whose rows are combined per token, without the product's rows in the backward.

    The gradient never forms ``d ys`` (``w * dy`` per sorted row) or keeps ``ys``: with
    ``g = dy[token] @ rhs^T`` (one transposed grouped GEMM reading the token rows by index),
    ``d h = w * g``, ``d w = <h, g>`` (equal to ``<ys, dy>``) and
    ``d rhs = tgmm(w * h, dy[token])`` (the native CPU kernel gathers those rows itself).
    Rows past ``sum(group_sizes)`` (inactive slots, whose weight must be 0) get zero
    gradients. That backward's temporaries are ``[N, F]`` rows where the composition's are
    ``[N, D]``, so it is used where ``F < D`` (fine-grained experts; the DeepSeek-mini layer,
    ``F = D / 4``, 2-3.5% faster on CPU, BENCHMARKS.md; OLMoE-mini, ``F = D / 2``, even
    within noise with 4 MiB fewer temporaries) and the grouped-GEMM implementation reads the token
    rows by index itself (``pallas_kernels.gmm.gathers_rows``: the native CPU kernel); the
    composition elsewhere (Mixtral-mini, with ``F = 2D``: 1-3% slower and 16 MiB more
    temporaries the fused way; not measured on accelerators, whose kernels would be handed
    gathered ``[N, D]`` rows).

    Args:
      h_NxF: rows sorted by expert (the down projection's input).
      rhs_GxFxD: one weight matrix per expert.
      group_sizes_G: rows per expert.
      order_N: sorted position -> slot (``t * K + k``).
      inv_TxK: slot -> sorted position.
      w_TxK: combine weights (0 for inactive slots).
      implementation: grouped-GEMM kernel choice.

    Returns:
      ``y[t] = sum_k w[t, k] * (h @ rhs[e])[inv[t, k]]`` in fp32.
    """
    impl = _static_impl(implementation)
    args = (h_NxF, rhs_GxFxD, group_sizes_G.astype(jnp.int32), order_N, inv_TxK, w_TxK, impl)
    if h_NxF.shape[1] >= rhs_GxFxD.shape[2] or not gmm_kernels.gathers_rows(impl):
        return _gmm_then_combine(*args)
    return _matmul_combine(*args)


def _gmm_then_combine(h_NxF, rhs, group_sizes_G, order_N, inv_TxK, w_TxK, impl):
    ys_NxD = gmm_kernels.gmm(h_NxF, rhs, group_sizes_G, implementation=impl)
    return combine_rows(ys_NxD, order_N, inv_TxK, w_TxK)


_matmul_combine = functools.partial(jax.custom_vjp, nondiff_argnums=(6,))(_gmm_then_combine)


def _matmul_combine_fwd(h_NxF, rhs, group_sizes_G, order_N, inv_TxK, w_TxK, impl):
    y_TxD = _matmul_combine(h_NxF, rhs, group_sizes_G, order_N, inv_TxK, w_TxK, impl)
    return y_TxD, (h_NxF, rhs, group_sizes_G, order_N, inv_TxK, w_TxK)


def _matmul_combine_bwd(impl, res, dy_TxD):
    h_NxF, rhs, group_sizes_G, order_N, inv_TxK, w_TxK = res
    tok_N = _slot_tokens(order_N, inv_TxK)  # dy and w * h stay f32 (the native kernel's dtype)
    g_NxF = gmm_kernels.gmm(
        dy_TxD,
        rhs,
        group_sizes_G,
        transpose_rhs=True,
        lhs_rows=tok_N,
        preferred_element_type=jnp.float32,
        implementation=impl,
    )
    w_N = w_TxK.reshape(-1)[order_N].astype(jnp.float32)
    dw_N = jnp.sum(h_NxF.astype(jnp.float32) * g_NxF, axis=-1)
    dh_NxF = (g_NxF * w_N[:, None]).astype(h_NxF.dtype)
    drhs = gmm_kernels.tgmm(
        h_NxF.astype(jnp.float32) * w_N[:, None],
        dy_TxD,
        group_sizes_G,
        num_groups=rhs.shape[0],
        preferred_element_type=rhs.dtype,
        dout_rows=tok_N,
        implementation=impl,
    )
    return dh_NxF, drhs, None, None, None, dw_N[inv_TxK].astype(w_TxK.dtype)


_matmul_combine.defvjp(_matmul_combine_fwd, _matmul_combine_bwd)


def sort_by_expert(expert_ids_TxK, active_TxK, num_experts: int):
    """Slot order grouping active slots by expert (inactive slots last) and the group sizes."""
    e_N = jnp.where(active_TxK, expert_ids_TxK, num_experts).reshape(-1).astype(jnp.int32)
    order_N = dispatch_kernels.stable_order(e_N, num_experts + 1)
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
