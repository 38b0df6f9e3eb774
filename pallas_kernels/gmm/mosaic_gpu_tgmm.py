"""Pallas Mosaic-GPU weight-gradient product for Hopper: ``out[g] = lhs[rows of g]^T @ dout[rows
of g]`` with TMA loads, ``wgmma`` on a transposed shared-memory lhs and warp specialization.

Schedule: a persistent grid (one CTA per SM) walks work items (group, K tile, N tile), groups
outermost (the CTAs resident together share one group's rows in L2) and the tiles of a group
in a planar snake. An item reduces over the group's rows in ``tile_r``-row blocks aligned to
``tile_r``; one warpgroup issues the TMA copies of a ``[tile_r, tile_m]`` lhs block and a
``[tile_r, 2 * tile_n]`` dout block into a ring of shared-memory stages, and two consumer
warpgroups each accumulate a ``[tile_m, tile_n]`` half of the output tile (f32 registers),
with A = the lhs block transposed and B = their own half of the dout block.

A block that also holds rows of a neighbouring group (the first and last block of a group
whose bounds are not multiples of ``tile_r``) has those dout rows zeroed in shared memory by
the warpgroup that reads them before its ``wgmma``, so they add nothing; rows past M read as
zeros (TMA). (A non-finite lhs value in a neighbour's row of such a block would turn into NaN
here where the reference ignores it; finite inputs give the reference's result.) Empty groups
run no steps and store zeros. Output tiles are whole (``K % tile_m == 0``, ``N % (2 * tile_n)
== 0``), stored in ``epi_tile_n``-column chunks by TMA from swizzled staging buffers.

Not yet the default: ``pallas_kernels.gmm.mosaic_gpu.tgmm`` runs the Triton kernel until this
one is measured on a device (``benchmarks/gmm_mgpu_ab.py``; BENCHMARKS.md, gmm, GPU). Tested
compiled on Hopper, in the Mosaic GPU interpreter on CPU with jax >= 0.11 (jax 0.10's
interpreter cannot run a transposed ``wgmma`` operand), and lowered for CUDA on CPU with any
jax.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gmm import gpu as triton_gpu
from pallas_kernels.gmm.mosaic_gpu_pipeline import (
    persistent_kernel,
    smem_transforms,
    two_consumer_pipeline,
)

# Dynamic shared memory one CTA may use on an H100 / H200 (227 KiB).
SMEM_LIMIT_BYTES = 232448


@dataclasses.dataclass(frozen=True)
class TgmmConfig:
    """Tiles and schedule of the Hopper ``tgmm``."""

    tile_m: int = 128  # output rows (of K) per item
    tile_n: int = 128  # output columns per consumer warpgroup; an item is 2 * tile_n wide
    tile_r: int = 64  # rows of the reduction per pipeline step
    max_concurrent_steps: int = 3
    epi_tile_n: int = 64
    grid_tile_width: int = 8
    # Stage the epilogue's chunks in swizzled shared memory (the output tiles are whole, so
    # every TMA store is a whole swizzled box): no bank conflicts when the warpgroups write
    # their accumulator rows. False: plain row-major staging, as in the forward kernel.
    swizzle_epilogue: bool = True

    def __post_init__(self):
        for name in ("tile_m", "tile_n", "tile_r", "max_concurrent_steps", "grid_tile_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.tile_m % 64 or self.tile_r % 64:
            raise ValueError(
                f"tile_m={self.tile_m} and tile_r={self.tile_r} must be multiples of 64"
            )
        if self.tile_n % self.epi_tile_n or self.epi_tile_n % 8:
            raise ValueError(
                f"tile_n={self.tile_n} must be a multiple of epi_tile_n={self.epi_tile_n}, "
                "itself a multiple of 8"
            )
        if self.tile_m > 256 or 2 * self.tile_n > 256 or self.tile_r > 256:
            raise ValueError("tile_m, 2 * tile_n and tile_r must be <= 256 (a TMA box)")

    def smem_bytes(self, in_dtype, out_dtype) -> int:
        """Shared memory of one CTA: the pipeline's stages, the epilogue's two staging
        buffers and 1 KiB for barriers and alignment."""
        stage = self.tile_r * (self.tile_m + 2 * self.tile_n) * jnp.dtype(in_dtype).itemsize
        staging = 2 * self.tile_m * self.epi_tile_n * jnp.dtype(out_dtype).itemsize
        return self.max_concurrent_steps * stage + staging + 1024


def tgmm_applies(lhs_MxK, dout_MxN, config: TgmmConfig = TgmmConfig(), out_dtype=None) -> bool:
    """Whether the Hopper ``tgmm`` takes these shapes and dtypes (the caller checks the
    device): bf16 or f16 operands of one dtype and one row count ``M >= tile_r``,
    ``K % tile_m == 0``, ``N % (2 * tile_n) == 0``, and the config's shared memory within
    ``SMEM_LIMIT_BYTES`` for ``out_dtype`` (default the operands')."""
    m, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    out_dtype = out_dtype or lhs_MxK.dtype
    return (
        lhs_MxK.dtype == dout_MxN.dtype
        and jnp.dtype(lhs_MxK.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and dout_MxN.shape[0] == m
        and k > 0
        and k % config.tile_m == 0
        and n % (2 * config.tile_n) == 0
        and m >= config.tile_r
        and config.smem_bytes(lhs_MxK.dtype, out_dtype) <= SMEM_LIMIT_BYTES
    )


def _zero_foreign_rows(ref, first_row, lo, hi):
    """Zeroes the rows of a ``[tile_r, cols]`` shared-memory block (global rows
    ``first_row + i``) outside ``[lo, hi)``, then makes the writes visible to ``wgmma``."""
    rows = first_row + plgpu.layout_cast(
        lax.broadcasted_iota(jnp.int32, ref.shape, 0), plgpu.Layout.WGMMA
    )
    keep = (rows >= lo) & (rows < hi)
    ref[...] = jnp.where(keep, ref[...], jnp.zeros(ref.shape, ref.dtype))
    plgpu.commit_smem()


def _tgmm_kernel(starts_G, ends_G, lhs_gmem, dout_gmem, out_gmem, *, cfg):
    num_groups, k, n = out_gmem.shape
    tm, tn, tr = cfg.tile_m, cfg.tile_n, cfg.tile_r
    k_tiles, n_tiles = k // tm, n // (2 * tn)
    per_group = k_tiles * n_tiles
    stages = cfg.max_concurrent_steps
    transforms = smem_transforms(lhs_gmem.dtype, tr)

    def pipeline(body, context, steps, first_blk=0, ki=0, ni=0):
        lhs_spec = plgpu.BlockSpec((tr, tm), lambda r: (first_blk + r, ki), transforms=transforms)
        dout_spec = plgpu.BlockSpec(
            (tr, 2 * tn), lambda r: (first_blk + r, ni), transforms=transforms
        )
        return two_consumer_pipeline(body, context, steps, [lhs_spec, dout_spec], stages)

    ignore = lambda *_, **__: None  # noqa: E731

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, stages).get_allocations(lhs_gmem, dout_gmem),
        o_smem=plgpu.SMEM(
            (2, tm, cfg.epi_tile_n),
            out_gmem.dtype,
            transforms=smem_transforms(out_gmem.dtype, cfg.epi_tile_n)
            if cfg.swizzle_epilogue
            else (),
        ),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_groups * per_group,), collective_axes="sm")
        def _item(info):
            g = info.index[0] // per_group
            ki, ni = plgpu.planar_snake(
                info.index[0] % per_group, (k_tiles, n_tiles), 1, cfg.grid_tile_width
            )
            lo, hi = starts_G[g], ends_G[g]
            first_blk = lo // tr
            steps = jnp.where(hi > lo, (hi - 1) // tr - first_blk + 1, 0)

            def context(run):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...].astype(out_gmem.dtype)
                    for c in range(tn // cfg.epi_tile_n):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        o_smem[wg] = acc[:, c * cfg.epi_tile_n : (c + 1) * cfg.epi_tile_n]
                        plgpu.commit_smem()
                        col = ni * 2 * tn + wg * tn + c * cfg.epi_tile_n
                        dst = out_gmem.at[g, pl.ds(ki * tm, tm), pl.ds(col, cfg.epi_tile_n)]
                        plgpu.copy_smem_to_gmem(o_smem.at[wg], dst)

            def mma(idx, lhs_smem, dout_smem, acc_ref):
                b_smem = dout_smem.at[:, pl.ds(wg * tn, tn)]
                first_row = (first_blk + idx[0]) * tr
                foreign = (first_row < lo) | (first_row + tr > hi)
                pl.when(foreign)(lambda: _zero_foreign_rows(b_smem, first_row, lo, hi))
                plgpu.wgmma(acc_ref, lhs_smem.transpose((1, 0)), b_smem)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, context, steps, first_blk, ki, ni)(
                lhs_gmem, dout_gmem, allocations=allocs
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tgmm_kernel(
    lhs_MxK, dout_MxN, group_sizes_G, num_groups, out_dtype, cfg, num_sms, interpret=None
):
    """The Hopper kernel itself, without the shape check (lowerable off-GPU).

    Args:
      interpret: ``InterpretGPUParams`` to run it in the Mosaic GPU interpreter (jax >= 0.11,
        ``mosaic_gpu_pipeline.INTERPRETER_TRANSPOSES``), or None to compile.

    Returns:
      ``[num_groups, K, N]`` of ``out_dtype`` (default ``lhs.dtype``).
    """
    m, k = lhs_MxK.shape
    n = dout_MxN.shape[1]
    out_dtype = out_dtype or lhs_MxK.dtype
    if not 0 <= num_groups <= group_sizes_G.shape[0]:
        raise ValueError(f"num_groups={num_groups} must lie in [0, {group_sizes_G.shape[0]}]")
    if num_groups == 0:
        return jnp.zeros((0, k, n), out_dtype)
    starts_H, ends_H = triton_gpu.tail_group_bounds(group_sizes_G[:num_groups], m)
    kernel = persistent_kernel(
        functools.partial(_tgmm_kernel, cfg=cfg),
        jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        num_sms,
        interpret,
    )
    return kernel(starts_H[:num_groups], ends_H[:num_groups], lhs_MxK, dout_MxN)
