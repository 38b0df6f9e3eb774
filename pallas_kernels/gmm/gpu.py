"""Pallas GPU (Triton lowering) grouped matmul kernels.

Schedule: every group is cut into chunks of ``bm`` rows that start at the group's first row,
plus one "tail" pseudo-group covering the rows past ``sum(group_sizes)`` (stored as zeros, no
FLOPs). A precomputed visit table (group, first row, end row) is passed as int32 inputs. The
grid is 1-D over ``visits x N tiles`` (static bound ``ceil(M / bm) + G + 1`` visits), swizzled
in super-blocks of ``group_m`` visits so CTAs resident together share lhs rows and weight
tiles in L2. Because chunks are group-aligned, no two programs own the same output row (no
races, no read-modify-write); loads start at ``min(start, M - bm)`` so they need no row mask,
and the store is masked to the visit's own rows. Visits past the live count exit at once.
Accumulation is f32.

``tgmm`` launches one program per (group, K tile, N tile) that loops over the group's rows in
``bm`` chunks (a dynamic trip count); empty groups store zeros.

Tile sizes the caller leaves out come from ``gmm_config`` / ``tgmm_config``: small, measured
heuristics (H100 numbers in their docstrings and in BENCHMARKS.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tail_group_bounds(group_sizes_G: jax.Array, num_rows: int):
    """Row ranges of the G groups plus a pseudo-group G holding the rows past their sum.

    Returns:
      starts_H, ends_H: int32 ``[G + 1]``; negative sizes count as 0 and the ranges are clipped
      to ``num_rows``.
    """
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows)
    ends_H = jnp.concatenate([ends_G, jnp.full((1,), num_rows, jnp.int32)])  # H = G + 1
    starts_H = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_H[:-1]])
    return starts_H, ends_H


def _visit_table(group_sizes_G: jax.Array, num_rows: int, bm: int):
    """Group-aligned chunk schedule with a trailing zero-fill pseudo-group (id G).

    Returns:
      group_V (G + 1 for dead visits), start_V, end_V, each int32 of static length
      ``ceil(M / bm) + G + 1``; visit v covers rows ``[start_V[v], min(start_V[v] + bm,
      end_V[v]))``.
    """
    num_groups = group_sizes_G.shape[0]
    starts_H, ends_H = tail_group_bounds(group_sizes_G, num_rows)
    chunks_H = (ends_H - starts_H + bm - 1) // bm
    chunk_ends_H = jnp.cumsum(chunks_H)
    max_visits = _cdiv(num_rows, bm) + num_groups + 1
    v_V = jnp.arange(max_visits, dtype=jnp.int32)
    # compare_all: one fused [V, G + 1] comparison. The default "scan" method is a loop of
    # dependent steps that cost 3-14% of the whole gmm at the benchmark shapes (H100).
    group_V = jnp.searchsorted(chunk_ends_H, v_V, side="right", method="compare_all")
    group_V = group_V.astype(jnp.int32)
    live_V = group_V <= num_groups
    safe_V = jnp.minimum(group_V, num_groups)
    j_V = v_V - (chunk_ends_H[safe_V] - chunks_H[safe_V])
    start_V = jnp.where(live_V, starts_H[safe_V] + j_V * bm, 0)
    end_V = jnp.where(live_V, ends_H[safe_V], 0)
    group_V = jnp.where(live_V, group_V, num_groups + 1)
    return group_V, start_V, end_V


def _mask(*conds):
    """AND of the non-None (row, col) conditions as a 2-D mask, or None if all are None."""
    rows, cols = conds
    if rows is None and cols is None:
        return None
    if rows is None:
        return jnp.broadcast_to(cols[None, :], (1, cols.shape[0]))
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _gmm_kernel(
    group_ref,
    start_ref,
    end_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    bm,
    bn,
    bk,
    m,
    k,
    n,
    num_groups,
    num_visits,
    group_m,
    transpose_rhs,
):
    # Swizzled 1-D grid: super-blocks of `group_m` visits x all N tiles, visits fastest, so
    # CTAs resident together share both lhs rows and weight tiles in L2.
    pid = pl.program_id(0)
    num_n = _cdiv(n, bn)
    per_super = group_m * num_n
    first_v = (pid // per_super) * group_m
    rows_in_super = jnp.minimum(num_visits - first_v, group_m)
    v = first_v + (pid % per_super) % rows_in_super
    j = (pid % per_super) // rows_in_super

    g = group_ref[v]
    s = start_ref[v]
    e = end_ref[v]
    # Shift the chunk back so that loads stay in bounds without a row mask (M >= bm); rows
    # before `s` belong to someone else and are masked on the store.
    s_load = jnp.minimum(s, m - bm) if m >= bm else s
    rows_m = s_load + jnp.arange(bm, dtype=jnp.int32)
    cols_n = j * bn + jnp.arange(bn, dtype=jnp.int32)
    row_ok = (rows_m >= s) & (rows_m < e)
    out_mask = _mask(row_ok, None if n % bn == 0 else cols_n < n)
    out_at = out_ref.at[pl.ds(s_load, bm), pl.ds(j * bn, bn)]
    load_rows = None if m >= bm else rows_m < m
    col_ok = None if n % bn == 0 else cols_n < n

    @pl.when(g < num_groups)
    def _compute():
        def body(kk, acc_mxn):
            ks_k = kk * bk + jnp.arange(bk, dtype=jnp.int32)
            k_ok = None if k % bk == 0 else ks_k < k
            x_mask = _mask(load_rows, k_ok)
            x_mxk = pltr.load(
                lhs_ref.at[pl.ds(s_load, bm), pl.ds(kk * bk, bk)],
                mask=x_mask,
                other=None if x_mask is None else 0,
            )
            if transpose_rhs:
                w_mask = _mask(col_ok, k_ok)
                w_nxk = pltr.load(
                    rhs_ref.at[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)],
                    mask=w_mask,
                    other=None if w_mask is None else 0,
                )
                dims = (((1,), (1,)), ((), ()))
                y = lax.dot_general(x_mxk, w_nxk, dims, preferred_element_type=jnp.float32)
            else:
                w_mask = _mask(k_ok, col_ok)
                w_kxn = pltr.load(
                    rhs_ref.at[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                    mask=w_mask,
                    other=None if w_mask is None else 0,
                )
                y = jnp.dot(x_mxk, w_kxn, preferred_element_type=jnp.float32)
            return acc_mxn + y

        acc_mxn = lax.fori_loop(0, _cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
        pltr.store(out_at, acc_mxn.astype(out_ref.dtype), mask=out_mask)

    @pl.when(g == num_groups)
    def _zero_tail():
        pltr.store(out_at, jnp.zeros((bm, bn), out_ref.dtype), mask=out_mask)


# Defaults when the caller passes no tile sizes, measured on an H100 (bf16, balanced routing,
# the four shapes of benchmarks/gmm.py's GPU table; BENCHMARKS.md, "gmm", GPU). gmm: 128 x 256
# tiles with block_k 64 and 8 warps were the best or within noise of it at every shape, forward
# and d lhs (256 x 128: up to 14% slower; 128 x 128: ~10% slower; 64-row tiles: up to 45%
# slower; block_k 128 never better); group_m and stages only mattered for short groups.
GMM_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
TGMM_KEYS = ("block_m", "block_k", "block_n", "num_warps", "num_stages")


def gmm_config(m: int, k: int, n: int, num_groups: int, transpose_rhs: bool = False) -> dict:
    """Tile config for ``gmm`` when the caller passes none (keys ``GMM_KEYS``).

    Short groups (at most 256 rows per group on average, e.g. DeepSeek-V3's 256 experts) make
    the kernel stream weights (ncu: DRAM 82%, L2 93% busy at 128 x 256 tiles): there, 4
    pipeline stages and swizzle super-blocks of 4 visits measured +7% (forward) and +10%
    (d lhs) over 3 stages and 8 visits; elsewhere the difference was within noise (+-4%).
    """
    del k, n, transpose_rhs
    short = m <= 256 * num_groups
    return dict(
        block_m=128,
        block_n=256,
        block_k=64,
        group_m=4 if short else 8,
        num_warps=8,
        num_stages=4 if short else 3,
    )


def tgmm_config(m: int, k: int, n: int, num_groups: int) -> dict:
    """Tile config for ``tgmm`` when the caller passes none (keys ``TGMM_KEYS``).

    128 x 128 output tiles, 32 rows per step, 4 warps, 4 stages: +3% to +16% over the
    previous (64 rows, 8 warps, 3 stages) at all four benchmark shapes in three interleaved
    runs; larger output tiles and 64-row steps were no better beyond noise.
    """
    del m, k, n, num_groups
    return dict(block_m=32, block_k=128, block_n=128, num_warps=4, num_stages=4)


def _fill(config: dict, given: dict) -> dict:
    return {key: config[key] if given[key] is None else given[key] for key in config}


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    group_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Grouped matmul ``out[m] = lhs[m] @ rhs[group(m)]`` as a Triton Pallas kernel.

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: weights (``[G, N, K]`` if ``transpose_rhs``).
      group_sizes_G: int32 rows per group; rows past the sum come out zero.
      transpose_rhs: contract with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``).
      interpret: run the kernel in the Pallas interpreter (CPU testing).
      block_m, block_n, block_k: tile sizes.
      group_m: visits per swizzle super-block (L2 reuse).
      num_warps, num_stages: Triton compiler parameters.
        Each of these six left None is taken from ``gmm_config``.

    Returns:
      ``[M, N]``.
    """
    m, k = lhs_MxK.shape
    num_groups = rhs_GxKxN.shape[0]
    n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
    given = dict(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        group_m=group_m,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    cfg = _fill(gmm_config(m, k, n, num_groups, transpose_rhs), given)
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    group_V, start_V, end_V = _visit_table(group_sizes_G, m, block_m)
    kernel = functools.partial(
        _gmm_kernel,
        bm=block_m,
        bn=block_n,
        bk=cfg["block_k"],
        m=m,
        k=k,
        n=n,
        num_groups=num_groups,
        num_visits=group_V.shape[0],
        group_m=cfg["group_m"],
        transpose_rhs=transpose_rhs,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(group_V.shape[0] * _cdiv(n, block_n),),
        compiler_params=pltr.CompilerParams(
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]
        ),
        interpret=interpret,
        name="jmoe_gmm_triton",
    )(group_V, start_V, end_V, lhs_MxK, rhs_GxKxN)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, bm, bk, bn, k, n):
    # N tiles fastest, then K tiles: the CTAs resident together read the same group's rows.
    j = pl.program_id(0)
    ki = pl.program_id(1)
    g = pl.program_id(2)
    s = start_ref[g]
    e = end_ref[g]
    ks_k = ki * bk + jnp.arange(bk, dtype=jnp.int32)
    cols_n = j * bn + jnp.arange(bn, dtype=jnp.int32)

    def body(i, acc_kxn):
        r0 = s + i * bm
        rows_m = r0 + jnp.arange(bm, dtype=jnp.int32)
        x_mxk = pltr.load(
            lhs_ref.at[pl.ds(r0, bm), pl.ds(ki * bk, bk)],
            mask=(rows_m < e)[:, None] & (ks_k < k)[None, :],
            other=0,
        )
        dy_mxn = pltr.load(
            dout_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)],
            mask=(rows_m < e)[:, None] & (cols_n < n)[None, :],
            other=0,
        )
        dims = (((0,), (0,)), ((), ()))
        return acc_kxn + lax.dot_general(x_mxk, dy_mxn, dims, preferred_element_type=jnp.float32)

    trips = (e - s + bm - 1) // bm
    acc_kxn = lax.fori_loop(0, trips, body, jnp.zeros((bk, bn), jnp.float32))
    mask = (ks_k < k)[:, None] & (cols_n < n)[None, :]
    pltr.store(
        out_ref.at[g, pl.ds(ki * bk, bk), pl.ds(j * bn, bn)],
        acc_kxn.astype(out_ref.dtype),
        mask=mask,
    )


def tgmm(
    lhs_MxK: jax.Array,
    dout_MxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    interpret: bool = False,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Transposed grouped matmul ``out[g] = lhs[rows of g]^T @ dout[rows of g]``.

    Args:
      lhs_MxK: rows sorted by group.
      dout_MxN: same rows.
      group_sizes_G: int32 rows per group; empty groups give zeros.
      num_groups: G (default ``group_sizes_G.shape[0]``).
      preferred_element_type: output dtype (default ``lhs.dtype``).
      interpret: run in the Pallas interpreter.
      block_m, block_k, block_n: tile sizes (``block_m`` rows per inner step).
      num_warps, num_stages: Triton compiler parameters.
        Each of these five left None is taken from ``tgmm_config``.

    Returns:
      ``[G, K, N]``.
    """
    m, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    given = dict(
        block_m=block_m,
        block_k=block_k,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    cfg = _fill(tgmm_config(m, k, n, num_groups), given)
    block_m, block_k, block_n = cfg["block_m"], cfg["block_k"], cfg["block_n"]
    sizes_G = jnp.maximum(group_sizes_G[:num_groups].astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), m)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    kernel = functools.partial(_tgmm_kernel, bm=block_m, bk=block_k, bn=block_n, k=k, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(_cdiv(n, block_n), _cdiv(k, block_k), num_groups),
        compiler_params=pltr.CompilerParams(
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]
        ),
        interpret=interpret,
        name="jmoe_tgmm_triton",
    )(starts_G, ends_G, lhs_MxK, dout_MxN)
