"""Combine gradient: every implementation against the plain-jnp definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.rows import IMPLEMENTATIONS, combine_grad, reference, resolve_implementation
from pallas_kernels.rows import cpu as rows_cpu

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _inputs(n, t, d, dtype, seed):
    rng = np.random.default_rng(seed)
    ys = jnp.asarray(rng.standard_normal((n, d)), dtype)
    dy = jnp.asarray(rng.standard_normal((t, d)), dtype)
    token = jnp.asarray(rng.integers(0, t, n), jnp.int32)
    weight = jnp.asarray(rng.random(n), dtype)
    return ys, dy, token, weight


def _plain(ys, dy, token, weight):
    """The definition, written out with numpy in float64."""
    ys, dy, w = (np.asarray(a, np.float64) for a in (ys, dy, weight))
    g = dy[np.asarray(token)]
    return w[:, None] * g, np.sum(ys * g, axis=-1)


class CombineGradTestBase:
    IMPL = "reference"

    def _check(self, n, t, d, dtype, seed):
        args = _inputs(n, t, d, dtype, seed)
        dys, dw = jax.jit(lambda *a: combine_grad(*a, implementation=self.IMPL))(*args)
        want_dys, want_dw = _plain(*args)
        assert dys.dtype == dtype and dw.dtype == jnp.float32
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(np.asarray(dys, np.float64), want_dys, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=tol, atol=tol * np.sqrt(d))

    def test_random(self):
        @settings(max_examples=25, **_SETTINGS)
        @given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 70), st.integers(0, 99))
        def run(n, t, d, seed):
            self._check(n, t, d, jnp.float32, seed)

        run()

    @pytest.mark.parametrize("n,t,d", [(8192, 1024, 512), (129, 7, 16), (64, 64, 17)])
    def test_layer_shapes(self, n, t, d):
        """Several work items, a partial last item, D not a multiple of 16."""
        self._check(n, t, d, jnp.float32, n)

    def test_bf16(self):
        self._check(100, 9, 48, jnp.bfloat16, 3)


class TestReference(CombineGradTestBase):
    IMPL = "reference"


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not rows_cpu.available(),
    reason=f"native CPU kernel unavailable: {rows_cpu.why_unavailable()}",
)
class TestCpuFfi(CombineGradTestBase):
    IMPL = "cpu_ffi"

    def test_matches_reference_bitwise_on_dys(self):
        args = _inputs(300, 20, 40, jnp.float32, 7)
        got = combine_grad(*args, implementation="cpu_ffi")[0]
        np.testing.assert_array_equal(got, reference.combine_grad(*args)[0])

    def test_token_out_of_range_is_an_error(self):
        ys, dy, token, weight = _inputs(10, 4, 8, jnp.float32, 1)
        with pytest.raises(Exception, match="token index out of"):
            jax.block_until_ready(
                combine_grad(ys, dy, token.at[3].set(4), weight, implementation="cpu_ffi")
            )


def test_bad_shapes():
    ys, dy, token, weight = _inputs(10, 4, 8, jnp.float32, 1)
    with pytest.raises(ValueError, match=r"ys must be \[N, D\] and dy \[T, D\]"):
        combine_grad(ys, dy[:, :5], token, weight)
    with pytest.raises(ValueError, match=r"token and weight must be \[N=10\]"):
        combine_grad(ys, dy, token[:9], weight)


def test_resolution():
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert resolve_implementation(None, dtypes=(f32, f32)) in IMPLEMENTATIONS
    assert resolve_implementation(None, dtypes=(f32, bf16)) == "reference"
    with pytest.raises(ValueError, match="unknown combine_grad implementation"):
        resolve_implementation("scatter")
    if jax.default_backend() == "cpu":
        want = "cpu_ffi" if rows_cpu.available() else "reference"
        assert resolve_implementation(None, dtypes=(f32,)) == want
