"""``jax.lax.ragged_dot`` as a gmm implementation (a correct reference, not a fast path:
on CPU it lowers to a dense masked dot over all groups)."""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import xla


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None):
    """``out[m] = lhs[m] @ rhs[group(m)]``; rows past ``sum(group_sizes)`` are zero."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    keep = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(keep[:, None], out, 0).astype(preferred_element_type or lhs.dtype)


# ragged_dot's transpose (a ragged contracting dim) is no fast path either: the active-FLOPs
# loop.
tgmm = xla.tgmm
