"""Experimental Triton variants: a persistent flattened gmm and a flattened tgmm.

gmm: ``P`` programs (one per SM by default) walk the live output tiles ``p, p + P, ...`` in
the swizzled order of ``gpu._gmm_kernel`` as ONE loop over (tile, K step), storing a tile and
zeroing the accumulator at its last K step, so that the software pipeline keeps loading the
next tile's operands during a tile's epilogue and no program is launched for a dead visit.
The zero-fill pseudo-group's chunks are stored by a second, store-only loop.

tgmm: programs (N tile, K tile, split) walk all row chunks of a contiguous range of groups as
one loop, storing ``out[g]``'s tile at each group's last chunk; every group has at least one
chunk (an empty group's chunk is fully masked and stores zeros).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.gmm import gpu


def num_sms() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _gmm_persistent_kernel(
    group_ref,
    start_ref,
    end_ref,
    count_ref,
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
    group_m,
    num_programs,
    transpose_rhs,
):
    p = pl.program_id(0)
    num_n, num_k = gpu._cdiv(n, bn), gpu._cdiv(k, bk)
    live, total = count_ref[0], count_ref[1]
    col_ok = None if n % bn == 0 else j_cols_ok(n, bn)
    load_rows = None if m >= bm else jnp.arange(bm, dtype=jnp.int32) < m

    def coords(t):
        per_super = group_m * num_n
        first_v = (t // per_super) * group_m
        rows_in_super = jnp.minimum(live - first_v, group_m)
        return first_v + lax.rem(lax.rem(t, per_super), rows_in_super), lax.rem(
            t, per_super
        ) // rows_in_super

    def rows_of(v):
        s, e = start_ref[v], end_ref[v]
        s_load = jnp.minimum(s, m - bm) if m >= bm else s
        rows_m = s_load + jnp.arange(bm, dtype=jnp.int32)
        return s_load, (rows_m >= s) & (rows_m < e)

    def store(v, j, y_mxn):
        s_load, row_ok = rows_of(v)
        cols = None if col_ok is None else col_ok(j)
        pltr.store(
            out_ref.at[pl.ds(s_load, bm), pl.ds(j * bn, bn)], y_mxn, mask=gpu._mask(row_ok, cols)
        )

    def body(it, acc_mxn):
        kk = lax.rem(it, num_k)
        v, j = coords(p + (it // num_k) * num_programs)
        g = group_ref[v]
        s_load, _ = rows_of(v)
        ks_k = kk * bk + jnp.arange(bk, dtype=jnp.int32)
        k_ok = None if k % bk == 0 else ks_k < k
        cols = None if col_ok is None else col_ok(j)
        x_mask = gpu._mask(load_rows, k_ok)
        x_mxk = pltr.load(
            lhs_ref.at[pl.ds(s_load, bm), pl.ds(kk * bk, bk)],
            mask=x_mask,
            other=None if x_mask is None else 0,
        )
        if transpose_rhs:
            w_mask = gpu._mask(cols, k_ok)
            w_nxk = pltr.load(
                rhs_ref.at[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)],
                mask=w_mask,
                other=None if w_mask is None else 0,
            )
            dims = (((1,), (1,)), ((), ()))
            y = lax.dot_general(x_mxk, w_nxk, dims, preferred_element_type=jnp.float32)
        else:
            w_mask = gpu._mask(k_ok, cols)
            w_kxn = pltr.load(
                rhs_ref.at[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                mask=w_mask,
                other=None if w_mask is None else 0,
            )
            y = jnp.dot(x_mxk, w_kxn, preferred_element_type=jnp.float32)
        acc_mxn = acc_mxn + y

        def flush(acc):
            store(v, j, acc.astype(out_ref.dtype))
            return jnp.zeros_like(acc)

        return lax.cond(kk == num_k - 1, flush, lambda acc: acc, acc_mxn)

    mine = jnp.maximum(live * num_n - p + num_programs - 1, 0) // num_programs
    lax.fori_loop(0, mine * num_k, body, jnp.zeros((bm, bn), jnp.float32))

    def zero_tail(i, carry):
        t = p + i * num_programs
        store(live + t // num_n, lax.rem(t, num_n), jnp.zeros((bm, bn), out_ref.dtype))
        return carry

    tail = jnp.maximum((total - live) * num_n - p + num_programs - 1, 0) // num_programs
    lax.fori_loop(0, tail, zero_tail, 0)


def j_cols_ok(n, bn):
    return lambda j: j * bn + jnp.arange(bn, dtype=jnp.int32) < n


def gmm_persistent(
    lhs_MxK,
    rhs_GxKxN,
    group_sizes_G,
    *,
    transpose_rhs,
    out_dtype,
    interpret,
    block_m,
    block_n,
    block_k,
    group_m,
    num_warps,
    num_stages,
    num_programs=None,
):
    """Same contract as ``gpu._gmm_call``; ``num_programs`` defaults to the SM count."""
    m, k = lhs_MxK.shape
    num_groups = rhs_GxKxN.shape[0]
    n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    group_V, start_V, end_V = gpu._visit_table(group_sizes_G, m, block_m)
    counts = jnp.stack([jnp.sum(group_V < num_groups), jnp.sum(group_V <= num_groups)])
    num_programs = num_programs or num_sms()
    kernel = functools.partial(
        _gmm_persistent_kernel,
        bm=block_m,
        bn=block_n,
        bk=block_k,
        m=m,
        k=k,
        n=n,
        group_m=group_m,
        num_programs=num_programs,
        transpose_rhs=transpose_rhs,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_programs,),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jmoe_gmm_persistent_triton",
    )(group_V, start_V, end_V, counts.astype(jnp.int32), lhs_MxK, rhs_GxKxN)


def _tgmm_table(group_sizes_G, num_groups, m, bm, splits):
    """Chunks of ``bm`` rows per group (at least one, so empty groups store zeros).

    Returns group_C, start_C, end_C, last_C (1 at a group's last chunk), each int32 of static
    length ``ceil(M / bm) + G``, and bounds_S1: the first chunk of each of ``splits``
    contiguous group ranges, plus the chunk count.
    """
    sizes_G = jnp.maximum(group_sizes_G[:num_groups].astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), m)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    chunks_G = jnp.maximum((ends_G - starts_G + bm - 1) // bm, 1)
    chunk_ends_G = jnp.cumsum(chunks_G)
    c_C = jnp.arange(gpu._cdiv(m, bm) + num_groups, dtype=jnp.int32)
    group_C = jnp.searchsorted(chunk_ends_G, c_C, side="right", method="compare_all")
    safe_C = jnp.minimum(group_C, num_groups - 1).astype(jnp.int32)
    j_C = c_C - (chunk_ends_G[safe_C] - chunks_G[safe_C])
    start_C = starts_G[safe_C] + j_C * bm
    last_C = (j_C == chunks_G[safe_C] - 1).astype(jnp.int32)
    group_bounds = [round(s * num_groups / splits) for s in range(splits + 1)]
    firsts_G1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), chunk_ends_G.astype(jnp.int32)])
    bounds_S1 = firsts_G1[jnp.asarray(group_bounds)]
    return safe_C, start_C, ends_G[safe_C], last_C, bounds_S1


def _tgmm_flat_kernel(
    group_ref,
    start_ref,
    end_ref,
    last_ref,
    bounds_ref,
    lhs_ref,
    dout_ref,
    out_ref,
    *,
    bm,
    bk,
    bn,
    k,
    n,
):
    j, ki, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c0, c1 = bounds_ref[sp], bounds_ref[sp + 1]
    ks_k = ki * bk + jnp.arange(bk, dtype=jnp.int32)
    cols_n = j * bn + jnp.arange(bn, dtype=jnp.int32)

    def body(i, acc_kxn):
        c = c0 + i
        s, e = start_ref[c], end_ref[c]
        rows_m = s + jnp.arange(bm, dtype=jnp.int32)
        x_mxk = pltr.load(
            lhs_ref.at[pl.ds(s, bm), pl.ds(ki * bk, bk)],
            mask=(rows_m < e)[:, None] & (ks_k < k)[None, :],
            other=0,
        )
        dy_mxn = pltr.load(
            dout_ref.at[pl.ds(s, bm), pl.ds(j * bn, bn)],
            mask=(rows_m < e)[:, None] & (cols_n < n)[None, :],
            other=0,
        )
        dims = (((0,), (0,)), ((), ()))
        acc_kxn = acc_kxn + lax.dot_general(x_mxk, dy_mxn, dims, preferred_element_type=jnp.float32)

        def flush(acc):
            pltr.store(
                out_ref.at[group_ref[c], pl.ds(ki * bk, bk), pl.ds(j * bn, bn)],
                acc.astype(out_ref.dtype),
                mask=(ks_k < k)[:, None] & (cols_n < n)[None, :],
            )
            return jnp.zeros_like(acc)

        return lax.cond(last_ref[c] == 1, flush, lambda acc: acc, acc_kxn)

    lax.fori_loop(0, c1 - c0, body, jnp.zeros((bk, bn), jnp.float32))


def tgmm_flat(
    lhs_MxK,
    dout_MxN,
    group_sizes_G,
    *,
    num_groups=None,
    out_dtype=None,
    interpret=False,
    block_m,
    block_k,
    block_n,
    num_warps,
    num_stages,
    splits=None,
):
    """Same contract as ``gpu.tgmm``; ``splits`` (group ranges) defaults to enough programs
    for about 8 per SM."""
    m, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = out_dtype or lhs_MxK.dtype
    tiles = gpu._cdiv(n, block_n) * gpu._cdiv(k, block_k)
    splits = splits or min(num_groups, max(1, gpu._cdiv(8 * num_sms(), tiles)))
    table = _tgmm_table(group_sizes_G, num_groups, m, block_m, splits)
    kernel = functools.partial(_tgmm_flat_kernel, bm=block_m, bk=block_k, bn=block_n, k=k, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(gpu._cdiv(n, block_n), gpu._cdiv(k, block_k), splits),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jmoe_tgmm_flat_triton",
    )(*table, lhs_MxK, dout_MxN)
