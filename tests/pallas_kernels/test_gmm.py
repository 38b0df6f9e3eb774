"""Grouped matmul: every implementation against the plain-jnp oracle (values and gradients).

The shared problem strategies and the base class are in ``_gmm_helpers.py``; the Mosaic GPU
(Hopper) kernel's tests are in ``test_gmm_mosaic_gpu.py``."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm import IMPLEMENTATIONS, gmm, reference, resolve_implementation, tgmm
from pallas_kernels.gmm import cpu as gmm_cpu
from pallas_kernels.gmm import gpu as gmm_gpu
from pallas_kernels.gmm import tpu as gmm_tpu
from pallas_kernels.gmm import xla as gmm_xla
from tests.pallas_kernels._gmm_helpers import _SETTINGS, GmmTestBase, _close, _inputs, problems

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
        # Rows read by index over several row blocks and reduction passes (both operands).
        rng = np.random.default_rng(len(sizes) + sizes[1])
        rows, perm = (jnp.asarray(rng.integers(0, m, m), jnp.int32) for _ in range(2))
        got = jax.jit(self.call_gmm)(x, w, gs, lhs_rows=rows)
        _close(got, reference.gmm(x[rows], w, gs), jnp.float32)
        got = jax.jit(self.call_tgmm)(x, c, gs, lhs_rows=rows, dout_rows=perm)
        _close(got, reference.tgmm(x[rows], c[perm], gs), jnp.float32)

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
        # The same with the lhs rows read by index (from 300 token rows).
        rows = jnp.asarray(np.random.default_rng(n).integers(0, 300, m), jnp.int32)
        want = reference.gmm(x[:300][rows], w, gs)
        _close(jax.jit(nt)(x[:300], jnp.swapaxes(w, 1, 2), gs, lhs_rows=rows), want, jnp.float32)

    def test_zero_rows_by_index(self):
        """M = 0 rows read by index: an empty product, zero weight gradients."""
        x, w, c = _inputs(5, 8, 6, 3, jnp.float32, 15)
        gs, none = jnp.zeros((3,), jnp.int32), jnp.zeros((0,), jnp.int32)
        assert self.call_gmm(x, w, gs, lhs_rows=none).shape == (0, 6)
        loss = lambda x, w: jnp.sum(self.call_gmm(x, w, gs, lhs_rows=none))
        dx, dw = jax.grad(loss, (0, 1))(x, w)
        assert not np.asarray(dx).any() and not np.asarray(dw).any()
        dw = self.call_tgmm(c[:0], x, gs, dout_rows=none)
        assert dw.shape == (3, 6, 8) and not np.asarray(dw).any()

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
        "assert topk.resolve_implementation(None, dtype=x.dtype, k=2) == 'reference'\n"
        "assert rows.resolve_implementation(None, dtypes=(x.dtype,)) == 'reference'\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JMOE_CACHE_DIR=str(tmp_path))
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
