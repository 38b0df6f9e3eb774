"""Portable XLA grouped matmul that only does the active FLOPs (any backend, any dtype).

On CPU the default is the native FFI kernel (``cpu.py``); this loop is the fallback where that
kernel cannot be built (no C++ compiler), and ``implementation="xla"`` selects it anywhere.

Rows of ``lhs`` are sorted by group. Each group is cut into chunks that start at the group's
first row: ``size // tb`` full chunks of ``tb`` rows, then the remainder in chunks of ``ts``
rows (``ts < tb``; a remainder chunk may run into the next group, and those rows are masked
out of the store). Dynamic-trip-count ``fori_loop``s visit the chunks in order: one
``[t, K] x [K, N]`` dot per chunk against that group's weights, sliced in place with
``lax.dynamic_slice`` (no weight gather is materialised). The work is the active FLOPs plus
at most ``ts - 1`` padded rows per non-empty group, and empty groups cost nothing.

``jax.lax.ragged_dot`` on CPU lowers to a dense masked dot over all G groups (G times the
active FLOPs), which is why this path exists.
"""

import jax
import jax.numpy as jnp
from jax import lax


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """Rows per full chunk: about the mean group size, clipped to [16, 256], a power of two.

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


def _group_ranges(group_sizes_G: jax.Array, num_rows: int):
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows).astype(jnp.int32)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    return starts_G, ends_G


def _schedules(group_sizes_G, num_rows, tb, ts):
    """One or two chunk schedules (full ``tb`` chunks, then ``ts`` chunks of the remainders)."""
    starts_G, ends_G = _group_ranges(group_sizes_G, num_rows)
    if ts >= tb:
        return [_visits(starts_G, ends_G, num_rows, tb, -(-num_rows // tb) + len(starts_G))]
    mid_G = starts_G + (ends_G - starts_G) // tb * tb
    return [
        _visits(starts_G, mid_G, num_rows, tb, num_rows // tb),
        _visits(mid_G, ends_G, num_rows, ts, -(-num_rows // ts) + len(starts_G)),
    ]


def _visits(lo_G: jax.Array, hi_G: jax.Array, num_rows: int, tm: int, max_visits: int):
    """Chunk schedule over the row ranges ``[lo_G, hi_G)`` in ``tm``-row chunks.

    Returns:
      (num_visits, group_V, start_V, lo_V, hi_V) with static length ``max_visits``; visit v
      owns rows ``[lo_V[v], hi_V[v])`` of the chunk starting at ``start_V[v]``. Visits past
      ``num_visits`` hold junk and are never executed.
    """
    num_groups = lo_G.shape[0]
    chunks_G = (hi_G - lo_G + tm - 1) // tm
    chunk_ends_G = jnp.cumsum(chunks_G)
    max_visits = max(max_visits, 1)
    v_V = jnp.arange(max_visits, dtype=jnp.int32)
    group_V = jnp.searchsorted(chunk_ends_G, v_V, side="right").astype(jnp.int32)
    group_V = jnp.minimum(group_V, num_groups - 1)
    j_V = v_V - (chunk_ends_G[group_V] - chunks_G[group_V])
    chunk_start_V = lo_G[group_V] + j_V * tm
    # A chunk past the end of the rows is shifted back to stay inside [0, M); its rows before
    # the unshifted start belong to an earlier chunk and are masked out (lo_V).
    start_V = jnp.minimum(chunk_start_V, num_rows - tm)
    return chunk_ends_G[-1], group_V, start_V, chunk_start_V, hi_G[group_V]


def _tiles(num_rows, num_groups, tile_rows, small_tile_rows):
    tb = min(tile_rows or default_tile_rows(num_rows, num_groups), num_rows)
    ts = small_tile_rows or max(16, tb // 4)
    return tb, min(ts, tb)


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    tile_rows: int | None = None,
    small_tile_rows: int | None = None,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[group(m)] (rhs[g] is [N, K] when ``transpose_rhs``).

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: per-group weights, ``[G, N, K]`` if ``transpose_rhs``.
      group_sizes_G: int32 rows per group; rows past the sum come out zero.
      transpose_rhs: contract with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is f32.
      tile_rows: full-chunk height (default ``default_tile_rows``).
      small_tile_rows: remainder-chunk height (default ``max(16, tile_rows // 4)``; a value
        >= ``tile_rows`` gives a single schedule of ``tile_rows`` chunks).

    Returns:
      ``[M, N]``.
    """
    num_rows = lhs_MxK.shape[0]
    num_groups = rhs_GxKxN.shape[0]
    n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if num_rows == 0:
        return jnp.zeros((0, n), out_dtype)
    tb, ts = _tiles(num_rows, num_groups, tile_rows, small_tile_rows)
    rhs_contract = 2 if transpose_rhs else 1
    out_MxN = jnp.zeros((num_rows, n), out_dtype)
    for tm, (num_visits, group_V, start_V, lo_V, hi_V) in zip(
        (tb, ts), _schedules(group_sizes_G, num_rows, tb, ts), strict=False
    ):
        row_t = jnp.arange(tm, dtype=jnp.int32)

        def body(
            v, out_MxN, tm=tm, group_V=group_V, start_V=start_V, lo_V=lo_V, hi_V=hi_V, row_t=row_t
        ):
            g, s = group_V[v], start_V[v]
            x_TxK = lax.dynamic_slice_in_dim(lhs_MxK, s, tm, axis=0)
            w = lax.dynamic_index_in_dim(rhs_GxKxN, g, axis=0, keepdims=False)
            dims = (((1,), (rhs_contract - 1,)), ((), ()))
            y_TxN = lax.dot_general(x_TxK, w, dims, preferred_element_type=jnp.float32)
            rows_t = s + row_t
            keep_t = (rows_t >= lo_V[v]) & (rows_t < hi_V[v])
            old_TxN = lax.dynamic_slice_in_dim(out_MxN, s, tm, axis=0)
            new_TxN = jnp.where(keep_t[:, None], y_TxN.astype(out_dtype), old_TxN)
            return lax.dynamic_update_slice_in_dim(out_MxN, new_TxN, s, axis=0)

        out_MxN = lax.fori_loop(0, num_visits, body, out_MxN)
    return out_MxN


def tgmm(
    lhs_MxK: jax.Array,
    dout_MxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    tile_rows: int | None = None,
    small_tile_rows: int | None = None,
) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ dout[rows of g]; empty groups give zeros.

    Args:
      lhs_MxK: rows sorted by group.
      dout_MxN: same rows.
      group_sizes_G: int32 rows per group.
      num_groups: G (default ``group_sizes_G.shape[0]``).
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is f32.
      tile_rows: full-chunk height.
      small_tile_rows: remainder-chunk height.

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
    tb, ts = _tiles(num_rows, num_groups, tile_rows, small_tile_rows)
    schedules = _schedules(group_sizes_G[:num_groups], num_rows, tb, ts)
    for i, (tm, schedule) in enumerate(zip((tb, ts), schedules, strict=False)):
        acc_GxKxN = _tgmm_schedule(acc_GxKxN, lhs_MxK, dout_MxN, tm, schedule, i > 0)
    return acc_GxKxN.astype(out_dtype)


def _tgmm_schedule(acc_GxKxN, lhs_MxK, dout_MxN, tm, schedule, add_to_stored):
    """Adds one chunk schedule's ``lhs^T @ dout`` products into ``acc_GxKxN`` (f32).

    The first schedule keeps a running per-group sum (a group's visits are consecutive) and
    stores it without re-reading; a second one (``add_to_stored``) adds onto what the first
    stored.
    """
    num_visits, group_V, start_V, lo_V, hi_V = schedule
    k, n = lhs_MxK.shape[1], dout_MxN.shape[1]
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
        first = (v == 0) | (group_V[jnp.maximum(v - 1, 0)] != g)
        if add_to_stored:
            base_KxN = lax.dynamic_index_in_dim(acc_GxKxN, g, axis=0, keepdims=False)
            run_KxN = jnp.where(first, base_KxN, run_KxN) + upd_KxN
        else:
            run_KxN = jnp.where(first, upd_KxN, run_KxN + upd_KxN)
        acc_GxKxN = lax.dynamic_update_index_in_dim(acc_GxKxN, run_KxN, g, axis=0)
        return acc_GxKxN, run_KxN

    run_KxN = jnp.zeros((k, n), jnp.float32)
    acc_GxKxN, _ = lax.fori_loop(0, num_visits, body, (acc_GxKxN, run_KxN))
    return acc_GxKxN
