"""Pallas Mosaic-GPU grouped matmul for Hopper (sm_90a): TMA loads, wgmma, warp specialization.

Schedule (``block_visit_table``): the rows are cut into blocks of ``cta_m`` rows; a visit
pairs one block with one group whose rows it holds (a block shared by two groups is visited
twice), plus a pseudo-group G for the rows past ``sum(group_sizes)``. A persistent grid (one
CTA per SM) walks ``visits x N tiles`` in a planar snake. Each CTA runs three warpgroups:
one issues the TMA copies of a ``[cta_m, tile_k]`` lhs block and a ``[tile_k, cta_n]``
weight block into a ring of ``max_concurrent_steps`` shared-memory stages; two consumer
warpgroups each accumulate a ``[tile_m, tile_n]`` part of the output tile with ``wgmma``
(f32 in registers).

The last block may reach past M (TMA fills those rows with zeros on the device); the
epilogue stores only the visit's own rows with a ladder of power-of-two-row TMA stores (a
TMA box has a static shape; any row count is a sum of powers of two), so no two visits
write the same output row. The zero-fill visits for rows past the groups run a pipeline of
zero steps, so their accumulator stays zero.

Requires: Hopper (or the Mosaic GPU interpreter), bf16 or f16 operands of one dtype,
``K % tile_k == 0``, ``N % cta_n == 0``, ``M >= cta_m`` and ``M % 8 == 0`` (``applies``);
``gmm`` runs the Triton kernel otherwise.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gmm import gpu as triton_gpu
from pallas_kernels.gmm import mosaic_gpu_tgmm
from pallas_kernels.gmm.mosaic_gpu_pipeline import (
    INTERPRETER_TRANSPOSES,
    persistent_kernel,
    smem_transforms,
    two_consumer_pipeline,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles and schedule. ``tile_m`` must be a power of two (the store ladder)."""

    tile_m: int = 128
    tile_n: int = 128  # per consumer warpgroup; the CTA tile is 2 * tile_n wide
    tile_k: int = 64
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64
    grid_minor_dim: int = 0  # 0: visits vary fastest within a snake strip; 1: N tiles
    grid_tile_width: int = 8
    # wgmma groups left in flight when a stage is released. 0: with 1, the pipeline's memory
    # warpgroup stops waiting one step early, so the next visit's first TMA loads could
    # overwrite the stage the last wgmma is still reading.
    delay_release: int = 0
    wg_split: Literal["n", "m"] = "n"  # the consumer warpgroups split the CTA tile along N/M

    def __post_init__(self):
        if self.tile_m <= 0 or self.tile_m & (self.tile_m - 1):
            raise ValueError(f"tile_m={self.tile_m} must be a power of two (the store ladder)")
        if self.tile_n % self.epi_tile_n:
            raise ValueError(f"tile_n={self.tile_n} must be a multiple of epi_tile_n")
        if self.wg_split not in ("n", "m"):
            raise ValueError(f"wg_split={self.wg_split!r}: allowed 'n', 'm'")
        if self.cta_m > 256 or self.cta_n > 256:
            raise ValueError(f"CTA tile {self.cta_m}x{self.cta_n} exceeds a TMA box (256)")
        if self.delay_release < 0 or self.max_concurrent_steps < 1:
            raise ValueError("delay_release must be >= 0 and max_concurrent_steps >= 1")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_split == "n" else 1)


def default_config(m: int, num_groups: int) -> Config | None:
    """Schedule used when the caller passes none (H100, bf16; BENCHMARKS.md, gmm, GPU), or
    None where the Triton kernel measured faster.

    Short groups (at most 256 rows per group on average, e.g. DeepSeek-V3's 256 experts)
    stream their weights from DRAM; there the Triton kernel ran the forward at 572-576
    TFLOP/s against 519-530 for this kernel with ``delay_release=0`` (d lhs: 524-569 against
    557-567), so short groups run the Triton kernel. Elsewhere snake strips of 8 visits.
    """
    if m <= 256 * num_groups:
        return None
    return Config()


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.0, sm_90a)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def applies(
    lhs_MxK, rhs, transpose_rhs: bool, config: Config = Config(), *, interpret: bool = False
) -> bool:
    """Whether this kernel handles the shapes and dtypes, on Hopper or interpreted (else the
    Triton kernel runs)."""
    m, k = lhs_MxK.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return (
        (interpret or on_hopper())
        # Before jax 0.11 the interpreter's wgmma read transposed shared-memory operands as if
        # untransposed, so there interpreted d lhs products run the Triton kernel.
        and not (interpret and transpose_rhs and not INTERPRETER_TRANSPOSES)
        and lhs_MxK.dtype == rhs.dtype
        and jnp.dtype(lhs_MxK.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and k % config.tile_k == 0
        and k > 0
        and n % config.cta_n == 0
        and m >= config.cta_m
        and m % 8 == 0  # the TMA tiling of lhs and out rows
    )


def interpret_params():
    """Mosaic GPU interpreter settings for tests on CPU: reads past the end of lhs (the last
    row block of an M that is not a multiple of the tile, which TMA fills on the device)
    return NaN, so any such row that reached the output would fail the comparison."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")


def _store_rows(o_smem, out_gmem, first_row, smem_row, rows, col, tile_m):
    """TMA-stores ``rows`` (1..tile_m, traced) rows of ``o_smem`` from ``smem_row`` on."""

    def store(size, row):
        src = o_smem.at[pl.ds(row, size)]
        dst = out_gmem.at[pl.ds(first_row + row, size), pl.ds(col, o_smem.shape[1])]
        pl.when(rows & size != 0)(lambda: plgpu.copy_smem_to_gmem(src, dst))

    size = tile_m
    while size >= 1:
        store(size, smem_row)
        smem_row = smem_row + (rows & size)
        size //= 2


def block_visit_table(group_sizes_G: jax.Array, num_rows: int, tile_m: int):
    """Visits of ``tile_m``-row blocks, one per (group, block) pair that share rows.

    Pseudo-group G covers the rows past ``sum(group_sizes)`` (stored as zeros). A block that
    holds rows of several groups is visited once per group, so there are at most
    ``ceil(M / tile_m) + G`` live visits; the static length is one more, and dead visits have
    group ``G + 1``.

    Returns:
      group_V, block_V, lo_V, hi_V (int32): visit v computes block ``block_V[v]`` with
      ``rhs[group_V[v]]`` and stores rows ``[lo_V[v], hi_V[v])``.
    """
    num_groups = group_sizes_G.shape[0]
    starts_H, ends_H = triton_gpu.tail_group_bounds(group_sizes_G, num_rows)
    first_H = starts_H // tile_m
    blocks_H = jnp.where(ends_H > starts_H, (ends_H - 1) // tile_m - first_H + 1, 0)
    cum_H = jnp.cumsum(blocks_H)
    v_V = jnp.arange(-(-num_rows // tile_m) + num_groups + 1, dtype=jnp.int32)
    h_V = jnp.searchsorted(cum_H, v_V, side="right", method="compare_all").astype(jnp.int32)
    live_V = h_V <= num_groups
    safe_V = jnp.minimum(h_V, num_groups)
    block_V = first_H[safe_V] + v_V - (cum_H[safe_V] - blocks_H[safe_V])
    lo_V = jnp.where(live_V, jnp.maximum(starts_H[safe_V], block_V * tile_m), 0)
    hi_V = jnp.where(live_V, jnp.minimum(ends_H[safe_V], block_V * tile_m + tile_m), 0)
    return jnp.where(live_V, h_V, num_groups + 1), jnp.where(live_V, block_V, 0), lo_V, hi_V


def _kernel(group_V, block_V, lo_V, hi_V, lhs_gmem, rhs_gmem, out_gmem, *, cfg, transpose_rhs):
    k = lhs_gmem.shape[1]
    num_groups = rhs_gmem.shape[0]
    n = out_gmem.shape[1]
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n, split_m = cfg.cta_m, cfg.cta_n, cfg.wg_split == "m"
    k_iters, n_iters, num_visits = k // tk, n // cta_n, group_V.shape[0]
    stages = min(cfg.max_concurrent_steps, k_iters)
    delay = min(cfg.delay_release, stages - 1)  # a stage can be held only if another exists
    transforms = smem_transforms(lhs_gmem.dtype, tk)

    def pipeline(body, context, steps, block=0):
        # Block indices: the lhs map is absolute (the row block); the weight maps are
        # relative to the weight slice of the visit's group and N tile.
        rhs_spec = plgpu.BlockSpec(
            (cta_n, tk) if transpose_rhs else (tk, cta_n),
            (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0)),
            transforms=transforms,
            delay_release=delay,
        )
        lhs_spec = plgpu.BlockSpec(
            (cta_m, tk),
            lambda kk: (block, kk),
            transforms=transforms,
            delay_release=delay,
        )
        return two_consumer_pipeline(body, context, steps, [lhs_spec, rhs_spec], stages)

    def rhs_slice(g, ni):
        cols = pl.ds(ni * cta_n, cta_n)
        return rhs_gmem.at[g, cols, :] if transpose_rhs else rhs_gmem.at[g, :, cols]

    ignore = lambda *_, **__: None  # noqa: E731

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, k_iters).get_allocations(lhs_gmem, rhs_slice(0, 0)),
        o_smem=plgpu.SMEM((2, tm, cfg.epi_tile_n), out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_visits * n_iters,), collective_axes="sm")
        def _visit(info):
            v, ni = plgpu.planar_snake(
                info.index[0], (num_visits, n_iters), cfg.grid_minor_dim, cfg.grid_tile_width
            )
            g, block, lo, hi = group_V[v], block_V[v], lo_V[v], hi_V[v]

            @pl.when(g <= num_groups)
            def _live():
                # Zero-fill visits (g == G) run no steps: their accumulator stays zero.
                steps = jnp.where(g < num_groups, k_iters, 0)

                def context(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _acc(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...].astype(out_gmem.dtype)
                        # This warpgroup's rows [first, first + tm) and columns.
                        first = block * cta_m + (wg * tm if split_m else 0)
                        r_lo, r_hi = jnp.maximum(lo, first), jnp.minimum(hi, first + tm)
                        rows = (r_lo - first, jnp.maximum(r_hi - r_lo, 0))
                        col0 = ni * cta_n + (0 if split_m else wg * tn)
                        for c in range(tn // cfg.epi_tile_n):
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            o_smem[wg] = acc[:, c * cfg.epi_tile_n : (c + 1) * cfg.epi_tile_n]
                            plgpu.commit_smem()
                            col = col0 + c * cfg.epi_tile_n
                            _store_rows(o_smem.at[wg], out_gmem, first, *rows, col, tm)

                def mma(_, a_smem, b_smem, acc_ref):
                    if split_m:
                        a_smem = a_smem.at[pl.ds(wg * tm, tm)]
                        b = b_smem.transpose((1, 0)) if transpose_rhs else b_smem
                    elif transpose_rhs:
                        b = b_smem.at[pl.ds(wg * tn, tn), :].transpose((1, 0))
                    else:
                        b = b_smem.at[:, pl.ds(wg * tn, tn)]
                    plgpu.wgmma(acc_ref, a_smem, b)
                    plgpu.wgmma_wait(delay)
                    return acc_ref

                g_safe = jnp.minimum(g, num_groups - 1)
                pipeline(mma, context, steps, block)(
                    lhs_gmem, rhs_slice(g_safe, ni), allocations=allocs
                )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def num_sms() -> int:
    device = jax.devices()[0]
    return getattr(device, "core_count", None) or 132


def gmm(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    interpret: bool = False,
    config: Config | None = None,
) -> jax.Array:
    """Grouped matmul ``out[m] = lhs[m] @ rhs[group(m)]`` (Hopper kernel; Triton otherwise).

    Args:
      lhs_MxK: rows sorted by group.
      rhs_GxKxN: weights (``[G, N, K]`` if ``transpose_rhs``).
      group_sizes_G: int32 rows per group; rows past the sum come out zero.
      transpose_rhs: contract with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``).
      interpret: run in the Mosaic GPU interpreter (CPU testing; ``interpret_params``), or
        the Triton kernel in its interpreter where this kernel does not apply.
      config: tiles and schedule (default ``default_config(M, G)``).

    Returns:
      ``[M, N]``.
    """
    cfg = config or default_config(lhs_MxK.shape[0], rhs_GxKxN.shape[0])
    if cfg is None or not applies(lhs_MxK, rhs_GxKxN, transpose_rhs, cfg, interpret=interpret):
        return triton_gpu.gmm(
            lhs_MxK,
            rhs_GxKxN,
            group_sizes_G,
            transpose_rhs=transpose_rhs,
            preferred_element_type=preferred_element_type,
            interpret=interpret,
        )
    return gmm_kernel(
        lhs_MxK,
        rhs_GxKxN,
        group_sizes_G,
        transpose_rhs,
        preferred_element_type,
        cfg,
        2 if interpret else num_sms(),
        interpret_params() if interpret else None,
    )


def gmm_kernel(lhs_MxK, rhs, group_sizes_G, transpose_rhs, out_dtype, cfg, num_sms, interpret=None):
    """The Mosaic-GPU kernel itself, without the shape check (lowerable off-GPU)."""
    m = lhs_MxK.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs_MxK.dtype
    table = block_visit_table(group_sizes_G, m, cfg.cta_m)
    kernel = persistent_kernel(
        functools.partial(_kernel, cfg=cfg, transpose_rhs=transpose_rhs),
        jax.ShapeDtypeStruct((m, n), out_dtype),
        num_sms,
        interpret,
    )
    return kernel(*table, lhs_MxK, rhs)


def tgmm(
    lhs_MxK,
    dout_MxN,
    group_sizes_G,
    *,
    num_groups=None,
    preferred_element_type=None,
    interpret=False,
    config=None,
    **triton_tiles,
):
    """The weight-gradient product: the Triton kernel, or the Hopper kernel of
    ``mosaic_gpu_tgmm`` where a ``TgmmConfig`` is passed, the device is Hopper and it applies
    (opt-in until it is measured on a device; see that module). ``triton_tiles`` are the Triton
    kernel's tile arguments (``gpu.tgmm``), which a ``config`` excludes."""
    if config is not None and triton_tiles:
        raise ValueError(f"config and Triton tiles {sorted(triton_tiles)}: pass one or the other")
    num_groups = num_groups or group_sizes_G.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    if (
        config is None
        or interpret
        or not on_hopper()
        or not mosaic_gpu_tgmm.tgmm_applies(lhs_MxK, dout_MxN, config, out_dtype)
    ):
        return triton_gpu.tgmm(
            lhs_MxK,
            dout_MxN,
            group_sizes_G,
            num_groups=num_groups,
            preferred_element_type=out_dtype,
            interpret=interpret,
            **triton_tiles,
        )
    return mosaic_gpu_tgmm.tgmm_kernel(
        lhs_MxK, dout_MxN, group_sizes_G, num_groups, out_dtype, config, num_sms()
    )
