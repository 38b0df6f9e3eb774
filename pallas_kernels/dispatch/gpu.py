"""Pallas GPU (Triton lowering) kernels for the capacity dispatch/combine row primitives.

Each program owns a [rows, D-chunk] tile and loads its source rows with a vectorised gather
(`ref.at[row_idx[:, None], col_idx[None, :]]`), masked for empty rows and ragged edges, so no
operand is padded. Index arrays use -1 for "no row"; such rows read as zero.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_BLOCK_ROWS = 16
_MAX_BLOCK_D = 256


def _block_d(d):
    return min(pl.next_power_of_2(d), _MAX_BLOCK_D)


def _params(num_warps=4):
    return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def _gather_rows_kernel(src_ref, scale_ref, x_ref, out_ref, *, r, d, br, bd, has_scale):
    i = pl.program_id(0)
    j = pl.program_id(1)
    rows = i * br + jnp.arange(br)
    rmask = rows < r
    cols = j * bd + jnp.arange(bd)
    cmask = cols < d
    src = plt.load(src_ref.at[pl.ds(i * br, br)], mask=rmask, other=-1)
    valid = src >= 0
    mask = valid[:, None] & cmask[None, :]
    x = plt.load(x_ref.at[jnp.maximum(src, 0)[:, None], cols[None, :]], mask=mask, other=0)
    x = x.astype(jnp.float32)
    if has_scale:
        scale = plt.load(scale_ref.at[pl.ds(i * br, br)], mask=rmask, other=0.0)
        x = x * scale[:, None]
    x = jnp.where(mask, x, 0.0)
    plt.store(
        out_ref.at[rows[:, None], cols[None, :]],
        x.astype(out_ref.dtype),
        mask=rmask[:, None] & cmask[None, :],
    )


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_rows(x_TxD, src_R, scale_R=None, *, interpret=False):
    """out[r] = scale[r] * x[src[r]], or 0 where src[r] < 0.

    Args:
      x_TxD: source rows.
      src_R: int32 source row per output row, -1 for none.
      scale_R: optional float per-row scale.
      interpret: run in Pallas interpret mode.

    Returns:
      [R, D] array with the dtype of `x_TxD`.
    """
    _, d = x_TxD.shape
    (r,) = src_R.shape
    br, bd = _BLOCK_ROWS, _block_d(d)
    has_scale = scale_R is not None
    scale_R = jnp.ones((r,), jnp.float32) if scale_R is None else scale_R.astype(jnp.float32)
    kernel = functools.partial(_gather_rows_kernel, r=r, d=d, br=br, bd=bd, has_scale=has_scale)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((r, d), x_TxD.dtype),
        grid=(pl.cdiv(r, br), pl.cdiv(d, bd)),
        compiler_params=_params(),
        interpret=interpret,
    )(src_R.astype(jnp.int32), scale_R, x_TxD)


def _gather_sum_kernel(idx_ref, w_ref, rows_ref, out_ref, *, t, d, k, bt, bd, has_w):
    i = pl.program_id(0)
    j = pl.program_id(1)
    toks = i * bt + jnp.arange(bt)
    tmask = toks < t
    cols = j * bd + jnp.arange(bd)
    cmask = cols < d
    acc = jnp.zeros((bt, bd), jnp.float32)
    for s in range(k):
        idx = plt.load(idx_ref.at[jnp.int32(s), pl.ds(i * bt, bt)], mask=tmask, other=-1)
        mask = (idx >= 0)[:, None] & cmask[None, :]
        g = plt.load(rows_ref.at[jnp.maximum(idx, 0)[:, None], cols[None, :]], mask=mask, other=0)
        g = g.astype(jnp.float32)
        if has_w:
            w = plt.load(w_ref.at[jnp.int32(s), pl.ds(i * bt, bt)], mask=tmask, other=0.0)
            g = g * w.astype(jnp.float32)[:, None]
        acc += jnp.where(mask, g, 0.0)
    plt.store(
        out_ref.at[toks[:, None], cols[None, :]],
        acc.astype(out_ref.dtype),
        mask=tmask[:, None] & cmask[None, :],
    )


@functools.partial(jax.jit, static_argnames=("interpret",))
def gather_sum(rows_RxD, idx_TxK, w_TxK=None, *, interpret=False):
    """y[t] = sum_k w[t, k] * rows[idx[t, k]] (rows with idx < 0 skipped), f32 accumulation.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      w_TxK: optional per-slot weight (unit weights when None).
      interpret: run in Pallas interpret mode.

    Returns:
      [T, D] array with the dtype of `rows_RxD`.
    """
    _, d = rows_RxD.shape
    t, k = idx_TxK.shape
    bt, bd = _BLOCK_ROWS, _block_d(d)
    has_w = w_TxK is not None
    w_KxT = jnp.ones((k, t), jnp.float32) if w_TxK is None else w_TxK.T.astype(jnp.float32)
    kernel = functools.partial(_gather_sum_kernel, t=t, d=d, k=k, bt=bt, bd=bd, has_w=has_w)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, d), rows_RxD.dtype),
        grid=(pl.cdiv(t, bt), pl.cdiv(d, bd)),
        compiler_params=_params(),
        interpret=interpret,
    )(idx_TxK.T.astype(jnp.int32), w_KxT, rows_RxD)


def _row_dot_kernel(idx_ref, rows_ref, dy_ref, out_ref, *, t, d, k, bt, bd):
    i = pl.program_id(0)
    toks = i * bt + jnp.arange(bt)
    tmask = toks < t
    for s in range(k):
        idx = plt.load(idx_ref.at[jnp.int32(s), pl.ds(i * bt, bt)], mask=tmask, other=-1)
        valid = idx >= 0
        src = jnp.maximum(idx, 0)

        def body(c, acc, src=src, valid=valid):
            cols = c * bd + jnp.arange(bd)
            cmask = cols < d
            g = plt.load(
                rows_ref.at[src[:, None], cols[None, :]],
                mask=valid[:, None] & cmask[None, :],
                other=0,
            ).astype(jnp.float32)
            dy = plt.load(
                dy_ref.at[toks[:, None], cols[None, :]],
                mask=tmask[:, None] & cmask[None, :],
                other=0,
            ).astype(jnp.float32)
            prod = jnp.where(valid[:, None] & cmask[None, :], g * dy, 0.0)
            return acc + jnp.sum(prod, axis=1)

        acc = jax.lax.fori_loop(0, pl.cdiv(d, bd), body, jnp.zeros((bt,), jnp.float32))
        plt.store(out_ref.at[jnp.int32(s), pl.ds(i * bt, bt)], acc, mask=tmask)


@functools.partial(jax.jit, static_argnames=("interpret",))
def row_dot(rows_RxD, idx_TxK, dy_TxD, *, interpret=False):
    """dw[t, k] = <rows[idx[t, k]], dy[t]> in f32, 0 where idx < 0.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      dy_TxD: output cotangent.
      interpret: run in Pallas interpret mode.

    Returns:
      float32 [T, K].
    """
    _, d = rows_RxD.shape
    t, k = idx_TxK.shape
    bt, bd = _BLOCK_ROWS, _block_d(d)
    kernel = functools.partial(_row_dot_kernel, t=t, d=d, k=k, bt=bt, bd=bd)
    out_KxT = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k, t), jnp.float32),
        grid=(pl.cdiv(t, bt),),
        compiler_params=_params(),
        interpret=interpret,
    )(idx_TxK.T.astype(jnp.int32), rows_RxD, dy_TxD)
    return out_KxT.T
