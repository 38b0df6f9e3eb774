"""Pallas Mosaic TPU kernels for the capacity dispatch/combine row primitives.

Every kernel is a row gather driven by scalar-prefetched index arrays: the grid walks output
rows (or token x slot pairs) and the input BlockSpec's index map reads the source row from the
prefetched map in SMEM, so Pallas DMAs exactly the needed [1, D] row. Consecutive empty rows map
to the same (clamped) block index, so their fetch is skipped by the pipeline.

Index arrays use -1 for "no row"; such rows read as zero.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _interpret_arg(interpret):
    """Maps `interpret=True` to `pltpu.InterpretParams()` where available."""
    if interpret is True and hasattr(pltpu, "InterpretParams"):
        return pltpu.InterpretParams()
    return interpret


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _gather_rows_kernel(src_ref, scale_ref, x_ref, out_ref, *, has_scale):
    r = pl.program_id(0)
    valid = src_ref[r] >= 0
    row = x_ref[...].astype(jnp.float32)
    if has_scale:
        row = row * scale_ref[r]
    out_ref[...] = jnp.where(valid, row, 0.0).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows(x_TxD, src_R, scale_R=None, *, interpret=False):
    """out[r] = scale[r] * x[src[r]], or 0 where src[r] < 0. Grid over the R output rows.

    Args:
      x_TxD: source rows.
      src_R: int32 source row per output row, -1 for none.
      scale_R: optional float per-row scale.
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      [R, D] array with the dtype of `x_TxD`.
    """
    t, d = x_TxD.shape
    (r,) = src_R.shape
    has_scale = scale_R is not None
    scale_R = jnp.ones((r,), jnp.float32) if scale_R is None else scale_R.astype(jnp.float32)
    kernel = functools.partial(_gather_rows_kernel, has_scale=has_scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((r, 1, d), x_TxD.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(r,),
            in_specs=[
                pl.BlockSpec(
                    (pl.Squeezed(), 1, d), lambda i, src, scale: (jnp.maximum(src[i], 0), 0, 0)
                )
            ],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, d), lambda i, src, scale: (i, 0, 0)),
        ),
        compiler_params=_compiler_params(("parallel",)),
        interpret=_interpret_arg(interpret),
    )(src_R.astype(jnp.int32), scale_R, x_TxD.reshape(t, 1, d))
    return out.reshape(r, d)


def _gather_sum_kernel(idx_ref, w_ref, rows_ref, out_ref, acc_ref, *, num_slots, has_w):
    t = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    n = t * num_slots + j
    row = rows_ref[...].astype(jnp.float32)
    if has_w:
        row = row * w_ref[n]

    @pl.when(idx_ref[n] >= 0)
    def _():
        acc_ref[...] += row

    @pl.when(j == num_slots - 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_sum(rows_RxD, idx_TxK, w_TxK=None, *, interpret=False):
    """y[t] = sum_k w[t, k] * rows[idx[t, k]] (rows with idx < 0 skipped), f32 accumulation.

    Grid (T, K) with K innermost: the output block stays resident while the K rows are summed.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      w_TxK: optional per-slot weight (unit weights when None).
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      [T, D] array with the dtype of `rows_RxD`.
    """
    r, d = rows_RxD.shape
    t, k = idx_TxK.shape
    has_w = w_TxK is not None
    w_N = jnp.ones((t * k,), jnp.float32) if w_TxK is None else w_TxK.reshape(-1)
    kernel = functools.partial(_gather_sum_kernel, num_slots=k, has_w=has_w)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, 1, d), rows_RxD.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(t, k),
            in_specs=[
                pl.BlockSpec(
                    (pl.Squeezed(), 1, d),
                    lambda i, j, idx, w: (jnp.maximum(idx[i * k + j], 0), 0, 0),
                )
            ],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, d), lambda i, j, idx, w: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, d), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
    )(idx_TxK.reshape(-1).astype(jnp.int32), w_N.astype(jnp.float32), rows_RxD.reshape(r, 1, d))
    return out.reshape(t, d)


def _row_dot_kernel(idx_ref, rows_ref, dy_ref, out_ref, acc_ref, *, num_slots):
    t = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    prod = rows_ref[...].astype(jnp.float32) * dy_ref[...].astype(jnp.float32)
    s = jnp.sum(prod, axis=-1, keepdims=True)
    s = jnp.where(idx_ref[t * num_slots + j] >= 0, s, 0.0)
    lane = jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 1)
    acc_ref[...] = jnp.where(lane == j, s, acc_ref[...])

    @pl.when(j == num_slots - 1)
    def _():
        out_ref[...] = acc_ref[...]


@functools.partial(jax.jit, static_argnames=("interpret",))
def row_dot(rows_RxD, idx_TxK, dy_TxD, *, interpret=False):
    """dw[t, k] = <rows[idx[t, k]], dy[t]> in f32, 0 where idx < 0. Grid (T, K).

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      dy_TxD: output cotangent.
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      float32 [T, K].
    """
    r, d = rows_RxD.shape
    t, k = idx_TxK.shape
    kernel = functools.partial(_row_dot_kernel, num_slots=k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, 1, k), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(t, k),
            in_specs=[
                pl.BlockSpec(
                    (pl.Squeezed(), 1, d),
                    lambda i, j, idx: (jnp.maximum(idx[i * k + j], 0), 0, 0),
                ),
                pl.BlockSpec((pl.Squeezed(), 1, d), lambda i, j, idx: (i, 0, 0)),
            ],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, k), lambda i, j, idx: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, k), jnp.float32)],
        ),
        compiler_params=_compiler_params(("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
    )(idx_TxK.reshape(-1).astype(jnp.int32), rows_RxD.reshape(r, 1, d), dy_TxD.reshape(t, 1, d))
    return out.reshape(t, k)
