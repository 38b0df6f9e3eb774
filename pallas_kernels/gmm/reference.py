"""Plain-jnp grouped matmul: the test oracle for every gmm implementation."""

import jax
import jax.numpy as jnp


def group_ids(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
    """Group id of every row; rows past sum(group_sizes) get id G. Negative sizes count as 0."""
    ends_G = jnp.cumsum(jnp.maximum(group_sizes_G, 0))
    return jnp.searchsorted(ends_G, jnp.arange(num_rows), side="right").astype(jnp.int32)


def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, *, transpose_rhs=False, preferred_element_type=None):
    """out[m] = lhs[m] @ rhs[group(m)]; rows past sum(group_sizes) are zero."""
    if transpose_rhs:
        rhs_GxKxN = jnp.swapaxes(rhs_GxKxN, 1, 2)
    out_dtype = preferred_element_type or lhs_MxK.dtype
    gid_M = group_ids(group_sizes_G, lhs_MxK.shape[0])
    num_groups = rhs_GxKxN.shape[0]
    out_MxN = jnp.zeros((lhs_MxK.shape[0], rhs_GxKxN.shape[2]), jnp.float32)
    for g in range(num_groups):
        y = jnp.dot(lhs_MxK, rhs_GxKxN[g], preferred_element_type=jnp.float32)
        out_MxN = jnp.where((gid_M == g)[:, None], y, out_MxN)
    return out_MxN.astype(out_dtype)


def tgmm(lhs_MxK, dout_MxN, group_sizes_G, *, num_groups=None, preferred_element_type=None):
    """out[g] = lhs[rows of g]^T @ dout[rows of g]; empty groups give zeros."""
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    gid_M = group_ids(group_sizes_G, lhs_MxK.shape[0])
    onehot_MxG = (gid_M[:, None] == jnp.arange(num_groups)[None, :]).astype(jnp.float32)
    out = jnp.einsum(
        "mg,mk,mn->gkn", onehot_MxG, lhs_MxK.astype(jnp.float32), dout_MxN.astype(jnp.float32)
    )
    return out.astype(out_dtype)
