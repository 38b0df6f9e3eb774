"""Expert FFNs as pure functions of their weights (SwiGLU and GELU)."""

from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jmoe import ops

Activation = Literal["swiglu", "gelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


def _ffn(
    matmul: Callable,
    params,
    x,
    activation: Activation,
    matmul_in: Callable | None = None,
    matmul_out: Callable | None = None,
):
    """FFN with a pluggable product: SwiGLU (Shazeer, 2020) or GELU.

    SwiGLU's gate and up projections are one product over ``w_gate_in`` ``[..., D, F, 2]``
    (gate and up interleaved per column, so sharding F keeps each pair together): on CPU one
    grouped GEMM of width 2F measured 1.04-1.39x faster than two of width F (fwd+bwd), the
    whole MoE layer 1.03-1.19x (BENCHMARKS.md, "moe layer"). ``matmul_in`` and
    ``matmul_out`` (default ``matmul``) are the input and output projections' products.
    """
    matmul_in = matmul_in or matmul
    matmul_out = matmul_out or matmul
    if activation == "swiglu":
        w = params["w_gate_in"]
        h = matmul_in(x, w.reshape(*w.shape[:-2], -1))
        h = h.reshape(*h.shape[:-1], -1, 2)
        h = jax.nn.silu(h[..., 0]) * h[..., 1]
    else:
        h = jax.nn.gelu(matmul_in(x, params["w_in"]))
    return matmul_out(h, params["w_out"])


def param_names(activation: Activation) -> tuple[str, str]:
    """Names of an FFN's (input, output) weights: ``w_gate_in`` for SwiGLU, else ``w_in``."""
    return ("w_gate_in" if activation == "swiglu" else "w_in"), "w_out"


def grouped_ffn(params, xs_MxD, group_sizes_E, activation: Activation, *, implementation=None):
    """Expert FFN over rows sorted by expert, with grouped GEMMs.

    Args:
      params: `w_gate_in` [E, D, F, 2] (SwiGLU; `w_in` [E, D, F] for GELU), `w_out` [E, F, D].
      xs_MxD: rows sorted by expert; rows past sum(group_sizes) come out zero.
      group_sizes_E: rows per expert.
      activation: `swiglu` or `gelu`.
      implementation: grouped-GEMM kernel choice, passed to `jmoe.ops.grouped_matmul`.
    """
    gmm = lambda a, w: ops.grouped_matmul(a, w, group_sizes_E, implementation=implementation)
    return _ffn(gmm, params, xs_MxD, activation)


def dispatched_ffn(
    params,
    x_TxD,
    order_N,
    inv_TxK,
    group_sizes_E,
    w_TxK,
    activation: Activation,
    *,
    implementation=None,
):
    """The dropless layer's experts from dispatch to combine: ``grouped_ffn`` of the sorted
    slot rows ``x[order // K]``, combined per token with ``w``, without materialising the
    sorted rows of either end: the input projection reads the token rows by index
    (`jmoe.ops.dispatch_matmul`) and the output projection's gradient reads each slot's token
    gradient by index (`jmoe.ops.matmul_combine`).

    Args:
      params: as for `grouped_ffn`.
      x_TxD: token rows.
      order_N: sorted position -> slot (`t * K + k`), from `jmoe.ops.sort_by_expert`.
      inv_TxK: slot -> sorted position.
      group_sizes_E: rows per expert.
      w_TxK: combine weights, 0 for inactive slots.
      activation: `swiglu` or `gelu`.
      implementation: grouped-GEMM kernel choice.

    Returns:
      ``y[t] = sum_k w[t, k] * FFN_{e(t, k)}(x[t])`` in fp32.
    """
    gmm_in = lambda a, rhs: ops.dispatch_matmul(
        a, order_N, inv_TxK, rhs, group_sizes_E, implementation=implementation
    )
    gmm_out = lambda a, rhs: ops.matmul_combine(
        a, rhs, group_sizes_E, order_N, inv_TxK, w_TxK, implementation=implementation
    )
    return _ffn(None, params, x_TxD, activation, matmul_in=gmm_in, matmul_out=gmm_out)


def batched_ffn(params, buf_ExCxD, activation: Activation):
    """Expert FFN over per-expert buffers [E, C, D] (capacity dispatch)."""
    return _ffn(lambda a, w: jnp.einsum("ecd,edf->ecf", a, w), params, buf_ExCxD, activation)


def dense_ffn(params, x_TxD, activation: Activation):
    """One FFN on every token (shared experts): `w_gate_in` [D, F, 2] (or `w_in`), `w_out`."""
    return _ffn(jnp.matmul, params, x_TxD, activation)


def dense_reference(params, x_TxD, weights_TxE, activation: Activation):
    """Every expert on every token, weighted: the oracle for the dispatchers (tests only)."""
    per_expert = jax.vmap(lambda p: dense_ffn(p, x_TxD, activation))(params)  # [E, T, D]
    return jnp.einsum("etd,te->td", per_expert, weights_TxE.astype(per_expert.dtype))
