"""Row exchanges of the expert-parallel layer: padded and ragged all-to-alls, buffer bounds.

Every exchange has a gather-shaped gradient: the reverse exchange, or a gather by the
inverse row map, never a scatter-add.
"""

import math
from functools import partial
from typing import Literal, get_args

import jax
import jax.numpy as jnp


@jax.custom_vjp
def masked_gather_rows(x_NxD, idx_M, valid_M, inv_idx_N, inv_valid_N):
    """out[i] = x[idx[i]] where valid[i] else 0, for an injective partial map.

    `inv_idx[r]` is the output row that reads x row r (valid where one does); the gradient is
    then a gather by the inverse map instead of a scatter-add.
    """
    n = x_NxD.shape[0]
    return jnp.where(valid_M[:, None], x_NxD[jnp.clip(idx_M, 0, n - 1)], 0).astype(x_NxD.dtype)


def _mgr_fwd(x, idx, valid, inv_idx, inv_valid):
    return masked_gather_rows(x, idx, valid, inv_idx, inv_valid), (idx, valid, inv_idx, inv_valid)


def _mgr_bwd(res, dy):
    idx, valid, inv_idx, inv_valid = res
    return masked_gather_rows(dy, inv_idx, inv_valid, idx, valid), None, None, None, None


masked_gather_rows.defvjp(_mgr_fwd, _mgr_bwd)


def dropless_buffer_rows(t_local: int, k: int, num_experts: int, p: int, buffer_factor=None):
    """B: rows per (source, destination) block of the padded dropless all-to-all."""
    exact = t_local * min(k, num_experts // p)
    if buffer_factor is None:
        return max(exact, 1)
    return max(1, min(exact, math.ceil(buffer_factor * t_local * k / p)))


def capacity_buffer_rows(t_local: int, k: int, num_experts: int, cap: int, buffer_factor=None):
    """B: rows per (source, expert) block of the capacity all-to-all."""
    exact = min(cap, t_local)
    if buffer_factor is None:
        return max(exact, 1)
    return max(1, min(exact, math.ceil(buffer_factor * t_local * k / num_experts)))


def all_to_all(x, axis):
    """Tiled all-to-all of the leading axis over `axis` (block p goes to device p)."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


A2AKind = Literal["auto", "padded", "ragged", "ragged_emulated"]
A2A_KINDS: tuple[str, ...] = get_args(A2AKind)


def resolve_a2a(kind: str = "auto") -> str:
    """`auto`: `ragged` where XLA implements `ragged-all-to-all` (TPU, GPU), else `padded`."""
    if kind not in A2A_KINDS:
        raise ValueError(f"a2a={kind!r} is not one of {A2A_KINDS}")
    if kind == "auto":
        return "ragged" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "padded"
    return kind


def _emulated_ragged_all_to_all(x, out, in_off, send_sizes, out_off, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` semantics from a padded all-to-all (tests on XLA:CPU)."""
    n, p = x.shape[0], send_sizes.shape[0]
    i = jnp.arange(n)
    blocks = jnp.where(
        (i[None, :] < send_sizes[:, None])[..., None],
        x[jnp.clip(in_off[:, None] + i[None, :], 0, n - 1)],
        0,
    )
    recv = all_to_all(blocks, axis_name)  # [P (source), N, D]
    src_off = all_to_all(out_off, axis_name)  # where each source writes in my buffer
    r = jnp.arange(out.shape[0])
    for q in range(p):
        j = r - src_off[q]
        hit = (j >= 0) & (j < recv_sizes[q])
        out = jnp.where(hit[:, None], recv[q, jnp.clip(j, 0, n - 1)], out)
    return out


def _ragged(x, out_rows, in_off, send_sizes, out_off, recv_sizes, axis, emulate):
    out = jnp.zeros((out_rows, x.shape[1]), x.dtype)
    fn = _emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all
    return fn(x, out, in_off, send_sizes, out_off, recv_sizes, axis_name=axis)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def ragged_exchange(x, in_off, send_sizes, out_off, recv_off, recv_sizes, out_rows, axis, emulate):
    """Sends rows x[in_off[p]:+send_sizes[p]] to device p at its out_off[p] (over `axis`).

    `recv_off[q]`/`recv_sizes[q]` describe where source q's rows land in this device's
    [out_rows, D] output. The gradient is the reverse exchange (roles swapped).
    """
    return _ragged(x, out_rows, in_off, send_sizes, out_off, recv_sizes, axis, emulate)


def _rx_fwd(x, in_off, send_sizes, out_off, recv_off, recv_sizes, out_rows, axis, emulate):
    y = _ragged(x, out_rows, in_off, send_sizes, out_off, recv_sizes, axis, emulate)
    return y, (x.shape[0], in_off, send_sizes, recv_off, recv_sizes)


def _rx_bwd(out_rows, axis, emulate, res, dy):
    n, in_off, send_sizes, recv_off, recv_sizes = res
    # Back to each source q, from my recv_off[q], into its in_off (as q sees it).
    src_in_off = all_to_all(in_off, axis)
    dx = _ragged(dy, n, recv_off, recv_sizes, src_in_off, send_sizes, axis, emulate)
    return dx, None, None, None, None, None


ragged_exchange.defvjp(_rx_fwd, _rx_bwd)


def ragged_buffer_rows(t_local: int, k: int, num_experts: int, p: int, buffer_factor=None):
    """R: rows a device can receive in the ragged dropless exchange."""
    exact = p * t_local * min(k, num_experts // p)
    if buffer_factor is None:
        return max(exact, 1)
    return max(1, min(exact, math.ceil(buffer_factor * t_local * k)))
