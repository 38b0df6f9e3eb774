"""Shared by the grouped-matmul tests: problem strategies, inputs, the tolerance check and the
base test class every implementation's test class subclasses (not collected itself)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm import gmm, reference, tgmm


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
