"""Pallas Mosaic TPU grouped matmul (megablox-style schedule), written for jmoe.

Group metadata goes through scalar prefetch. Rows are cut into fixed ``tm`` tiles; a group
touches the tiles from ``start // tm`` to ``(end - 1) // tm``, so a tile shared by two groups
is visited once per group and each visit stores only its own rows (masked store into the
output block, which stays resident in VMEM across the consecutive visits of one tile).

* ``gmm``: grid ``(N tiles, visits, K tiles)``; an f32 accumulator in VMEM scratch; rows past
  ``sum(group_sizes)`` form a trailing pseudo-group that stores zeros. The visit count has
  the static bound ``ceil(M / tm) + G``; surplus grid steps repeat the last tile and do nothing.
* ``tgmm``: grid ``(K tiles, N tiles, visits)``; the accumulator is reset on a group's first
  visit and stored on its last; every group (empty ones too) gets at least one visit so its
  output block is written (zeros for empty groups).

A K remainder (``K % tk != 0``) is masked in-kernel on the last K step; M and N remainders
rely on Pallas clipping of edge blocks plus the row masks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpret_arg(interpret: bool):
    if not interpret:
        return False
    if hasattr(pltpu, "InterpretParams"):
        return pltpu.InterpretParams()
    return True


def _metadata(starts_H, ends_H, num_rows: int, tm: int, max_visits: int, visit_empty: bool):
    """Visit schedule for groups with row ranges ``[starts_H, ends_H)``.

    Returns:
      gid_V (length ``max_visits + 1``; ``H`` marks surplus steps), tile_V (``max_visits``).
    """
    num_h = starts_H.shape[0]
    tiles_m = _cdiv(num_rows, tm)
    nonempty_H = ends_H > starts_H
    first_H = jnp.minimum(starts_H // tm, tiles_m - 1)
    last_H = jnp.maximum(ends_H - 1, 0) // tm
    tiles_H = jnp.where(nonempty_H, last_H - first_H + 1, 1 if visit_empty else 0)
    cum_H = jnp.cumsum(tiles_H)
    v_V = jnp.arange(max_visits, dtype=jnp.int32)
    gid_V = jnp.searchsorted(cum_H, v_V, side="right").astype(jnp.int32)
    safe_V = jnp.minimum(gid_V, num_h - 1)
    tile_V = first_H[safe_V] + v_V - (cum_H[safe_V] - tiles_H[safe_V])
    # Surplus steps stay on the last real visit's tile so no output block is re-flushed.
    last_tile = tile_V[jnp.maximum(cum_H[-1] - 1, 0)]
    tile_V = jnp.where(gid_V < num_h, tile_V, last_tile).astype(jnp.int32)
    gid_V = jnp.concatenate([gid_V, jnp.full((1,), num_h, jnp.int32)])
    return gid_V, tile_V


def _ranges(group_sizes_G, num_rows):
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows).astype(jnp.int32)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    return starts_G, ends_G


def _gmm_kernel(
    gid_ref,
    tile_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    tm,
    tk,
    k,
    num_groups,
    transpose_rhs,
):
    v = pl.program_id(1)
    kk = pl.program_id(2)
    nk = pl.num_programs(2)
    g = gid_ref[v]

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(g < num_groups)
    def _accumulate():
        x = lhs_ref[...]
        w = rhs_ref[0]
        if k % tk:  # zero the K remainder of the last step in both operands
            limit = k - kk * tk
            x = jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 1) < limit, x, 0)
            w = jnp.where(
                lax.broadcasted_iota(jnp.int32, w.shape, 1 if transpose_rhs else 0) < limit, w, 0
            )
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    @pl.when((kk == nk - 1) & (g <= num_groups))
    def _store():
        rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    interpret: bool = False,
    tiling: tuple[int, int, int] = (128, 128, 128),
) -> jax.Array:
    """Grouped matmul ``out[m] = lhs[m] @ rhs[group(m)]`` as a Mosaic TPU kernel.

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: weights (``[G, N, K]`` if ``transpose_rhs``).
      group_sizes_G: int32 rows per group; rows past the sum come out zero.
      transpose_rhs: contract with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``).
      interpret: run in the Pallas TPU interpreter (CPU testing).
      tiling: ``(tm, tk, tn)``, clipped to the array sizes.

    Returns:
      ``[M, N]``.
    """
    m, k = lhs_MxK.shape
    num_groups = rhs_GxKxN.shape[0]
    n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    tm, tk, tn = (min(tiling[0], m), min(tiling[1], k), min(tiling[2], n))
    starts_G, ends_G = _ranges(group_sizes_G, m)
    # Trailing pseudo-group (id G) covers the rows past the groups and stores zeros.
    starts_H = jnp.concatenate([starts_G, ends_G[-1:]])
    ends_H = jnp.concatenate([ends_G, jnp.full((1,), m, jnp.int32)])
    max_visits = _cdiv(m, tm) + num_groups
    gid_V, tile_V = _metadata(starts_H, ends_H, m, tm, max_visits, visit_empty=False)

    def lhs_map(j, v, kk, gid, tile, starts, ends):
        return tile[v], kk

    def rhs_map(j, v, kk, gid, tile, starts, ends):
        g = jnp.minimum(gid[v], num_groups - 1)
        return (g, j, kk) if transpose_rhs else (g, kk, j)

    def out_map(j, v, kk, gid, tile, starts, ends):
        return tile[v], j

    rhs_block = (1, tn, tk) if transpose_rhs else (1, tk, tn)
    kernel = functools.partial(
        _gmm_kernel, tm=tm, tk=tk, k=k, num_groups=num_groups, transpose_rhs=transpose_rhs
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(_cdiv(n, tn), max_visits, _cdiv(k, tk)),
        in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((tm, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret_arg(interpret),
        name="jmoe_gmm_mosaic",
    )(gid_V, tile_V, starts_H, ends_H, lhs_MxK, rhs_GxKxN)


def _tgmm_kernel(
    gid_ref,
    tile_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    dout_ref,
    out_ref,
    acc_ref,
    *,
    tm,
    num_groups,
):
    v = pl.program_id(2)
    g = gid_ref[v]
    prev_g = gid_ref[jnp.maximum(v - 1, 0)]
    first = (v == 0) | (prev_g != g)
    last = gid_ref[v + 1] != g

    @pl.when(g < num_groups)
    def _visit():
        @pl.when(first)
        def _reset():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        x = lhs_ref[...]
        rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, x.shape, 0)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        x = jnp.where(mine, x, 0)
        dy = dout_ref[...]
        rows_dy = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, dy.shape, 0)
        dy = jnp.where((rows_dy >= starts_ref[g]) & (rows_dy < ends_ref[g]), dy, 0)
        dims = (((0,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(x, dy, dims, preferred_element_type=jnp.float32)

        @pl.when(last)
        def _store():
            out_ref[0] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs_MxK: jax.Array,
    dout_MxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    interpret: bool = False,
    tiling: tuple[int, int, int] = (128, 128, 128),
) -> jax.Array:
    """Transposed grouped matmul ``out[g] = lhs[rows of g]^T @ dout[rows of g]`` (Mosaic TPU).

    Args:
      lhs_MxK: rows sorted by group.
      dout_MxN: same rows.
      group_sizes_G: int32 rows per group; empty groups give zeros.
      num_groups: G (default ``group_sizes_G.shape[0]``).
      preferred_element_type: output dtype (default ``lhs.dtype``).
      interpret: run in the Pallas TPU interpreter.
      tiling: ``(tm, tk, tn)``, clipped to the array sizes.

    Returns:
      ``[G, K, N]``.
    """
    m, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = (min(tiling[0], m), min(tiling[1], k), min(tiling[2], n))
    starts_G, ends_G = _ranges(group_sizes_G[:num_groups], m)
    max_visits = _cdiv(m, tm) + 2 * num_groups
    gid_V, tile_V = _metadata(starts_G, ends_G, m, tm, max_visits, visit_empty=True)

    def lhs_map(ki, j, v, gid, tile, starts, ends):
        return tile[v], ki

    def dout_map(ki, j, v, gid, tile, starts, ends):
        return tile[v], j

    def out_map(ki, j, v, gid, tile, starts, ends):
        return jnp.minimum(gid[v], num_groups - 1), ki, j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(_cdiv(k, tk), _cdiv(n, tn), max_visits),
        in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
        out_specs=pl.BlockSpec((1, tk, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, num_groups=num_groups),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_arg(interpret),
        name="jmoe_tgmm_mosaic",
    )(gid_V, tile_V, starts_G, ends_G, lhs_MxK, dout_MxN)
