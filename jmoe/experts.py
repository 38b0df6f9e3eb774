"""Expert FFNs as pure functions of their weights (SwiGLU and GELU)."""

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jmoe import ops

Activation = Literal["swiglu", "gelu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


def grouped_ffn(params, xs_MxD, group_sizes_E, activation: Activation, *, implementation=None):
    """Expert FFN over rows sorted by expert, with grouped GEMMs.

    Args:
      params: `w_in` [E, D, F] (and `w_gate` [E, D, F] for SwiGLU), `w_out` [E, F, D].
      xs_MxD: rows sorted by expert; rows past sum(group_sizes) come out zero.
      group_sizes_E: rows per expert.
      activation: `swiglu` (Shazeer, 2020) or `gelu`.
      implementation: grouped-GEMM kernel choice, passed to `jmoe.ops.grouped_matmul`.
    """
    gmm = lambda a, w: ops.grouped_matmul(a, w, group_sizes_E, implementation=implementation)
    h = gmm(xs_MxD, params["w_in"])
    if activation == "swiglu":
        h = jax.nn.silu(gmm(xs_MxD, params["w_gate"])) * h
    else:
        h = jax.nn.gelu(h)
    return gmm(h, params["w_out"])


def batched_ffn(params, buf_ExCxD, activation: Activation):
    """Expert FFN over per-expert buffers [E, C, D] (capacity dispatch)."""
    h = jnp.einsum("ecd,edf->ecf", buf_ExCxD, params["w_in"])
    if activation == "swiglu":
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ExCxD, params["w_gate"])) * h
    else:
        h = jax.nn.gelu(h)
    return jnp.einsum("ecf,efd->ecd", h, params["w_out"])


def dense_ffn(params, x_TxD, activation: Activation):
    """One FFN on every token (shared experts): `w_in` [D, F], `w_gate` [D, F], `w_out` [F, D]."""
    h = x_TxD @ params["w_in"]
    if activation == "swiglu":
        h = jax.nn.silu(x_TxD @ params["w_gate"]) * h
    else:
        h = jax.nn.gelu(h)
    return h @ params["w_out"]


def dense_reference(params, x_TxD, weights_TxE, activation: Activation):
    """Every expert on every token, weighted: the oracle for the dispatchers (tests only)."""
    per_expert = jax.vmap(lambda p: dense_ffn(p, x_TxD, activation))(params)  # [E, T, D]
    return jnp.einsum("etd,te->td", per_expert, weights_TxE)
