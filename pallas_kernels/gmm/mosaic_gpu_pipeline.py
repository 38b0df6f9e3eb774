"""What the Hopper grouped-matmul kernels share: shared-memory transforms for ``wgmma``
operands and a warp-specialized pipeline with one memory and two consumer warpgroups."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

# The Mosaic GPU interpreter runs transposed shared-memory ``wgmma`` operands from jax 0.11 on
# (jax 0.10's raises or reads them untransposed), so only from there can the kernels' transposed
# products be tested on CPU.
INTERPRETER_TRANSPOSES = jax.__version_info__ >= (0, 11)


def smem_transforms(dtype, contraction: int):
    """Tiling and swizzle of operand blocks whose contraction is ``contraction`` elements
    (the swizzle is the widest that ``contraction`` elements of ``dtype`` fill)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(contraction * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def two_consumer_pipeline(body, context, steps, in_specs, stages: int):
    """``emit_pipeline_warp_specialized`` over ``steps`` (traced or static) with warpgroup
    axis ``"wg"``: one warpgroup issues the TMA copies of ``in_specs`` into ``stages``
    shared-memory stages, two run ``body`` with the carry of ``context``."""
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=40,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=stages,
        compute_context=context,
    )


def persistent_kernel(body, out_type, num_sms: int, interpret=None):
    """A Warpgroup-semantics ``plgpu.kernel`` of one CTA per SM (grid axis ``"sm"``) with
    three warpgroups (thread axis ``"wg"``): the memory warpgroup and two consumers."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
