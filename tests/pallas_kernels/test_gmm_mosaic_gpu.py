"""The Mosaic GPU (Hopper) grouped matmul: its visit schedule, its config checks, and the kernel
against the reference, compiled on Hopper or in the Mosaic GPU interpreter on CPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.gmm import GPU_SHAPES
from pallas_kernels.gmm import api, gmm, mosaic_gpu_tgmm, reference
from pallas_kernels.gmm import mosaic_gpu as gmm_mosaic_gpu
from pallas_kernels.gmm.mosaic_gpu_pipeline import INTERPRETER_TRANSPOSES
from tests.pallas_kernels._gmm_helpers import _SETTINGS, GmmTestBase, _close, _inputs, problems
from tests.pallas_kernels._lowering import abstract_h100, lower_for_cuda


@settings(max_examples=40, **_SETTINGS)
@given(problems(max_rows=600, max_groups=9), st.sampled_from([8, 64, 128]))
def test_mosaic_gpu_visit_table_covers_every_row_once(prob, tile_m):
    """The Hopper kernel's schedule: every row is stored by exactly one visit, with its own
    group (G for rows past the groups), from inside the visit's block."""
    m, _, _, sizes = prob
    table = gmm_mosaic_gpu.block_visit_table(jnp.asarray(sizes), m, tile_m)
    group_V, block_V, lo_V, hi_V = (np.asarray(a) for a in table)
    g = len(sizes)
    assert len(group_V) == -(-m // tile_m) + g + 1
    owner = np.full(m, -1)
    for gv, bv, lo, hi in zip(group_V, block_V, lo_V, hi_V, strict=True):
        if gv > g:
            continue
        assert bv * tile_m <= lo < hi <= min(bv * tile_m + tile_m, m)
        assert np.all(owner[lo:hi] == -1), "row stored twice"
        owner[lo:hi] = gv
    want = np.repeat(np.arange(g + 1), np.r_[sizes, m - sizes.sum()])
    np.testing.assert_array_equal(owner, want)


class MosaicGpuKernelChecks:
    """Shapes the Hopper kernel takes (bf16, K % 64, N % 256, M % 8, M >= 128); subclasses run
    it compiled or in the Mosaic GPU interpreter."""

    INTERPRET = False
    TRANSPOSES = True  # the transposed-weight product (d lhs) runs on this kernel
    KERNEL_EXAMPLES = 6
    ROW_BLOCKS = (32, 187)  # M = 8 * r: not always a multiple of the 128-row tile
    K_CHOICES = (64, 192, 512)
    N_CHOICES = (256, 512)
    GRAD_CASE = (1000, 256, 512, (600, 0, 1, 350))  # > 256 rows per group: the kernel runs

    def _mosaic(self, x, w_arg, gs, transpose_rhs, config=None):
        assert gmm_mosaic_gpu.applies(x, w_arg, transpose_rhs, interpret=self.INTERPRET)
        return gmm_mosaic_gpu.gmm(
            x, w_arg, gs, transpose_rhs=transpose_rhs, config=config, interpret=self.INTERPRET
        )

    def test_kernel_bf16(self):
        """Uneven and empty groups, rows past the groups, M not a multiple of the tile; both
        contractions (compiled, or interpreted from jax 0.11) and both splits of the CTA tile
        between the warpgroups."""

        @settings(max_examples=self.KERNEL_EXAMPLES, **_SETTINGS)
        @given(
            st.integers(*self.ROW_BLOCKS).map(lambda r: 8 * r),
            st.sampled_from(self.K_CHOICES),
            st.sampled_from(self.N_CHOICES),
            st.integers(1, 9),
            st.integers(0, 2**31 - 1),
        )
        def run(m, k, n, g, seed):
            rng = np.random.default_rng(seed)
            sizes = rng.multinomial(rng.integers(0, m + 1), rng.dirichlet(np.ones(g) * 0.5))
            sizes[rng.integers(g)] = 0
            gs = jnp.asarray(sizes.astype(np.int32))
            x, w, _ = _inputs(m, k, n, g, jnp.bfloat16, seed % 1000)
            want = reference.gmm(x.astype(jnp.float32), w.astype(jnp.float32), gs)
            for transpose_rhs in (False, True) if self.TRANSPOSES else (False,):
                w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
                for split in ("n", "m") if m >= 256 else ("n",):
                    cfg = gmm_mosaic_gpu.Config(wg_split=split)
                    got = jax.jit(functools.partial(self._mosaic, config=cfg), static_argnums=3)(
                        x, w_arg, gs, transpose_rhs
                    )
                    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
                    _close(got, want, jnp.bfloat16)
                    assert np.all(np.asarray(got[int(sizes.sum()) :]) == 0), "tail not zero"

        run()

    def test_kernel_gradients(self):
        """Forward and d lhs on the kernel (d rhs is the Triton tgmm), through the API."""
        m, k, n, sizes = self.GRAD_CASE
        x, w, c = _inputs(m, k, n, len(sizes), jnp.bfloat16, 9)
        gs = jnp.asarray(sizes, jnp.int32)
        dy = c.astype(jnp.bfloat16)  # the backward casts dy to the operand dtype
        assert gmm_mosaic_gpu.default_config(m, len(sizes)) is not None
        assert gmm_mosaic_gpu.applies(x, w, False, interpret=self.INTERPRET)
        # Interpreted before jax 0.11, d lhs runs the Triton kernel (see `applies`).
        assert gmm_mosaic_gpu.applies(dy, w, True, interpret=self.INTERPRET) == self.TRANSPOSES

        def loss(x, w):
            y = gmm(x, w, gs, implementation="mosaic_gpu", interpret=self.INTERPRET)
            return jnp.sum(y.astype(jnp.float32) * c)

        def ref_loss(x, w):
            return jnp.sum(reference.gmm(x, w, gs) * c)

        dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
        rdx, rdw = jax.grad(ref_loss, (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
        _close(dx, rdx, jnp.bfloat16)
        _close(dw, rdw, jnp.bfloat16)


# An exception inside the interpreter can leave it waiting forever (jax 0.10): fail instead.
@pytest.mark.timeout(900, method="thread")
class TestMosaicGpuInterpret(MosaicGpuKernelChecks):
    """The Hopper kernel in the Mosaic GPU interpreter on CPU (small shapes: it is slow)."""

    INTERPRET = True
    TRANSPOSES = INTERPRETER_TRANSPOSES
    KERNEL_EXAMPLES = 2
    ROW_BLOCKS = (32, 48)  # M >= 256: both splits run in every example
    K_CHOICES = (64, 128)
    N_CHOICES = (256,)
    GRAD_CASE = (776, 256, 256, (400, 0, 330))

    @pytest.mark.slow
    def test_kernel_bf16_more(self):
        self.KERNEL_EXAMPLES = 8
        self.test_kernel_bf16()


@pytest.mark.gpu
@pytest.mark.skipif(not gmm_mosaic_gpu.on_hopper(), reason="needs a Hopper GPU (sm_90a)")
class TestMosaicGpuCompiled(MosaicGpuKernelChecks, GmmTestBase):
    """Compiled on Hopper; the base tests' small shapes exercise the Triton fallback."""

    IMPL = "mosaic_gpu"


def test_mosaic_gpu_config_errors_name_the_argument():
    for kwargs, name in (
        (dict(tile_m=96), "tile_m"),
        (dict(tile_n=96), "tile_n"),
        (dict(wg_split="k"), "wg_split"),
        (dict(tile_n=256), "CTA tile"),
        (dict(delay_release=-1), "delay_release"),
    ):
        with pytest.raises(ValueError, match=name):
            gmm_mosaic_gpu.Config(**kwargs)
    assert gmm_mosaic_gpu.default_config(65536, 256) is None  # short groups: Triton
    x = jnp.zeros((256, 64), jnp.int16)
    assert not gmm_mosaic_gpu.applies(x, jnp.zeros((2, 64, 256), jnp.int16), False, interpret=True)


def test_fwd_bwd_lowers_for_hopper_on_cpu(monkeypatch):
    """The GPU default's whole fwd+bwd, lowered for CUDA on a CPU-only machine: the forward
    and d lhs (the transposed-weight product the interpreter cannot run) on the Hopper kernel,
    d rhs on the Triton ``tgmm``. Catches trace-time and Mosaic GPU layout errors in the
    paths CI cannot execute."""
    monkeypatch.setattr(gmm_mosaic_gpu, "on_hopper", lambda: True)
    m, k, n, g = 1536, 256, 512, 4  # > 256 rows per group

    def loss(x, w, gs):
        y = api._gmm_vjp(x, w, gs, None, False, jnp.dtype(jnp.bfloat16), "mosaic_gpu", False)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))  # the forward is not dead code

    args = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((g,), jnp.int32),
    )
    assert gmm_mosaic_gpu.default_config(m, g) is not None  # long groups: the Hopper kernel
    with abstract_h100():
        text = lower_for_cuda(jax.grad(loss, (0, 1)), *args).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert sum("@mosaic_gpu" in c for c in calls) == 2, "forward and d lhs on the Hopper kernel"
    assert sum("triton" in c for c in calls) == 1, "d rhs on the Triton tgmm"


@pytest.mark.parametrize("split", ["n", "m"])
def test_transposed_weights_lower_for_hopper_on_cpu(split):
    """``transpose_rhs`` (d lhs) with both warpgroup splits lowers to one Mosaic GPU call."""
    x = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((3, 256, 128), jnp.bfloat16)  # [G, N, K]
    gs = jax.ShapeDtypeStruct((3,), jnp.int32)
    cfg = gmm_mosaic_gpu.Config(wg_split=split)
    f = lambda x, w, gs: gmm_mosaic_gpu.gmm_kernel(x, w, gs, True, None, cfg, 132)
    text = lower_for_cuda(f, x, w, gs).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def _tgmm_case(m, k, n, sizes, seed):
    """bf16 inputs whose rows past the groups hold large values (they must add nothing)."""
    x, _, _ = _inputs(m, k, n, 1, jnp.bfloat16, seed)
    dy = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, n)), jnp.bfloat16)
    past = int(np.sum(sizes))
    x = x.at[past:].set(1e4)
    dy = dy.at[past:].set(-1e4)
    gs = jnp.asarray(sizes, jnp.int32)
    want = reference.tgmm(x.astype(jnp.float32), dy.astype(jnp.float32), gs)
    return x, dy, gs, want


def _check_tgmm(got, want, sizes):
    """Each group against the reference at its own scale; empty groups exactly zero."""
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    for g, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(got[g]) == 0), f"empty group {g} not zero"
        else:
            _close(got[g], want[g], jnp.bfloat16)


def _run_tgmm(x, dy, gs, cfg, num_sms, interpret=None):
    f = lambda x, dy, gs: mosaic_gpu_tgmm.tgmm_kernel(
        x, dy, gs, gs.shape[0], None, cfg, num_sms, interpret
    )
    return jax.jit(f)(x, dy, gs)


# Groups that start and end inside 64-row blocks, an empty group, a block shared by three
# groups, groups longer than a pipeline ring, rows past the groups, a last group ending in a
# partial block (M % 64 != 0: TMA fills the rows past M with zeros), all groups empty.
TGMM_CASES = [
    (1000, 128, 256, (600, 0, 1, 350)),
    (904, 256, 512, (3, 70, 5, 0, 64, 700)),
    (1000, 128, 256, (600, 400)),
    (64, 128, 256, (0, 64)),
    (520, 384, 256, (0, 0, 0)),
]
_TGMM_BASE = mosaic_gpu_tgmm.TgmmConfig()
TGMM_CONFIGS = {
    "default": _TGMM_BASE,
    "4 stages": dataclasses.replace(_TGMM_BASE, max_concurrent_steps=4),
    "1 stage, width 2": dataclasses.replace(_TGMM_BASE, max_concurrent_steps=1, grid_tile_width=2),
    "plain epilogue": dataclasses.replace(_TGMM_BASE, swizzle_epilogue=False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not gmm_mosaic_gpu.on_hopper(), reason="needs a Hopper GPU (sm_90a)")
@pytest.mark.parametrize("config", ["default", "4 stages"])  # 1 stage: interpreted only
@pytest.mark.parametrize("case", TGMM_CASES)
def test_hopper_tgmm_compiled(case, config):
    """The Hopper weight-gradient kernel against the reference, compiled on Hopper: one item
    per CTA (all SMs) and many (3 CTAs); empty groups checked after a run whose output had
    no zeros was freed, so that reused memory cannot pass for a stored zero."""
    m, k, n, sizes = case
    x, dy, gs, want = _tgmm_case(m, k, n, sizes, seed=m)
    cfg = TGMM_CONFIGS[config]
    assert mosaic_gpu_tgmm.tgmm_applies(x, dy, cfg)
    for num_sms in (gmm_mosaic_gpu.num_sms(), 3):
        full = jnp.full((len(sizes),), m // len(sizes), jnp.int32)
        _run_tgmm(x, dy, full, cfg, num_sms).block_until_ready()  # freed: its memory is reused
        _check_tgmm(_run_tgmm(x, dy, gs, cfg, num_sms), want, sizes)
    if config == "default":  # through the opt-in routing
        got = jax.jit(functools.partial(gmm_mosaic_gpu.tgmm, config=cfg))(x, dy, gs)
        _check_tgmm(got, want, sizes)


@pytest.mark.skipif(
    not INTERPRETER_TRANSPOSES,
    reason="the Mosaic GPU interpreter of jax < 0.11 cannot run a transposed wgmma operand",
)
@pytest.mark.parametrize("config", list(TGMM_CONFIGS))
@pytest.mark.parametrize("case", TGMM_CASES)
def test_hopper_tgmm_interpret(case, config):
    """The Hopper kernel in the Mosaic GPU interpreter, 2 and 5 CTAs (several items each).
    Unwritten memory reads as NaN, so a tile never stored fails; where M % 64 != 0 the rows
    past M read as zeros instead, as TMA fills them on the device."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    m, k, n, sizes = case
    x, dy, gs, want = _tgmm_case(m, k, n, sizes, seed=m)
    fill = "nan" if m % _TGMM_BASE.tile_r == 0 else "zero"
    params = InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory=fill)
    for num_sms in (2, 5):
        _check_tgmm(_run_tgmm(x, dy, gs, TGMM_CONFIGS[config], num_sms, params), want, sizes)


def test_hopper_tgmm_lowers_on_cpu():
    """The Hopper ``tgmm`` lowers for CUDA on CPU (layout inference, operand shapes)."""
    x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((1000, 512), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((5,), jnp.int32)
    for cfg in TGMM_CONFIGS.values():
        f = lambda x, dy, gs, cfg=cfg: mosaic_gpu_tgmm.tgmm_kernel(x, dy, gs, 4, None, cfg, 132)
        lowered = lower_for_cuda(f, x, dy, gs)
        assert lowered.as_text().count("stablehlo.custom_call @mosaic_gpu") == 1
        assert lowered.out_info.shape == (4, 256, 512)


@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES)
def test_hopper_kernels_lower_at_benchmark_shapes(shape):
    """Both Hopper kernels lower at the GPU benchmark's full shapes (row offsets, grid sizes,
    the forward's per-shape config), so no device time goes to a trace-time error."""
    m, k, n, g = shape
    x, gs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g,), jnp.int32)
    dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    cfg = mosaic_gpu_tgmm.TgmmConfig()
    f = lambda x, dy, gs: mosaic_gpu_tgmm.tgmm_kernel(x, dy, gs, g, None, cfg, 132)
    assert lower_for_cuda(f, x, dy, gs).out_info.shape == (g, k, n)
    fwd_cfg = gmm_mosaic_gpu.default_config(m, g)
    assert (fwd_cfg is None) == (m // g <= 256), "short groups run the Triton kernel"
    # Where the default is Triton, the config the A/B still times there (snake strips of 2).
    fwd_cfg = fwd_cfg or gmm_mosaic_gpu.Config(grid_tile_width=2)
    for transpose_rhs, w_shape in ((False, (g, k, n)), (True, (g, n, k))):
        w = jax.ShapeDtypeStruct(w_shape, jnp.bfloat16)
        f = lambda x, w, gs, t=transpose_rhs: gmm_mosaic_gpu.gmm_kernel(
            x, w, gs, t, None, fwd_cfg, 132
        )
        assert lower_for_cuda(f, x, w, gs).out_info.shape == (m, n)


def test_hopper_tgmm_config_and_applies():
    for kwargs, name in (
        (dict(tile_n=96), "tile_n"),
        (dict(tile_r=0), "tile_r"),
        (dict(tile_r=32), "tile_r"),
        (dict(tile_m=512), "tile_m"),
    ):
        with pytest.raises(ValueError, match=name):
            mosaic_gpu_tgmm.TgmmConfig(**kwargs)
    bf, f32 = jnp.bfloat16, jnp.float32
    ok = mosaic_gpu_tgmm.tgmm_applies
    assert ok(jnp.zeros((64, 128), bf), jnp.zeros((64, 256), bf))
    assert ok(jnp.zeros((100, 128), bf), jnp.zeros((100, 256), bf))  # any M >= tile_r
    assert not ok(jnp.zeros((64, 96), bf), jnp.zeros((64, 256), bf))  # K % 128
    assert not ok(jnp.zeros((64, 128), bf), jnp.zeros((64, 128), bf))  # N % 256
    assert not ok(jnp.zeros((40, 128), bf), jnp.zeros((40, 256), bf))  # M < tile_r
    assert not ok(jnp.zeros((64, 128), bf), jnp.zeros((72, 256), bf))  # row counts differ
    assert not ok(jnp.zeros((64, 128), f32), jnp.zeros((64, 256), f32))
    four = TGMM_CONFIGS["4 stages"]  # 225 KiB with a bf16 output; over the limit with f32
    assert ok(jnp.zeros((64, 128), bf), jnp.zeros((64, 256), bf), four)
    assert not ok(jnp.zeros((64, 128), bf), jnp.zeros((64, 256), bf), four, f32)
    with pytest.raises(ValueError, match="num_groups"):
        mosaic_gpu_tgmm.tgmm_kernel(
            jnp.zeros((64, 128), bf), jnp.zeros((64, 256), bf), jnp.zeros(2, jnp.int32),
            3, None, _TGMM_BASE, 2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="block_m"):
        gmm_mosaic_gpu.tgmm(x := jnp.zeros((64, 128), bf), x, jnp.zeros(1, jnp.int32),
                            config=_TGMM_BASE, block_m=32)  # fmt: skip
    # Off Hopper (and interpreted) the Triton kernel runs, config or not.
    x, dy, gs, want = _tgmm_case(200, 128, 256, (50, 0, 100), seed=3)
    got = gmm_mosaic_gpu.tgmm(x, dy, gs, config=_TGMM_BASE, interpret=True)
    _check_tgmm(got, want, (50, 0, 100))
