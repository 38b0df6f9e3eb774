"""Plain-jnp gradient of the dropless combine: the oracle for the other implementations."""

import jax.numpy as jnp


def combine_grad(ys_NxD, dy_TxD, token_N, weight_N):
    """``d ys[r] = w[r] * dy[token[r]]`` and ``d w[r] = <ys[r], dy[token[r]]>`` (f32 sums)."""
    g_NxD = dy_TxD[token_N].astype(jnp.float32)
    dys_NxD = (weight_N.astype(jnp.float32)[:, None] * g_NxD).astype(ys_NxD.dtype)
    dw_N = jnp.sum(ys_NxD.astype(jnp.float32) * g_NxD, axis=-1)
    return dys_NxD, dw_N
