"""Fast XLA (CPU) formulation of the capacity dispatch/combine row primitives.

All three primitives are gathers: no scatter-add and no one-hot tensor. Index arrays use -1
for "no row"; such rows read as zero.
"""

import jax.numpy as jnp


def _fill_index(idx, num_rows):
    """Maps -1 ("no row") to `num_rows`, out of bounds, so `mode="fill"` reads a zero row."""
    return jnp.where(idx < 0, num_rows, idx)


def gather_rows(x_TxD, src_R, scale_R=None, *, interpret=False):
    """out[r] = scale[r] * x[src[r]], or 0 where src[r] < 0.

    Args:
      x_TxD: source rows.
      src_R: int32 source row per output row, -1 for none.
      scale_R: optional float per-row scale.
      interpret: unused (kept for a uniform signature).

    Returns:
      [R, D] array with the dtype of `x_TxD`.
    """
    del interpret
    t = x_TxD.shape[0]
    out_RxD = jnp.take(x_TxD, _fill_index(src_R, t), axis=0, mode="fill", fill_value=0)
    if scale_R is not None:
        out_RxD = (out_RxD.astype(jnp.float32) * scale_R.astype(jnp.float32)[:, None]).astype(
            x_TxD.dtype
        )
    return out_RxD


def gather_sum(rows_RxD, idx_TxK, w_TxK=None, *, interpret=False):
    """y[t] = sum_k w[t, k] * rows[idx[t, k]] (rows with idx < 0 skipped), f32 accumulation.

    Written as an explicit sum over k of gathered rows: on XLA:CPU this is much faster than
    gathering [T*K, D] and reducing a reshape.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      w_TxK: optional per-slot weight (unit weights when None).
      interpret: unused.

    Returns:
      [T, D] array with the dtype of `rows_RxD`.
    """
    del interpret
    r = rows_RxD.shape[0]
    idx_TxK = _fill_index(idx_TxK, r)
    y_TxD = None
    for j in range(idx_TxK.shape[1]):
        g_TxD = jnp.take(rows_RxD, idx_TxK[:, j], axis=0, mode="fill", fill_value=0)
        g_TxD = g_TxD.astype(jnp.float32)
        if w_TxK is not None:
            g_TxD = g_TxD * w_TxK[:, j].astype(jnp.float32)[:, None]
        y_TxD = g_TxD if y_TxD is None else y_TxD + g_TxD
    return y_TxD.astype(rows_RxD.dtype)


def row_dot(rows_RxD, idx_TxK, dy_TxD, *, interpret=False):
    """dw[t, k] = <rows[idx[t, k]], dy[t]> in f32, 0 where idx < 0.

    Args:
      rows_RxD: buffer rows.
      idx_TxK: int32 row per slot, -1 for none.
      dy_TxD: output cotangent.
      interpret: unused.

    Returns:
      float32 [T, K].
    """
    del interpret
    r = rows_RxD.shape[0]
    idx_TxK = _fill_index(idx_TxK, r)
    dy_TxD = dy_TxD.astype(jnp.float32)
    cols = []
    for j in range(idx_TxK.shape[1]):
        g_TxD = jnp.take(rows_RxD, idx_TxK[:, j], axis=0, mode="fill", fill_value=0)
        cols.append(jnp.sum(g_TxD.astype(jnp.float32) * dy_TxD, axis=1))
    return jnp.stack(cols, axis=1)
