"""Pallas Mosaic TPU kernels for the capacity dispatch/combine row primitives.

Every kernel is a row gather. The grid walks blocks of output rows (or tokens); each step reads
its block of source-row indices from SMEM (a pipelined SMEM BlockSpec, so no index array has to
fit in SMEM at once), starts one [1, D] DMA per source row from HBM into a VMEM scratch (all in
flight together, rows with index -1 skipped), waits for them, then scales / sums / dots the
rows on the vector unit. Memory traffic is exactly the rows used; nothing is one-hot.

Index arrays use -1 for "no row"; such rows read as zero.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_BLOCK_ROWS = 64


def _interpret_arg(interpret):
    """Maps `interpret=True` to `pltpu.InterpretParams()` where available."""
    if interpret is True and hasattr(pltpu, "InterpretParams"):
        return pltpu.InterpretParams()
    return interpret


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _pad_to(a, n, value):
    pad = n - a.shape[0]
    return (
        a if pad == 0 else jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value)
    )


def _copy(src_hbm, src_row, dst_vmem, dst_row, sem):
    return pltpu.make_async_copy(src_hbm.at[pl.ds(src_row, 1)], dst_vmem.at[pl.ds(dst_row, 1)], sem)


def _gather_block(idx_smem, offset, nrows, src_hbm, dst_vmem, dst_offset, sem):
    """DMAs src rows idx[offset + i] (i < nrows, idx >= 0) into dst rows dst_offset + i."""

    def start(i, carry):
        s = idx_smem[0, offset + i]

        @pl.when(s >= 0)
        def _():
            _copy(src_hbm, s, dst_vmem, dst_offset + i, sem).start()

        return carry

    def wait(i, carry):
        s = idx_smem[0, offset + i]

        @pl.when(s >= 0)
        def _():
            _copy(src_hbm, 0, dst_vmem, dst_offset + i, sem).wait()

        return carry

    jax.lax.fori_loop(0, nrows, start, 0)
    return lambda: jax.lax.fori_loop(0, nrows, wait, 0)


def _gather_rows_kernel(src_smem, scale_ref, x_hbm, out_ref, rows_vmem, sem):
    br = rows_vmem.shape[0]
    _gather_block(src_smem, 0, br, x_hbm, rows_vmem, 0, sem)()
    scale = scale_ref[...]  # [BR, 1]; 0 for empty rows
    rows = rows_vmem[...].astype(jnp.float32)
    out_ref[...] = jnp.where(scale != 0, rows * scale, 0.0).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows(x_TxD, src_R, scale_R=None, *, interpret=False):
    """out[r] = scale[r] * x[src[r]], or 0 where src[r] < 0. Grid over blocks of R rows.

    Args:
      x_TxD: source rows.
      src_R: int32 source row per output row, -1 for none.
      scale_R: optional float per-row scale.
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      [R, D] array with the dtype of `x_TxD`.
    """
    _, d = x_TxD.shape
    (r,) = src_R.shape
    br = _BLOCK_ROWS
    nb = pl.cdiv(r, br)
    src_R = _pad_to(src_R.astype(jnp.int32), nb * br, -1)
    scale_R = jnp.ones((r,), jnp.float32) if scale_R is None else scale_R.astype(jnp.float32)
    # Empty rows get scale 0 (the kernel writes zeros there, whatever the scratch holds).
    scale_Rx1 = jnp.where(src_R >= 0, _pad_to(scale_R, nb * br, 0.0), 0.0)[:, None]
    # A scale of exactly 0 zeroes a row, which matches 0 * x for finite x.
    return pl.pallas_call(
        _gather_rows_kernel,
        out_shape=jax.ShapeDtypeStruct((r, d), x_TxD.dtype),
        grid=(nb,),
        in_specs=[
            pl.BlockSpec((pl.Squeezed(), 1, br), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((br, 1), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((br, d), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((br, d), x_TxD.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=_compiler_params(("parallel",)),
        interpret=_interpret_arg(interpret),
    )(src_R.reshape(nb, 1, br), scale_Rx1, x_TxD)


def _slot_inputs(idx_TxK, w_TxK, bt):
    """Pads [T, K] slot arrays to whole token blocks.

    Returns Tp, the flat index array laid out block by block ([Tp/BT, K, BT] flattened, so a
    step's K*BT indices are one contiguous SMEM block) and weights [K, Tp, 1] (0 where empty).
    """
    t, k = idx_TxK.shape
    tp = pl.cdiv(t, bt) * bt
    idx_TpxK = _pad_to(idx_TxK.astype(jnp.int32), tp, -1)
    w_TxK = jnp.ones((t, k), jnp.float32) if w_TxK is None else w_TxK.astype(jnp.float32)
    w_TpxK = jnp.where(idx_TpxK >= 0, _pad_to(w_TxK, tp, 0.0), 0.0)
    idx_blocks = idx_TpxK.reshape(tp // bt, bt, k).transpose(0, 2, 1).reshape(-1)
    return tp, idx_blocks, w_TpxK.T[:, :, None]


def _gather_sum_kernel(idx_smem, w_ref, rows_hbm, out_ref, rows_vmem, sem, *, k):
    bt = out_ref.shape[0]
    waits = [
        _gather_block(idx_smem, s * bt, bt, rows_hbm, rows_vmem, s * bt, sem) for s in range(k)
    ]
    for wait in waits:
        wait()
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for s in range(k):
        w = w_ref[s]  # [BT, 1]; 0 for empty slots
        rows = rows_vmem[pl.ds(s * bt, bt), :].astype(jnp.float32)
        acc += jnp.where(w != 0, rows * w, 0.0)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_sum(rows_RxD, idx_TxK, w_TxK=None, *, interpret=False):
    """y[t] = sum_k w[t, k] * rows[idx[t, k]] (rows with idx < 0 skipped), f32 accumulation.

    Grid over token blocks; each step gathers its K*BT rows at once.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      w_TxK: optional per-slot weight (unit weights when None).
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      [T, D] array with the dtype of `rows_RxD`.
    """
    _, d = rows_RxD.shape
    t, k = idx_TxK.shape
    bt = _BLOCK_ROWS
    tp, idx_flat, w_KxTpx1 = _slot_inputs(idx_TxK, w_TxK, bt)
    return pl.pallas_call(
        functools.partial(_gather_sum_kernel, k=k),
        out_shape=jax.ShapeDtypeStruct((t, d), rows_RxD.dtype),
        grid=(tp // bt,),
        in_specs=[
            pl.BlockSpec((pl.Squeezed(), 1, k * bt), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((k, bt, 1), lambda i: (0, i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bt, d), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((k * bt, d), rows_RxD.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=_compiler_params(("parallel",)),
        interpret=_interpret_arg(interpret),
    )(idx_flat.reshape(tp // bt, 1, k * bt), w_KxTpx1, rows_RxD)


def _row_dot_kernel(idx_smem, valid_ref, rows_hbm, dy_ref, out_ref, rows_vmem, sem, *, k):
    bt = dy_ref.shape[0]
    waits = [
        _gather_block(idx_smem, s * bt, bt, rows_hbm, rows_vmem, s * bt, sem) for s in range(k)
    ]
    for wait in waits:
        wait()
    dy = dy_ref[...].astype(jnp.float32)
    for s in range(k):
        rows = rows_vmem[pl.ds(s * bt, bt), :].astype(jnp.float32)
        dot = jnp.sum(rows * dy, axis=-1, keepdims=True)
        out_ref[s] = jnp.where(valid_ref[s] != 0, dot, 0.0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def row_dot(rows_RxD, idx_TxK, dy_TxD, *, interpret=False):
    """dw[t, k] = <rows[idx[t, k]], dy[t]> in f32, 0 where idx < 0. Grid over token blocks.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      dy_TxD: output cotangent.
      interpret: False, True or `pltpu.InterpretParams`.

    Returns:
      float32 [T, K].
    """
    _, d = rows_RxD.shape
    t, k = idx_TxK.shape
    bt = _BLOCK_ROWS
    tp, idx_flat, valid_KxTpx1 = _slot_inputs(idx_TxK, None, bt)
    out_KxTpx1 = pl.pallas_call(
        functools.partial(_row_dot_kernel, k=k),
        out_shape=jax.ShapeDtypeStruct((k, tp, 1), jnp.float32),
        grid=(tp // bt,),
        in_specs=[
            pl.BlockSpec((pl.Squeezed(), 1, k * bt), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((k, bt, 1), lambda i: (0, i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((bt, d), lambda i: (i, 0)),
        ],
        out_specs=pl.BlockSpec((k, bt, 1), lambda i: (0, i, 0)),
        scratch_shapes=[pltpu.VMEM((k * bt, d), rows_RxD.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=_compiler_params(("parallel",)),
        interpret=_interpret_arg(interpret),
    )(idx_flat.reshape(tp // bt, 1, k * bt), valid_KxTpx1, rows_RxD, dy_TxD)
    return out_KxTpx1[:, :t, 0].T
