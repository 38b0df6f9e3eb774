"""Capacity-constrained dispatch/combine: public API with implementation selection.

Index based: memory is O(T*K + E*C*D); no [T, E, C] one-hot tensor is ever built. The
buffer-slot -> slot map (the inverse of `pos`) is computed once with an int32 scatter, and every
data movement, forward and backward, is a row gather:

* `dispatch` forward gathers token rows into buffer rows; its backward is a `combine` of the
  buffer cotangent with unit weights (a gather, not a scatter-add).
* `combine` forward sums K gathered buffer rows times their weights; its backward wrt the buffer
  is a `dispatch` of `w * dy` and wrt the weights the row dot `<buf[e, pos], dy[t]>`.
"""

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import reference
from pallas_kernels.registry import Impl, Op

Implementation = Literal["reference", "xla", "triton", "mosaic_tpu"]

# What `implementation=None` picks: the Pallas kernels are verified in interpret mode and lower
# for their backends, but have not been timed against XLA's own gathers on hardware yet, so
# every backend defaults to "xla" until a benchmark (benchmarks/dispatch.py adds the backend's
# kernel to its table) shows the kernel wins.
OP = Op(
    "dispatch",
    (
        Impl("reference", reference),
        Impl("xla", "pallas_kernels.dispatch.xla"),
        Impl("triton", "pallas_kernels.dispatch.gpu", ("gpu",), interpretable=True),
        Impl("mosaic_tpu", "pallas_kernels.dispatch.tpu", ("tpu",), interpretable=True),
    ),
    {"*": ("xla",)},
)
IMPLEMENTATIONS: tuple[str, ...] = OP.names


resolve_implementation = OP.resolve  # (implementation, *, interpret=False) -> name


def _check_positive_int(value, arg):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")


def _check_slots(expert_ids_TxK, other_TxK, other_name, num_tokens=None):
    if expert_ids_TxK.ndim != 2:
        raise ValueError(f"expert_ids_TxK must have shape [T, K], got {expert_ids_TxK.shape}")
    if not jnp.issubdtype(expert_ids_TxK.dtype, jnp.integer):
        raise ValueError(f"expert_ids_TxK must be an integer array, got {expert_ids_TxK.dtype}")
    if other_TxK is not None and tuple(other_TxK.shape) != tuple(expert_ids_TxK.shape):
        raise ValueError(
            f"{other_name} must have the shape of expert_ids_TxK "
            f"{expert_ids_TxK.shape}, got {other_TxK.shape}"
        )
    if num_tokens is not None and expert_ids_TxK.shape[0] != num_tokens:
        raise ValueError(
            f"expert_ids_TxK must have T={num_tokens} rows, got {expert_ids_TxK.shape[0]}"
        )


def stable_order(keys_N, num_keys: int):
    """Stable argsort (int32) of int keys in [0, num_keys).

    Where num_keys * N fits in int32, the keys become one unique int32 each (key major, index
    minor), and sorting that is stable by construction: 0.36 ms against ``jnp.argsort``'s
    1.07 ms (a (key, iota) pair sort) for 8192 slots on CPU. Otherwise ``jnp.argsort``.
    """
    n = keys_N.shape[0]
    if num_keys * n < 2**31:
        return jax.lax.sort(keys_N.astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)) % n
    return jnp.argsort(keys_N, stable=True).astype(jnp.int32)


def positions(expert_ids_TxK, valid_TxK, num_experts, *, priority_TxK=None):
    """Each slot's position in its expert's buffer (int32); invalid slots get -1.

    Slots are ordered by token then slot (token order) or, with `priority_TxK`, by descending
    priority with ties in token order (batch-prioritised routing, V-MoE). Slots whose expert id
    is outside [0, num_experts) (e.g. null experts) count as invalid. One stable sort of T*K keys.

    Args:
      expert_ids_TxK: int expert per slot.
      valid_TxK: bool, whether the slot is routed.
      num_experts: E.
      priority_TxK: optional float priority per slot.

    Returns:
      int32 [T, K] positions.
    """
    _check_positive_int(num_experts, "num_experts")
    _check_slots(expert_ids_TxK, valid_TxK, "valid_TxK")
    if priority_TxK is not None:
        _check_slots(expert_ids_TxK, priority_TxK, "priority_TxK")
    t, k = expert_ids_TxK.shape
    n = t * k
    valid_TxK = valid_TxK & (expert_ids_TxK >= 0) & (expert_ids_TxK < num_experts)
    e_N = jnp.where(valid_TxK, expert_ids_TxK, num_experts).reshape(n).astype(jnp.int32)
    if priority_TxK is None:
        order_N = stable_order(e_N, num_experts + 1)
    else:
        # Primary key: expert; secondary: descending priority; lexsort is stable.
        order_N = jnp.lexsort((-priority_TxK.reshape(n).astype(jnp.float32), e_N))
    sorted_e_N = e_N[order_N]
    counts_E = jnp.bincount(e_N, length=num_experts + 1)
    starts_E = jnp.cumsum(counts_E) - counts_E
    pos_sorted_N = (jnp.arange(n) - starts_E[sorted_e_N]).astype(jnp.int32)
    pos_N = jnp.zeros((n,), jnp.int32).at[order_N].set(pos_sorted_N, unique_indices=True)
    return jnp.where(valid_TxK, pos_N.reshape(t, k), -1)


def dropped_count(pos_TxK, capacity):
    """Number of routed slots that overflow their expert (pos >= capacity), as int32."""
    _check_positive_int(capacity, "capacity")
    return jnp.sum(pos_TxK >= capacity, dtype=jnp.int32)


def _slot_rows(expert_ids_TxK, pos_TxK, num_experts, capacity):
    """Flat buffer row e*C+pos of each kept slot, -1 for dropped/invalid slots."""
    keep_TxK = (
        (pos_TxK >= 0)
        & (pos_TxK < capacity)
        & (expert_ids_TxK >= 0)
        & (expert_ids_TxK < num_experts)
    )
    return jnp.where(keep_TxK, expert_ids_TxK * capacity + pos_TxK, -1).astype(jnp.int32)


def _inverse_map(rows_TxK, num_rows):
    """Slot (t*K+k) held by each buffer row, -1 for empty rows: one int32 scatter of T*K."""
    n = rows_TxK.size
    rows_N = rows_TxK.reshape(n)
    rows_N = jnp.where(rows_N < 0, num_rows, rows_N)
    return (
        jnp.full((num_rows,), -1, jnp.int32)
        .at[rows_N]
        .set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dispatch(x_TxD, rows_TxK, num_experts, capacity, name, interpret):
    buf_ExCxD, _ = _dispatch_fwd(x_TxD, rows_TxK, num_experts, capacity, name, interpret)
    return buf_ExCxD


def _dispatch_fwd(x_TxD, rows_TxK, num_experts, capacity, name, interpret):
    k = rows_TxK.shape[1]
    slot_R = _inverse_map(rows_TxK, num_experts * capacity)
    tok_R = jnp.where(slot_R < 0, -1, slot_R // k)
    buf_RxD = OP[name].load().gather_rows(x_TxD, tok_R, interpret=interpret)
    return buf_RxD.reshape(num_experts, capacity, x_TxD.shape[1]), rows_TxK


def _dispatch_bwd(num_experts, capacity, name, interpret, res, dbuf_ExCxD):
    rows_TxK = res
    dbuf_RxD = dbuf_ExCxD.reshape(num_experts * capacity, dbuf_ExCxD.shape[-1])
    dx_TxD = OP[name].load().gather_sum(dbuf_RxD, rows_TxK, None, interpret=interpret)
    return dx_TxD.astype(dbuf_ExCxD.dtype), None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(buf_ExCxD, rows_TxK, weights_TxK, name, interpret):
    e, c, d = buf_ExCxD.shape
    return (
        OP[name]
        .load()
        .gather_sum(buf_ExCxD.reshape(e * c, d), rows_TxK, weights_TxK, interpret=interpret)
    )


def _combine_fwd(buf_ExCxD, rows_TxK, weights_TxK, name, interpret):
    y_TxD = _combine(buf_ExCxD, rows_TxK, weights_TxK, name, interpret)
    return y_TxD, (buf_ExCxD, rows_TxK, weights_TxK)


def _combine_bwd(name, interpret, res, dy_TxD):
    buf_ExCxD, rows_TxK, weights_TxK = res
    e, c, d = buf_ExCxD.shape
    k = rows_TxK.shape[1]
    mod = OP[name].load()
    slot_R = _inverse_map(rows_TxK, e * c)
    tok_R = jnp.where(slot_R < 0, -1, slot_R // k)
    w_R = jnp.where(slot_R < 0, 0.0, weights_TxK.reshape(-1)[jnp.maximum(slot_R, 0)])
    dy_TxD = dy_TxD.astype(buf_ExCxD.dtype)
    dbuf_RxD = mod.gather_rows(dy_TxD, tok_R, w_R.astype(jnp.float32), interpret=interpret)
    dw_TxK = mod.row_dot(buf_ExCxD.reshape(e * c, d), rows_TxK, dy_TxD, interpret=interpret)
    return dbuf_RxD.reshape(e, c, d), None, dw_TxK.astype(weights_TxK.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch(
    x_TxD,
    expert_ids_TxK,
    pos_TxK,
    num_experts,
    capacity,
    *,
    implementation: Implementation | Sequence[Implementation] | None = None,
    interpret=False,
):
    """Scatters token rows into per-expert buffers: buf[e, c] = x[t] for the slot with (e, c).

    Slots with pos < 0 or pos >= capacity (or an expert id outside [0, E)) are not written;
    unwritten buffer rows are zero. Differentiable wrt `x_TxD` (backward: a combine with unit
    weights, i.e. a gather).

    Args:
      x_TxD: token rows.
      expert_ids_TxK: int expert per slot.
      pos_TxK: int32 position per slot, from `positions`.
      num_experts: E.
      capacity: C, rows per expert buffer.
      implementation: a name in `IMPLEMENTATIONS`, a sequence of names (first that applies) or
        None (best for the backend).
      interpret: run Pallas kernels in interpret mode (bool, or `pltpu.InterpretParams` for
        "mosaic_tpu").

    Returns:
      [E, C, D] buffer with the dtype of `x_TxD`.
    """
    if x_TxD.ndim != 2:
        raise ValueError(f"x_TxD must have shape [T, D], got {x_TxD.shape}")
    _check_slots(expert_ids_TxK, pos_TxK, "pos_TxK", num_tokens=x_TxD.shape[0])
    _check_positive_int(num_experts, "num_experts")
    _check_positive_int(capacity, "capacity")
    name = OP.resolve(implementation, interpret=interpret)
    if name == "reference":
        return reference.dispatch(x_TxD, expert_ids_TxK, pos_TxK, num_experts, capacity)
    rows_TxK = _slot_rows(expert_ids_TxK, pos_TxK, num_experts, capacity)
    return _dispatch(x_TxD, rows_TxK, num_experts, capacity, name, interpret)


def combine(
    buf_ExCxD,
    expert_ids_TxK,
    pos_TxK,
    weights_TxK,
    *,
    implementation: Implementation | Sequence[Implementation] | None = None,
    interpret=False,
):
    """Gathers expert outputs back: y[t] = sum_k w[t, k] * buf[e[t, k], pos[t, k]] (kept slots).

    Accumulates in float32. Differentiable wrt `buf_ExCxD` (a dispatch of w * dy) and
    `weights_TxK` (the row dot <buf[e, pos], dy[t]>).

    Args:
      buf_ExCxD: expert output buffers.
      expert_ids_TxK: int expert per slot.
      pos_TxK: int32 position per slot.
      weights_TxK: combine weight per slot.
      implementation: as in `dispatch`.
      interpret: as in `dispatch`.

    Returns:
      [T, D] with the dtype of `buf_ExCxD`.
    """
    if buf_ExCxD.ndim != 3:
        raise ValueError(f"buf_ExCxD must have shape [E, C, D], got {buf_ExCxD.shape}")
    _check_slots(expert_ids_TxK, pos_TxK, "pos_TxK")
    _check_slots(expert_ids_TxK, weights_TxK, "weights_TxK")
    name = OP.resolve(implementation, interpret=interpret)
    if name == "reference":
        return reference.combine(buf_ExCxD, expert_ids_TxK, pos_TxK, weights_TxK)
    e, c, _ = buf_ExCxD.shape
    rows_TxK = _slot_rows(expert_ids_TxK, pos_TxK, e, c)
    return _combine(buf_ExCxD, rows_TxK, weights_TxK, name, interpret)
