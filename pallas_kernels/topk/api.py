"""Public top-k API: implementation choice and argument checks.

The k largest entries along the last axis, as ``jax.lax.top_k`` returns them. The native
kernel picks only the indices; the values are gathered from the operand, so they keep its
dtype and are differentiable with respect to it (the gradient flows to the selected entries).
"""

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.registry import Impl, Op, native_cpu
from pallas_kernels.topk import cpu, reference

Implementation = Literal["reference", "cpu_ffi"]

# The native kernel does O(N + k * N / 16) work per row against a partial sort's
# O(N log k): past this k the default stays with XLA's TopK. Measured ([rows, N] k: XLA's
# TopK / native, ms): [64, 2048] 64: 0.99 / 0.42, 128: 1.70 / 0.77, 256: 2.99 / 2.29;
# [8, 8192] 512: 1.04 / 1.01.
CPU_FFI_MAX_K = 256


def _not_f32_exact(dtype, k) -> str | None:
    # f32 keys: exact for floats of at most 32 bits (f64 would be rounded, so it stays with XLA).
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize <= 4:
        return None
    return f"needs a float operand of at most 32 bits, got {dtype}"


OP = Op(
    "top_k",
    (
        Impl("reference", reference),
        native_cpu(cpu, rejects=_not_f32_exact, preferred=lambda dtype, k: k <= CPU_FFI_MAX_K),
    ),
    {"cpu": ("cpu_ffi", "reference"), "*": ("reference",)},
)
IMPLEMENTATIONS: tuple[str, ...] = OP.names


resolve_implementation = OP.resolve  # (implementation, *, dtype, k) -> name


def top_k(
    operand: Float[Array, "*batch n"],
    k: int,
    *,
    implementation: str | Sequence[str] | None = None,
) -> tuple[Float[Array, "*batch k"], Int[Array, "*batch k"]]:
    """The k largest entries along the last axis and their indices, like ``jax.lax.top_k``.

    Descending in the IEEE total order (+NaN first, -NaN last); equal values come in
    increasing index order.

    Args:
      operand: [..., N].
      k: 1 <= k <= N (static).
      implementation: "reference" (``jax.lax.top_k``), "cpu_ffi" (native CPU kernel), a
        sequence of them (first that applies wins) or None for the best available.

    Returns:
      values [..., k] (operand's dtype), indices [..., k] (int32).

    Raises:
      ValueError: k out of range, a 0-d operand, or no implementation applies.
    """
    if operand.ndim < 1:
        raise ValueError(f"top_k needs an operand with a last axis, got shape {operand.shape}")
    n = operand.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"top_k: k={k!r} must be an int with 1 <= k <= N={n}")
    return OP.select(implementation, dtype=operand.dtype, k=k).load().top_k(operand, k)
