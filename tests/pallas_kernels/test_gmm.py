"""Grouped matmul: every implementation against the plain-jnp oracle (values and gradients)."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm import IMPLEMENTATIONS, gmm, reference, resolve_implementation, tgmm
from pallas_kernels.gmm import cpu as gmm_cpu
from pallas_kernels.gmm import gpu as gmm_gpu
from pallas_kernels.gmm import mosaic_gpu as gmm_mosaic_gpu
from pallas_kernels.gmm import tpu as gmm_tpu
from pallas_kernels.gmm import xla as gmm_xla


@st.composite
def problems(draw, max_rows=70, max_groups=6):
    """(M, K, N, sizes): zero-size groups, odd sizes and rows past the groups all occur."""
    m = draw(st.integers(1, max_rows))
    g = draw(st.integers(1, max_groups))
    k = draw(st.sampled_from([8, 24, 40]))
    n = draw(st.sampled_from([8, 20, 48]))
    raw = draw(st.lists(st.integers(0, m), min_size=g, max_size=g))
    total = draw(st.integers(0, m))  # rows past `total` belong to no group
    sizes, left = [], total
    for r in raw:
        s = min(r, left)
        sizes.append(s)
        left -= s
    if draw(st.booleans()):
        sizes[-1] += left  # groups cover exactly `total` rows
    return m, k, n, np.asarray(sizes, np.int32)


def _inputs(m, k, n, g, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    c = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    return x, w, c


def _close(got, want, dtype):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert np.all(np.isfinite(got)), "non-finite output"
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    if dtype == jnp.float32 and jax.default_backend() == "gpu":
        # f32 dots on the GPU's tensor cores round operands to TF32 (jnp.dot's default
        # precision there), in the kernels and in the XLA reference alike.
        tol = 5e-3
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


ROOT = pathlib.Path(__file__).resolve().parents[2]
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class GmmTestBase:
    """Subclasses set IMPL, INTERPRET and the example budgets."""

    IMPL = "reference"
    INTERPRET = False
    EXAMPLES = 6
    GRAD_EXAMPLES = 4

    def call_gmm(self, x, w, gs, **kw):
        return gmm(x, w, gs, implementation=self.IMPL, interpret=self.INTERPRET, **kw)

    def call_tgmm(self, x, dy, gs, **kw):
        return tgmm(x, dy, gs, implementation=self.IMPL, interpret=self.INTERPRET, **kw)

    def _check_forward(self, prob, dtype, transpose_rhs, seed=0):
        m, k, n, sizes = prob
        x, w, _ = _inputs(m, k, n, len(sizes), dtype, seed)
        gs = jnp.asarray(sizes)
        w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
        out = jax.jit(functools.partial(self.call_gmm, transpose_rhs=transpose_rhs))(x, w_arg, gs)
        assert out.shape == (m, n) and out.dtype == dtype
        want = reference.gmm(x.astype(jnp.float32), w.astype(jnp.float32), gs)
        _close(out, want, dtype)
        assert np.all(np.asarray(out[int(sizes.sum()) :]) == 0), "rows past the groups not zero"

    def test_forward(self):
        @settings(max_examples=self.EXAMPLES, **_SETTINGS)
        @given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]), st.booleans())
        def run(prob, dtype, transpose_rhs):
            self._check_forward(prob, dtype, transpose_rhs)

        run()

    def test_tgmm(self):
        @settings(max_examples=self.EXAMPLES, **_SETTINGS)
        @given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]))
        def run(prob, dtype):
            m, k, n, sizes = prob
            x, _, _ = _inputs(m, k, n, len(sizes), dtype, 1)
            dy = _inputs(m, n, k, 1, dtype, 2)[0]
            gs = jnp.asarray(sizes)
            out = jax.jit(self.call_tgmm)(x, dy, gs)
            assert out.shape == (len(sizes), k, n)
            want = reference.tgmm(x.astype(jnp.float32), dy.astype(jnp.float32), gs)
            _close(out, want, dtype)
            for g in np.nonzero(sizes == 0)[0]:
                assert np.all(np.asarray(out[g]) == 0), "empty group gradient not zero"

        run()

    def test_gradients(self):
        @settings(max_examples=self.GRAD_EXAMPLES, **_SETTINGS)
        @given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]), st.booleans())
        def run(prob, dtype, transpose_rhs):
            m, k, n, sizes = prob
            x, w, c = _inputs(m, k, n, len(sizes), dtype, 3)
            gs = jnp.asarray(sizes)
            w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w

            def loss(x, w_arg):
                y = self.call_gmm(x, w_arg, gs, transpose_rhs=transpose_rhs)
                return jnp.sum(y.astype(jnp.float32) * c)

            def ref_loss(x, w):
                return jnp.sum(reference.gmm(x, w, gs) * c)

            dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w_arg)
            assert dx.dtype == dtype and dw.dtype == dtype
            rdx, rdw = jax.grad(ref_loss, (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
            if transpose_rhs:
                rdw = jnp.swapaxes(rdw, 1, 2)
            _close(dx, rdx, dtype)
            _close(dw, rdw, dtype)

        run()

    def test_lhs_rows(self):
        """``lhs_rows``: the product over ``lhs[lhs_rows]`` (ids repeat, some lhs rows unused),
        forward in both orientations, tgmm, and both gradients (``d lhs`` sums the rows each
        lhs row was gathered into) against the reference on the gathered rows."""

        @settings(max_examples=self.GRAD_EXAMPLES, **_SETTINGS)
        @given(problems(), st.integers(1, 40), st.booleans(), st.integers(0, 2**31 - 1))
        def run(prob, t, transpose_rhs, seed):
            m, k, n, sizes = prob
            x, w, c = _inputs(t, k, n, len(sizes), jnp.float32, seed % 1000)
            rows = jnp.asarray(np.random.default_rng(seed).integers(0, t, m), jnp.int32)
            gs = jnp.asarray(sizes)
            w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
            c = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, n)), jnp.float32)

            def loss(x, w_arg):
                y = self.call_gmm(x, w_arg, gs, transpose_rhs=transpose_rhs, lhs_rows=rows)
                return jnp.sum(y * c)

            def ref_loss(x, w):
                return jnp.sum(reference.gmm(x[rows], w, gs) * c)

            got = jax.jit(functools.partial(self.call_gmm, transpose_rhs=transpose_rhs))
            _close(got(x, w_arg, gs, lhs_rows=rows), reference.gmm(x[rows], w, gs), jnp.float32)
            dw_ref = reference.tgmm(x[rows], c, gs)
            _close(jax.jit(self.call_tgmm)(x, c, gs, lhs_rows=rows), dw_ref, jnp.float32)
            # dout_rows, alone and with lhs_rows: dout [t, k] read through the same ids.
            h = c[:, :k] if n >= k else jnp.tile(c, (1, -(-k // n)))[:, :k]
            _close(
                jax.jit(self.call_tgmm)(h, x, gs, dout_rows=rows),
                reference.tgmm(h, x[rows], gs),
                jnp.float32,
            )
            _close(
                jax.jit(self.call_tgmm)(x, x, gs, lhs_rows=rows, dout_rows=rows[::-1]),
                reference.tgmm(x[rows], x[rows[::-1]], gs),
                jnp.float32,
            )
            dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w_arg)
            rdx, rdw = jax.grad(ref_loss, (0, 1))(x, w)
            _close(dx, rdx, jnp.float32)
            _close(dw, jnp.swapaxes(rdw, 1, 2) if transpose_rhs else rdw, jnp.float32)

        run()

    def test_traced_group_sizes_one_compile(self):
        m, k, n, g = 37, 24, 20, 4
        x, w, _ = _inputs(m, k, n, g, jnp.float32, 4)
        f = jax.jit(self.call_gmm)
        for sizes in ([5, 0, 20, 12], [0, 0, 0, 30], [0, 0, 0, 0], [37, 0, 0, 0]):
            gs = jnp.asarray(sizes, jnp.int32)
            _close(f(x, w, gs), reference.gmm(x, w, gs), jnp.float32)


class TestReference(GmmTestBase):
    IMPL = "reference"


class TestXla(GmmTestBase):
    IMPL = "xla"
    EXAMPLES = 10
    GRAD_EXAMPLES = 6

    @settings(max_examples=10, **_SETTINGS)
    @given(
        problems(max_rows=90),
        st.sampled_from([1, 4, 8, 16]),
        st.sampled_from([None, 1, 2, 4, 64]),
    )
    def test_small_tiles(self, prob, tile_rows, small_tile_rows):
        """Many chunks per group, two-level schedules, chunks shifted back at the end."""
        m, k, n, sizes = prob
        x, w, c = _inputs(m, k, n, len(sizes), jnp.float32, 5)
        gs = jnp.asarray(sizes)
        tiles = dict(tile_rows=tile_rows, small_tile_rows=small_tile_rows)
        _close(gmm_xla.gmm(x, w, gs, **tiles), reference.gmm(x, w, gs), jnp.float32)
        _close(gmm_xla.tgmm(x, c, gs, **tiles), reference.tgmm(x, c, gs), jnp.float32)


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not gmm_cpu.available(),
    reason=f"native CPU kernel unavailable: {gmm_cpu.why_unavailable()}",
)
class TestCpuFfi(GmmTestBase):
    IMPL = "cpu_ffi"
    EXAMPLES = 12
    GRAD_EXAMPLES = 8

    @settings(max_examples=6, **_SETTINGS)
    @given(
        st.integers(1, 700),
        st.sampled_from([16, 37, 48, 64, 160]),
        st.sampled_from([16, 64, 70, 200]),
        st.integers(1, 9),
        st.integers(0, 2**31 - 1),
    )
    def test_blocked_paths(self, m, k, n, g, seed):
        """Sizes that reach every code path: 16 x 16 transposing packs and their scalar
        edges, full and partial 64-column strips, several row blocks per group; for the
        transposed product, 12-column panels with a partial last one, 32-row tiles with
        16-row and partial tails, several column blocks (N = 200); tgmm reductions longer than
        one pass, empty groups and rows past the groups."""
        rng = np.random.default_rng(seed)
        sizes = rng.multinomial(rng.integers(0, m + 1), rng.dirichlet(np.ones(g) * 0.5))
        sizes[rng.integers(g)] = 0
        x, w, c = _inputs(m, k, n, g, jnp.float32, seed % 1000)
        gs = jnp.asarray(sizes.astype(np.int32))
        want = reference.gmm(x, w, gs)
        _close(jax.jit(self.call_gmm)(x, w, gs), want, jnp.float32)
        nt = functools.partial(self.call_gmm, transpose_rhs=True)
        _close(jax.jit(nt)(x, jnp.swapaxes(w, 1, 2), gs), want, jnp.float32)
        _close(jax.jit(self.call_tgmm)(x, c, gs), reference.tgmm(x, c, gs), jnp.float32)

    @pytest.mark.parametrize("sizes", [[600, 0, 37, 40], [0, 1100, 0, 3]])
    def test_long_groups(self, sizes):
        """Groups longer than one row block (gmm) and one reduction pass (tgmm)."""
        m, k, n = 1200, 48, 80
        x, w, c = _inputs(m, k, n, len(sizes), jnp.float32, 11)
        gs = jnp.asarray(sizes, jnp.int32)
        _close(jax.jit(self.call_gmm)(x, w, gs), reference.gmm(x, w, gs), jnp.float32)
        _close(jax.jit(self.call_tgmm)(x, c, gs), reference.tgmm(x, c, gs), jnp.float32)

    @pytest.mark.parametrize("n", [256, 208, 400])
    def test_streamed_outputs(self, n):
        """Outputs of at least 1 MiB with rows of a multiple of 16 floats, which the kernel
        writes with non-temporal stores: the forward's whole 64-column strips (N = 208 also has
        a partial strip with plain stores) and the transposed product's per-item block copy
        (N = 400 over several column blocks, a partial last one). Uneven and empty groups,
        rows past the groups."""
        m, k = 1300, 40
        sizes = [400, 0, 700, 1, 177]  # 22 rows past the groups
        x, w, _ = _inputs(m, k, n, len(sizes), jnp.float32, 13)
        gs = jnp.asarray(sizes, jnp.int32)
        want = reference.gmm(x, w, gs)
        _close(jax.jit(self.call_gmm)(x, w, gs), want, jnp.float32)
        nt = functools.partial(self.call_gmm, transpose_rhs=True)
        _close(jax.jit(nt)(x, jnp.swapaxes(w, 1, 2), gs), want, jnp.float32)

    def test_transposed_long_contraction(self):
        """The transposed product with a contraction too long for more than one packed row
        tile per work item."""
        m, k, n = 90, 2100, 40
        x, w, _ = _inputs(m, k, n, 3, jnp.float32, 12)
        gs = jnp.asarray([70, 0, 17], jnp.int32)
        nt = functools.partial(self.call_gmm, transpose_rhs=True)
        _close(jax.jit(nt)(x, jnp.swapaxes(w, 1, 2), gs), reference.gmm(x, w, gs), jnp.float32)

    def test_transposed_dot_tails(self):
        """The transposed product's dot-product tails: groups whose last rows do not fill a
        16-row vector (1-15 of them, in blocks of 1-4 rows) on a contraction that is not a
        multiple of 16, with 4-column blocks and a partial one (N = 30), next to groups whose
        tail is long enough to stay on the vector tiles (a group of 46 rows: 14 tail rows)."""
        sizes = [1, 2, 3, 4, 0, 5, 7, 11, 17, 33, 46, 60]
        m, k, n = sum(sizes) + 3, 150, 30
        x, w, _ = _inputs(m, k, n, len(sizes), jnp.float32, 14)
        gs = jnp.asarray(sizes, jnp.int32)
        nt = functools.partial(self.call_gmm, transpose_rhs=True)
        _close(jax.jit(nt)(x, jnp.swapaxes(w, 1, 2), gs), reference.gmm(x, w, gs), jnp.float32)

    def test_empty_contraction(self):
        """K = 0 (and N = 0 in the forward, whose d lhs is then an NT product with K = 0)."""
        gs = jnp.asarray([2, 2], jnp.int32)
        nt = functools.partial(self.call_gmm, transpose_rhs=True)
        got = jax.jit(nt)(jnp.ones((5, 0)), jnp.ones((2, 3, 0)), gs)
        np.testing.assert_array_equal(got, np.zeros((5, 3), np.float32))
        x, w = jnp.ones((5, 3)), jnp.ones((2, 3, 0))
        dx = jax.grad(lambda a: jnp.sum(self.call_gmm(a, w, gs)))(x)
        np.testing.assert_array_equal(dx, np.zeros((5, 3), np.float32))

    def test_vmap(self):
        x, w, _ = _inputs(40, 16, 24, 3, jnp.float32, 9)
        gs = jnp.asarray([[10, 0, 25], [40, 0, 0]], jnp.int32)
        got = jax.vmap(self.call_gmm, in_axes=(None, None, 0))(x, w, gs)
        for i in range(2):
            _close(got[i], reference.gmm(x, w, gs[i]), jnp.float32)


class TestRaggedDot(GmmTestBase):
    IMPL = "ragged_dot"
    EXAMPLES = 4
    GRAD_EXAMPLES = 3


class TestTritonInterpret(GmmTestBase):
    IMPL = "triton"
    INTERPRET = True
    EXAMPLES = 4
    GRAD_EXAMPLES = 2

    @settings(max_examples=4, **_SETTINGS)
    @given(problems(), st.booleans())
    def test_multi_tile(self, prob, transpose_rhs):
        """Small blocks: many visits per group, partial K/N blocks, clamped row starts."""
        m, k, n, sizes = prob
        x, w, c = _inputs(m, k, n, len(sizes), jnp.float32, 6)
        gs = jnp.asarray(sizes)
        blocks = dict(block_m=16, block_n=16, block_k=16)
        w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
        out = gmm_gpu.gmm(
            x, w_arg, gs, transpose_rhs=transpose_rhs, interpret=True, group_m=2, **blocks
        )
        _close(out, reference.gmm(x, w, gs), jnp.float32)
        _close(
            gmm_gpu.tgmm(x, c, gs, interpret=True, **blocks), reference.tgmm(x, c, gs), jnp.float32
        )


class TestMosaicTpuInterpret(GmmTestBase):
    IMPL = "mosaic_tpu"
    INTERPRET = True
    EXAMPLES = 3
    GRAD_EXAMPLES = 2

    @settings(max_examples=3, **_SETTINGS)
    @given(problems(max_rows=40, max_groups=4), st.booleans())
    def test_multi_tile(self, prob, transpose_rhs):
        """Small tiles: shared tiles visited by two groups, K remainder masking."""
        m, k, n, sizes = prob
        x, w, c = _inputs(m, k, n, len(sizes), jnp.float32, 7)
        gs = jnp.asarray(sizes)
        w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
        out = gmm_tpu.gmm(
            x, w_arg, gs, transpose_rhs=transpose_rhs, interpret=True, tiling=(8, 16, 16)
        )
        _close(out, reference.gmm(x, w, gs), jnp.float32)
        got = gmm_tpu.tgmm(x, c, gs, interpret=True, tiling=(8, 16, 16))
        _close(got, reference.tgmm(x, c, gs), jnp.float32)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a compiled GPU backend")
class TestTritonCompiled(GmmTestBase):
    IMPL = "triton"
    EXAMPLES = 10
    GRAD_EXAMPLES = 6

    @pytest.mark.parametrize("m,k,n,g", [(1000, 256, 384, 7), (4096, 512, 1024, 16)])
    def test_large_bf16(self, m, k, n, g):
        rng = np.random.default_rng(8)
        sizes = rng.multinomial(m - 37, rng.dirichlet(np.ones(g))).astype(np.int32)
        sizes[1] = 0
        sizes[0] += m - 37 - sizes.sum()
        self._check_forward((m, k, n, sizes), jnp.bfloat16, False)
        self._check_forward((m, k, n, sizes), jnp.bfloat16, True)


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
        contractions (compiled) and both splits of the CTA tile between the warpgroups."""

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
            for transpose_rhs in (False,) if self.INTERPRET else (False, True):
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
        # Interpreted, d lhs runs the Triton kernel (see `applies`).
        assert gmm_mosaic_gpu.applies(dy, w, True, interpret=self.INTERPRET) != self.INTERPRET

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


def test_unknown_implementation_lists_allowed():
    x, w, _ = _inputs(8, 8, 8, 2, jnp.float32, 0)
    with pytest.raises(ValueError, match="allowed"):
        gmm(x, w, jnp.asarray([4, 4], jnp.int32), implementation="cublas")


def test_lhs_rows_errors():
    x, w, _ = _inputs(6, 8, 4, 2, jnp.float32, 0)
    gs = jnp.asarray([3, 3], jnp.int32)
    with pytest.raises(ValueError, match="lhs_rows"):
        gmm(x, w, gs, lhs_rows=jnp.zeros((6,), jnp.float32))
    with pytest.raises(ValueError, match="dout"):
        tgmm(x, jnp.ones((6, 4)), gs, lhs_rows=jnp.zeros((5,), jnp.int32))
    # Out of range: the native kernel reports it; the gathering implementations give NaN rows.
    bad = jnp.asarray([0, 1, 2, 3, 4, 6], jnp.int32)
    if jax.default_backend() == "cpu" and gmm_cpu.available():
        with pytest.raises(Exception, match="lhs_rows must lie in"):
            jax.block_until_ready(gmm(x, w, gs, lhs_rows=bad, implementation="cpu_ffi"))
    assert np.isnan(np.asarray(gmm(x, w, gs, lhs_rows=bad, implementation="xla"))[5]).all()
    with pytest.raises(ValueError, match="dout_rows"):
        tgmm(x, x, gs, dout_rows=jnp.zeros((6, 1), jnp.int32))
    with pytest.raises(ValueError, match="dout"):
        tgmm(x, x, gs, dout_rows=jnp.zeros((5,), jnp.int32))
    if jax.default_backend() == "cpu" and gmm_cpu.available():
        with pytest.raises(Exception, match="dout_rows must lie in"):
            jax.block_until_ready(tgmm(x, x, gs, dout_rows=bad, implementation="cpu_ffi"))
        with pytest.raises(Exception, match="lhs_rows must lie in"):
            wt = jnp.swapaxes(w, 1, 2)
            out = gmm(x, wt, gs, transpose_rhs=True, lhs_rows=bad, implementation="cpu_ffi")
            jax.block_until_ready(out)
    assert np.isnan(np.asarray(tgmm(x, x, gs, dout_rows=bad, implementation="xla"))[1]).any()


def test_shape_errors_name_the_argument():
    x, w, _ = _inputs(8, 8, 8, 2, jnp.float32, 0)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(x, w, jnp.asarray([4, 4, 0], jnp.int32))
    with pytest.raises(ValueError, match="rhs"):
        gmm(x, w[:, :4], jnp.asarray([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="lhs"):
        gmm(x[None], w, jnp.asarray([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="dout"):
        tgmm(x, x[:4], jnp.asarray([4, 4], jnp.int32))


def test_resolution_order():
    backend = jax.default_backend()
    assert resolve_implementation(None) in IMPLEMENTATIONS
    if backend == "cpu":
        want = "cpu_ffi" if gmm_cpu.available() else "xla"
        assert resolve_implementation(None) == want
        assert resolve_implementation(["mosaic_tpu", "triton", "xla"]) == "xla"
        assert resolve_implementation(["mosaic_tpu", "xla"], interpret=True) == "mosaic_tpu"
        with pytest.raises(ValueError, match="runs on"):
            resolve_implementation("triton")


def test_cpu_default_falls_back_without_a_compiler(tmp_path):
    """No usable C++ compiler: the native kernels report why, CPU uses the XLA loop for gmm
    and XLA's own ops for top-k and the combine gradient."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from pallas_kernels.gmm import cpu, gmm, resolve_implementation\n"
        "assert not cpu.available()\n"
        "assert 'failed' in cpu.why_unavailable(), cpu.why_unavailable()\n"
        "assert resolve_implementation(None) == 'xla'\n"
        "x = jnp.ones((6, 4)); w = jnp.ones((2, 4, 3))\n"
        "assert float(gmm(x, w, jnp.asarray([2, 3])).sum()) == 60.0\n"
        "try:\n"
        "    resolve_implementation('cpu_ffi')\n"
        "    raise SystemExit('no error')\n"
        "except ValueError as e:\n"
        "    assert 'cpu_ffi' in str(e) and 'failed' in str(e), e\n"
        "from pallas_kernels import rows, topk\n"
        "assert topk.resolve_implementation(None, x, 2) == 'reference'\n"
        "assert rows.resolve_implementation(None, (x.dtype,)) == 'reference'\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JMOE_CACHE_DIR=str(tmp_path))
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
