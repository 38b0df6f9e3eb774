"""Public API of the dropless row movers' kernels: the combine gradient.

The dropless combine ``y[t] = sum_k w[t, k] * ys[inv[t, k]]`` (``jmoe.ops.combine_rows``) is
a gather and a weighted sum that XLA runs well; its gradient needs, per sorted row r, both
``d ys[r] = w[r] * dy[token[r]]`` and the row dot ``d w[r] = <ys[r], dy[token[r]]>``, which
XLA:CPU runs as two passes with a slow row reduction. ``combine_grad`` does both in one.
"""

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.registry import Impl, Op, native_cpu
from pallas_kernels.rows import cpu, reference

Implementation = Literal["reference", "cpu_ffi"]

OP = Op(
    "combine_grad",
    (
        Impl("reference", reference),
        # The default only where every operand is f32 (others would be copied to f32 first).
        native_cpu(cpu, preferred=lambda dtypes: all(jnp.dtype(d) == jnp.float32 for d in dtypes)),
    ),
    {"cpu": ("cpu_ffi", "reference"), "*": ("reference",)},
)
IMPLEMENTATIONS: tuple[str, ...] = OP.names


resolve_implementation = OP.resolve  # (implementation, *, dtypes) -> name


def combine_grad(
    ys_NxD: Float[Array, "n d"],
    dy_TxD: Float[Array, "t d"],
    token_N: Int[Array, " n"],
    weight_N: Float[Array, " n"],
    *,
    implementation: str | Sequence[str] | None = None,
) -> tuple[Float[Array, "n d"], Float[Array, " n"]]:
    """Both gradients of the dropless combine, per sorted row r.

    Args:
      ys_NxD: the expert outputs the forward combined, in sorted order.
      dy_TxD: the gradient of the combined output.
      token_N: the token of each sorted row, in [0, T).
      weight_N: the combine weight of each sorted row.
      implementation: "reference", "cpu_ffi", a sequence (first that applies wins) or None.

    Returns:
      ``d ys = w[:, None] * dy[token]`` (ys's dtype) and ``d w = <ys[r], dy[token[r]]>`` (f32).

    Raises:
      ValueError: mismatched shapes, or no implementation applies.
    """
    if ys_NxD.ndim != 2 or dy_TxD.ndim != 2 or ys_NxD.shape[1] != dy_TxD.shape[1]:
        raise ValueError(
            f"combine_grad: ys must be [N, D] and dy [T, D], got {ys_NxD.shape} and {dy_TxD.shape}"
        )
    n = ys_NxD.shape[0]
    if token_N.shape != (n,) or weight_N.shape != (n,):
        raise ValueError(
            f"combine_grad: token and weight must be [N={n}], got {token_N.shape} and "
            f"{weight_N.shape}"
        )
    impl = OP.resolve(implementation, dtypes=(ys_NxD.dtype, dy_TxD.dtype, weight_N.dtype))
    if impl == "reference":
        return reference.combine_grad(ys_NxD, dy_TxD, token_N, weight_N)
    f32 = lambda a: a.astype(jnp.float32)
    dys_NxD, dw_N = cpu.combine_grad(f32(ys_NxD), f32(dy_TxD), token_N, f32(weight_N))
    return dys_NxD.astype(ys_NxD.dtype), dw_N
