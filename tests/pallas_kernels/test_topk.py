"""Top-k: every implementation against jax.lax.top_k, bit for bit (ties, signed zeros, NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.topk import CPU_FFI_MAX_K, IMPLEMENTATIONS, resolve_implementation, top_k
from pallas_kernels.topk import cpu as topk_cpu

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
_NEG_NAN = np.array([0xFFC00000], np.uint32).view(np.float32)[0]  # what 0 / 0 gives on x86
# Few distinct values, so ties are common; signed zeros, infinities and both NaN signs.
_VALUES = np.array([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf, -np.inf, np.nan, _NEG_NAN])


@st.composite
def operands(draw):
    batch = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    n = draw(st.integers(1, 70))
    k = draw(st.integers(1, n))
    kind = draw(st.sampled_from(["ties", "specials", "normal"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    shape = (*batch, n)
    if kind == "ties":
        x = rng.integers(-3, 3, shape).astype(np.float32)
    elif kind == "specials":
        x = rng.choice(_VALUES, shape).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    return x, k


def _bits(a):
    return np.asarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint16)


class TopKTestBase:
    IMPL = "reference"

    def _check(self, x, k):
        got_v, got_i = jax.jit(lambda a: top_k(a, k, implementation=self.IMPL))(x)
        want_v, want_i = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
        assert got_v.dtype == want_v.dtype
        np.testing.assert_array_equal(_bits(np.asarray(got_v)), _bits(np.asarray(want_v)))

    def test_matches_lax(self):
        @settings(max_examples=60, **_SETTINGS)
        @given(operands())
        def run(case):
            x, k = case
            self._check(jnp.asarray(x), k)

        run()

    @pytest.mark.parametrize("shape,k", [((1024, 256), 8), ((3, 300), 64), ((5, 17), 17)])
    def test_router_shapes(self, shape, k):
        """Several 16-lane chunks, a partial last chunk, and k = N."""
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        self._check(jnp.asarray(x), k)

    def test_adjacent_floats(self):
        """Values one ulp apart (and subnormals) of both signs keep their order."""
        base = np.array([-1.0, 1.0, -3.5, 2.0, 0.0, -0.0], np.float32)
        ulps = [np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf))]
        tiny = np.array([1e-45, -1e-45, 2e-45, -2e-45], np.float32)
        x = np.concatenate([base, *ulps, tiny])
        x = np.random.default_rng(6).permutation(x)[None]
        self._check(jnp.asarray(x), x.shape[-1])

    def test_bf16(self):
        x = np.random.default_rng(2).integers(-4, 4, (6, 40)).astype(np.float32)
        self._check(jnp.asarray(x, jnp.bfloat16), 7)

    def test_gradient_reaches_the_selected_entries(self):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 33)), jnp.float32)
        c = jnp.arange(1.0, 6.0)

        def loss(fn, a):
            return jnp.sum(fn(a)[0] * c)

        got = jax.grad(loss, argnums=1)(lambda a: top_k(a, 5, implementation=self.IMPL), x)
        want = jax.grad(loss, argnums=1)(lambda a: jax.lax.top_k(a, 5), x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    def test_vmap(self):
        x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 4, 20)), jnp.float32)
        got = jax.vmap(lambda a: top_k(a, 3, implementation=self.IMPL)[1])(x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, 3)[1]))


class TestReference(TopKTestBase):
    IMPL = "reference"


@pytest.mark.skipif(
    jax.default_backend() != "cpu" or not topk_cpu.available(),
    reason=f"native CPU kernel unavailable: {topk_cpu.why_unavailable()}",
)
class TestCpuFfi(TopKTestBase):
    IMPL = "cpu_ffi"

    def test_large_k(self):
        """Past the default's k limit the kernel is still exact when asked for by name."""
        x = np.random.default_rng(5).integers(0, 50, (4, 500)).astype(np.float32)
        self._check(jnp.asarray(x), 300)


@pytest.mark.parametrize("k", [0, 9, 2.0])
def test_bad_k(k):
    with pytest.raises(ValueError, match=r"k=.* must be an int with 1 <= k <= N=8"):
        top_k(jnp.zeros((3, 8)), k)


def test_resolution():
    x = jnp.zeros((2, 100))
    assert resolve_implementation(None, dtype=x.dtype, k=8) in IMPLEMENTATIONS
    assert resolve_implementation(None, dtype=jnp.int32, k=8) == "reference"
    # f64 would be rounded to f32 keys: it stays with XLA's TopK.
    assert resolve_implementation(None, dtype=np.float64, k=8) == "reference"
    assert resolve_implementation(None, dtype=x.dtype, k=CPU_FFI_MAX_K + 1) == "reference"
    with pytest.raises(ValueError, match="unknown top_k implementation"):
        resolve_implementation("sort", dtype=x.dtype, k=8)
    with pytest.raises(ValueError, match="cpu_ffi needs a float operand"):
        resolve_implementation("cpu_ffi", dtype=jnp.int32, k=8)
    if jax.default_backend() == "cpu":
        want = "cpu_ffi" if topk_cpu.available() else "reference"
        assert resolve_implementation(None, dtype=x.dtype, k=8) == want
        assert resolve_implementation(["cpu_ffi", "reference"], dtype=x.dtype, k=99) == want
