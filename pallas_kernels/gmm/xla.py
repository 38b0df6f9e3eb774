"""Fast XLA (CPU) grouped matmul that only does the active FLOPs.

Rows of ``lhs`` are sorted by group. Each group is cut into chunks of ``tm`` rows that start
at the group's first row (a chunk may run into the next group; those rows are masked out of
the store). A dynamic-trip-count ``lax.while_loop`` visits the chunks in order: one
``[tm, K] x [K, N]`` dot per chunk against that group's weights, sliced in place with
``lax.dynamic_slice`` (no weight gather is materialised). The number of visits is
``sum_g ceil(size_g / tm) <= ceil(M / tm) + G``, so the work is the active FLOPs plus at most
``tm - 1`` padded rows per non-empty group, and empty groups cost nothing.

``jax.lax.ragged_dot`` on CPU lowers to a dense masked dot over all G groups (G times the
active FLOPs), which is why this path exists.
"""

import jax
import jax.numpy as jnp
from jax import lax


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """Rows per chunk: about the mean group size, clipped to [16, 256], a power of two.

    Args:
      num_rows: M, rows of the grouped matmul.
      num_groups: G.

    Returns:
      The chunk height, at most ``num_rows``.
    """
    mean = max(1, num_rows // max(1, num_groups))
    tm = 16
    while tm < 256 and tm * 2 <= mean:
        tm *= 2
    return max(1, min(tm, num_rows))


def _visits(group_sizes_G: jax.Array, num_rows: int, tm: int):
    """Chunk schedule: for each visit its group, chunk start row and the group's row range.

    Returns:
      (num_visits, group_V, start_V, lo_V, hi_V), V = ceil(M / tm) + G (static upper bound);
      visit v owns rows [lo_V[v], hi_V[v]) of the chunk starting at start_V[v].
      Visits past ``num_visits`` hold junk and are never executed.
    """
    num_groups = group_sizes_G.shape[0]
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    sizes_G = ends_G - starts_G
    chunks_G = (sizes_G + tm - 1) // tm
    chunk_ends_G = jnp.cumsum(chunks_G)
    max_visits = -(-num_rows // tm) + num_groups
    v_V = jnp.arange(max_visits, dtype=jnp.int32)
    group_V = jnp.searchsorted(chunk_ends_G, v_V, side="right").astype(jnp.int32)
    group_V = jnp.minimum(group_V, num_groups - 1)
    j_V = v_V - (chunk_ends_G[group_V] - chunks_G[group_V])
    chunk_start_V = starts_G[group_V] + j_V * tm
    # The last chunk is shifted back to stay inside [0, M); its rows before the unshifted
    # start belong to the previous chunk and are masked out (lo_V).
    start_V = jnp.minimum(chunk_start_V, num_rows - tm)
    return chunk_ends_G[-1], group_V, start_V, chunk_start_V, ends_G[group_V]


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    tile_rows: int | None = None,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[group(m)] (rhs[g] is [N, K] when ``transpose_rhs``).

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: per-group weights, ``[G, N, K]`` if ``transpose_rhs``.
      group_sizes_G: int32 rows per group; rows past the sum come out zero.
      transpose_rhs: contract with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is f32.
      tile_rows: chunk height (default ``default_tile_rows``).

    Returns:
      ``[M, N]``.
    """
    num_rows = lhs_MxK.shape[0]
    num_groups = rhs_GxKxN.shape[0]
    n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if num_rows == 0:
        return jnp.zeros((0, n), out_dtype)
    tm = tile_rows or default_tile_rows(num_rows, num_groups)
    tm = min(tm, num_rows)
    num_visits, group_V, start_V, lo_V, hi_V = _visits(group_sizes_G, num_rows, tm)
    rhs_contract = 2 if transpose_rhs else 1
    acc_dtype = jnp.float32
    row_t = jnp.arange(tm, dtype=jnp.int32)

    def body(v, out_MxN):
        g, s = group_V[v], start_V[v]
        x_TxK = lax.dynamic_slice_in_dim(lhs_MxK, s, tm, axis=0)
        w = lax.dynamic_index_in_dim(rhs_GxKxN, g, axis=0, keepdims=False)
        y_TxN = lax.dot_general(
            x_TxK, w, (((1,), (rhs_contract - 1,)), ((), ())), preferred_element_type=acc_dtype
        ).astype(out_dtype)
        rows_t = s + row_t
        keep_t = (rows_t >= lo_V[v]) & (rows_t < hi_V[v])
        old_TxN = lax.dynamic_slice_in_dim(out_MxN, s, tm, axis=0)
        new_TxN = jnp.where(keep_t[:, None], y_TxN, old_TxN)
        return lax.dynamic_update_slice_in_dim(out_MxN, new_TxN, s, axis=0)

    out_MxN = jnp.zeros((num_rows, n), out_dtype)
    return lax.fori_loop(0, num_visits, body, out_MxN)


def tgmm(
    lhs_MxK: jax.Array,
    dout_MxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    tile_rows: int | None = None,
) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ dout[rows of g]; empty groups give zeros.

    Args:
      lhs_MxK: rows sorted by group.
      dout_MxN: same rows.
      group_sizes_G: int32 rows per group.
      num_groups: G (default ``group_sizes_G.shape[0]``).
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is f32.
      tile_rows: chunk height.

    Returns:
      ``[G, K, N]``.
    """
    num_rows, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    acc_GxKxN = jnp.zeros((num_groups, k, n), jnp.float32)
    if num_rows == 0:
        return acc_GxKxN.astype(out_dtype)
    tm = tile_rows or default_tile_rows(num_rows, num_groups)
    tm = min(tm, num_rows)
    sizes_G = group_sizes_G[:num_groups]
    num_visits, group_V, start_V, lo_V, hi_V = _visits(sizes_G, num_rows, tm)
    row_t = jnp.arange(tm, dtype=jnp.int32)

    def body(v, carry):
        acc_GxKxN, run_KxN = carry
        g, s = group_V[v], start_V[v]
        rows_t = s + row_t
        keep_t = (rows_t >= lo_V[v]) & (rows_t < hi_V[v])
        x_TxK = lax.dynamic_slice_in_dim(lhs_MxK, s, tm, axis=0)
        x_TxK = jnp.where(keep_t[:, None], x_TxK, jnp.zeros_like(x_TxK))
        dy_TxN = lax.dynamic_slice_in_dim(dout_MxN, s, tm, axis=0)
        upd_KxN = lax.dot_general(
            x_TxK, dy_TxN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        # Visits of one group are consecutive: keep a running sum and store it (no re-read).
        first = (v == 0) | (group_V[jnp.maximum(v - 1, 0)] != g)
        run_KxN = jnp.where(first, upd_KxN, run_KxN + upd_KxN)
        acc_GxKxN = lax.dynamic_update_index_in_dim(acc_GxKxN, run_KxN, g, axis=0)
        return acc_GxKxN, run_KxN

    run_KxN = jnp.zeros((k, n), jnp.float32)
    acc_GxKxN, _ = lax.fori_loop(0, num_visits, body, (acc_GxKxN, run_KxN))
    return acc_GxKxN.astype(out_dtype)
