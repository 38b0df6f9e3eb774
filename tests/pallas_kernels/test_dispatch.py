"""Tests for pallas_kernels.dispatch: every implementation against the plain-jnp reference."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import dispatch as dsp
from pallas_kernels.dispatch import api as dsp_api
from pallas_kernels.dispatch import reference
from tests.pallas_kernels._lowering import abstract_h100

# Subclasses per implementation share the test methods: one hypothesis test per executor.
_HEALTH = [HealthCheck.differing_executors]
_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=_HEALTH)


@st.composite
def routing_cases(draw, max_t=12, max_d=20):
    """Random routing problems: tiny capacities (overflow), unused experts, null experts."""
    # sampled_from lists start with non-trivial values: hypothesis tries early entries first.
    t = draw(st.sampled_from([max_t - 3, 1, 4, max_t, 7]))
    k = draw(st.sampled_from([2, 1, 3]))
    e = draw(st.sampled_from([4, 1, 2, 6, 3]))
    c = draw(st.sampled_from([2, 1, 3, 4]))
    d = draw(st.sampled_from([max_d - 3, 1, 8, max_d]))
    seed = draw(st.integers(0, 2**31 - 1))
    use_priority = draw(st.booleans())
    rng = np.random.default_rng(seed)
    used = max(1, draw(st.integers(1, e)))  # experts >= `used` get no tokens
    # An id == e is a null expert: never buffered even when valid.
    ids = rng.integers(0, used + 1, (t, k))
    ids = np.where(ids == used, e, ids) if rng.random() < 0.5 else np.minimum(ids, used - 1)
    valid = rng.random((t, k)) < 0.85
    prio = rng.random((t, k)).astype(np.float32) if use_priority else None
    if use_priority and rng.random() < 0.5:
        prio = np.round(prio * 3) / 3  # ties, broken by token order
    return dict(
        t=t,
        k=k,
        e=e,
        c=c,
        d=d,
        ids=jnp.asarray(ids, jnp.int32),
        valid=jnp.asarray(valid),
        prio=None if prio is None else jnp.asarray(prio),
        rng=rng,
    )


def _numpy_positions(ids, valid, e, prio):
    """Brute-force oracle: a slot's rank among the valid slots of its expert."""
    ids, valid = np.asarray(ids), np.asarray(valid)
    t, k = ids.shape
    n = t * k
    ids_n, valid_n = ids.reshape(n), valid.reshape(n) & (ids.reshape(n) < e)
    prio_n = None if prio is None else np.asarray(prio).reshape(n)
    pos = np.full(n, -1, np.int64)
    for a in range(n):
        if not valid_n[a]:
            continue
        before = 0
        for b in range(n):
            if b == a or not valid_n[b] or ids_n[b] != ids_n[a]:
                continue
            if prio_n is None:
                before += b < a
            else:
                before += prio_n[b] > prio_n[a] or (prio_n[b] == prio_n[a] and b < a)
        pos[a] = before
    return pos.reshape(t, k)


def _property(method, max_examples, **case_kw):
    """A hypothesis test calling `self.<method>(case)`; subclasses can re-create it smaller."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=_HEALTH,
    )
    @given(routing_cases(**case_kw))
    def test(self, case):
        getattr(self, method)(case)

    return test


class TestPositions:
    @_SETTINGS
    @given(routing_cases())
    def test_positions_match_bruteforce_and_reference(self, case):
        got = dsp.positions(case["ids"], case["valid"], case["e"], priority_TxK=case["prio"])
        want = _numpy_positions(case["ids"], case["valid"], case["e"], case["prio"])
        np.testing.assert_array_equal(np.asarray(got), want)
        ref = reference.positions(case["ids"], case["valid"], case["e"], priority_TxK=case["prio"])
        np.testing.assert_array_equal(np.asarray(ref), want)
        assert got.dtype == jnp.int32

    def test_priority_keeps_most_confident(self):
        ids = jnp.zeros((4, 1), jnp.int32)
        valid = jnp.ones((4, 1), bool)
        prio = jnp.array([[0.1], [0.9], [0.5], [0.7]])
        pos = dsp.positions(ids, valid, 1, priority_TxK=prio)
        np.testing.assert_array_equal(np.asarray(pos)[:, 0], [3, 0, 2, 1])
        assert int(dsp.dropped_count(pos, 2)) == 2

    @_SETTINGS
    @given(routing_cases())
    def test_dropped_count_exact(self, case):
        pos = dsp.positions(case["ids"], case["valid"], case["e"], priority_TxK=case["prio"])
        ids, valid = np.asarray(case["ids"]), np.asarray(case["valid"])
        counts = np.bincount(ids[valid & (ids < case["e"])], minlength=case["e"])
        want = int(np.maximum(counts - case["c"], 0).sum())
        got = dsp.dropped_count(pos, case["c"])
        assert got.dtype == jnp.int32
        assert int(got) == want

    def test_invalid_arguments(self):
        ids = jnp.zeros((3, 2), jnp.int32)
        pos = dsp.positions(ids, jnp.ones((3, 2), bool), 2)
        x = jnp.ones((3, 4))
        with pytest.raises(ValueError, match="capacity"):
            dsp.dispatch(x, ids, pos, 2, 0)
        with pytest.raises(ValueError, match="capacity"):
            dsp.dropped_count(pos, -1)
        with pytest.raises(ValueError, match="num_experts"):
            dsp.dispatch(x, ids, pos, 0, 2)
        with pytest.raises(ValueError, match="implementation.*xla"):
            dsp.dispatch(x, ids, pos, 2, 2, implementation="cuda")
        with pytest.raises(ValueError, match="pos_TxK"):
            dsp.dispatch(x, ids, pos[:, :1], 2, 2)
        with pytest.raises(ValueError, match="expert_ids_TxK"):
            dsp.dispatch(x[:2], ids, pos, 2, 2)
        with pytest.raises(ValueError, match="weights_TxK"):
            dsp.combine(jnp.ones((2, 2, 4)), ids, pos, jnp.ones((3, 1)))
        with pytest.raises(ValueError, match="buf_ExCxD"):
            dsp.combine(jnp.ones((4, 4)), ids, pos, jnp.ones((3, 2)))

    def test_resolve_implementation(self):
        assert dsp.resolve_implementation("reference") == "reference"
        assert dsp.resolve_implementation(["mosaic_tpu", "xla"]) in ("mosaic_tpu", "xla")
        assert dsp.resolve_implementation(["triton", "xla"], interpret=True) == "triton"
        if jax.default_backend() == "cpu":
            assert dsp.resolve_implementation(None) == "xla"
            with pytest.raises(ValueError, match="implementation"):
                dsp.resolve_implementation("triton")


class DispatchImplTest:
    """Shared checks; subclasses set `implementation` and `interpret`."""

    implementation = "xla"
    interpret = False

    def _kw(self):
        return dict(implementation=self.implementation, interpret=self.interpret)

    def _inputs(self, case, dtype=jnp.float32):
        rng = case["rng"]
        pos = dsp.positions(case["ids"], case["valid"], case["e"], priority_TxK=case["prio"])
        x = jnp.asarray(rng.normal(size=(case["t"], case["d"])), dtype)
        w = jnp.asarray(rng.random((case["t"], case["k"])), jnp.float32)
        buf = jnp.asarray(rng.normal(size=(case["e"], case["c"], case["d"])), dtype)
        dy = jnp.asarray(rng.normal(size=(case["t"], case["d"])), dtype)
        return pos, x, w, buf, dy

    def _dispatch_case(self, case):
        pos, x, _, buf, _ = self._inputs(case)
        ids, e, c = case["ids"], case["e"], case["c"]

        def f(x, impl_kw):
            return dsp.dispatch(x, ids, pos, e, c, **impl_kw)

        got, vjp = jax.vjp(lambda x: f(x, self._kw()), x)
        want, vjp_ref = jax.vjp(lambda x: reference.dispatch(x, ids, pos, e, c), x)
        assert got.shape == (e, c, case["d"]) and got.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        (dx,) = vjp(buf)
        (dx_ref,) = vjp_ref(buf)
        np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-5)

    def _combine_case(self, case):
        pos, _, w, buf, dy = self._inputs(case)
        ids = case["ids"]
        got, vjp = jax.vjp(lambda b, w: dsp.combine(b, ids, pos, w, **self._kw()), buf, w)
        want, vjp_ref = jax.vjp(lambda b, w: reference.combine(b, ids, pos, w), buf, w)
        assert got.shape == (case["t"], case["d"]) and got.dtype == buf.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        dbuf, dw = vjp(dy)
        dbuf_ref, dw_ref = vjp_ref(dy)
        np.testing.assert_allclose(np.asarray(dbuf), np.asarray(dbuf_ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_ref), rtol=1e-5, atol=1e-5)

    def _full_capacity_case(self, case):
        t, k, e = case["t"], case["k"], case["e"]
        pos, x, _, _, _ = self._inputs(case)
        c = t * k
        assert int(dsp.dropped_count(pos, c)) == 0
        ones = jnp.ones((t, k), jnp.float32)
        buf = dsp.dispatch(x, case["ids"], pos, e, c, **self._kw())
        y = dsp.combine(buf, case["ids"], pos, ones, **self._kw())
        ids, valid = np.asarray(case["ids"]), np.asarray(case["valid"])
        n_kept = ((ids < e) & valid).sum(axis=1)
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(x) * n_kept[:, None], rtol=1e-5, atol=1e-5
        )

    test_dispatch_forward_and_grad = _property("_dispatch_case", 6)
    test_combine_forward_and_grads = _property("_combine_case", 6)
    test_full_capacity_drops_nothing = _property("_full_capacity_case", 2, max_t=8, max_d=12)

    def _check_case(self, case):
        pos, x, w, buf, dy = self._inputs(case)
        ids, e, c = case["ids"], case["e"], case["c"]
        got, vjp = jax.vjp(lambda x: dsp.dispatch(x, ids, pos, e, c, **self._kw()), x)
        want, vjp_ref = jax.vjp(lambda x: reference.dispatch(x, ids, pos, e, c), x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_allclose(
            np.asarray(vjp(buf)[0]), np.asarray(vjp_ref(buf)[0]), rtol=1e-5, atol=1e-5
        )
        got, vjp = jax.vjp(lambda b, w: dsp.combine(b, ids, pos, w, **self._kw()), buf, w)
        want, vjp_ref = jax.vjp(lambda b, w: reference.combine(b, ids, pos, w), buf, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        for a, b in zip(vjp(dy), vjp_ref(dy), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)

    def test_multiblock_ragged_shapes(self):
        """Several kernel blocks with ragged edges in rows (16) and columns (256)."""
        t, k, e, c, d = 37, 2, 5, 9, 300
        rng = np.random.default_rng(3)
        ids = jnp.asarray(rng.integers(0, e + 1, (t, k)), jnp.int32)
        valid = jnp.asarray(rng.random((t, k)) < 0.9)
        case = dict(t=t, k=k, e=e, c=c, d=d, ids=ids, valid=valid, prio=None, rng=rng)
        self._check_case(case)

    @pytest.mark.slow
    @settings(max_examples=40, deadline=None, suppress_health_check=_HEALTH)
    @given(routing_cases(max_t=40, max_d=80))
    def test_many_random_cases(self, case):
        self._check_case(case)

    def test_bfloat16_roundtrip_under_jit(self):
        t, k, e, c, d = 10, 2, 3, 4, 16
        rng = np.random.default_rng(1)
        ids = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
        pos = dsp.positions(ids, jnp.ones((t, k), bool), e)
        x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
        w = jnp.asarray(rng.random((t, k)), jnp.float32)

        def loss(x, w, kw):
            buf = (
                dsp.dispatch(x, ids, pos, e, c, **kw)
                if kw
                else reference.dispatch(x, ids, pos, e, c)
            )
            y = (
                dsp.combine(buf * 2, ids, pos, w, **kw)
                if kw
                else reference.combine(buf * 2, ids, pos, w)
            )
            return jnp.sum(y.astype(jnp.float32) ** 2)

        got = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, self._kw()), (0, 1)))(x, w)
        want = jax.value_and_grad(lambda x, w: loss(x, w, None), (0, 1))(x, w)
        assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
            )


class TestReferenceAgainstNumpy:
    """The oracle itself, against explicit loops (the other classes compare to the oracle)."""

    @_SETTINGS
    @given(routing_cases())
    def test_reference_matches_loops(self, case):
        t, k, e, c, d = case["t"], case["k"], case["e"], case["c"], case["d"]
        rng = case["rng"]
        pos = np.asarray(reference.positions(case["ids"], case["valid"], e))
        ids = np.asarray(case["ids"])
        x = rng.normal(size=(t, d)).astype(np.float32)
        w = rng.random((t, k)).astype(np.float32)
        buf = np.zeros((e, c, d), np.float32)
        y = np.zeros((t, d), np.float32)
        for i in range(t):
            for j in range(k):
                if 0 <= pos[i, j] < c and ids[i, j] < e:
                    buf[ids[i, j], pos[i, j]] = x[i]
        for i in range(t):
            for j in range(k):
                if 0 <= pos[i, j] < c and ids[i, j] < e:
                    y[i] += w[i, j] * buf[ids[i, j], pos[i, j]]
        got_buf = reference.dispatch(jnp.asarray(x), case["ids"], jnp.asarray(pos), e, c)
        np.testing.assert_array_equal(np.asarray(got_buf), buf)
        got_y = reference.combine(got_buf, case["ids"], jnp.asarray(pos), jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(got_y), y, rtol=1e-5, atol=1e-5)
        # Same through the public API's "reference" implementation.
        api_buf = dsp.dispatch(
            jnp.asarray(x), case["ids"], jnp.asarray(pos), e, c, implementation="reference"
        )
        np.testing.assert_array_equal(np.asarray(api_buf), buf)


class TestXla(DispatchImplTest):
    implementation = "xla"

    def test_memory_is_index_based(self):
        """Compiled temporaries stay far below one [T, E, C] float tensor."""
        t, k, e, d = 2048, 2, 64, 64
        c = int(np.ceil(1.25 * t * k / e))
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
        pos = dsp.positions(ids, jnp.ones((t, k), bool), e)
        x = jnp.ones((t, d))
        w = jnp.ones((t, k))

        def loss(x, w):
            buf = dsp.dispatch(x, ids, pos, e, c, implementation="xla")
            return jnp.sum(dsp.combine(buf, ids, pos, w, implementation="xla") ** 2)

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < t * e * c * 4 / 4, temp


def _lower_fwd_bwd(implementation, platform, dtype):
    """Lowers dispatch -> combine fwd+bwd for `platform` without needing that hardware."""
    t, k, e, c, d = 48, 2, 4, 16, 256
    ids = jnp.zeros((t, k), jnp.int32)
    pos = jnp.zeros((t, k), jnp.int32)

    # The public API refuses kernels the default backend cannot run; lower the custom_vjp
    # cores directly.
    rows = dsp_api._slot_rows(ids, pos, e, c)

    def loss(x, w):
        buf = dsp_api._dispatch(x, rows, e, c, implementation, False)
        y = dsp_api._combine(buf, rows, w, implementation, False)
        return jnp.sum(y.astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((t, d), dtype), jax.ShapeDtypeStruct((t, k), jnp.float32))
    with abstract_h100() if platform == "cuda" else contextlib.nullcontext():
        traced = jax.jit(jax.grad(loss, (0, 1))).trace(*args)
        return traced.lower(lowering_platforms=(platform,)).as_text()


class TestMosaicTpuInterpret(DispatchImplTest):
    """TPU interpret mode simulates every DMA: compiling it is slow, so fewer examples."""

    implementation = "mosaic_tpu"
    interpret = True
    test_dispatch_forward_and_grad = _property("_dispatch_case", 2)
    test_combine_forward_and_grads = _property("_combine_case", 2)
    test_full_capacity_drops_nothing = _property("_full_capacity_case", 1, max_t=8, max_d=12)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_lowers_to_mosaic(self, dtype):
        """Mosaic lowering (not compilation) runs on CPU: catches block-shape/DMA errors."""
        assert _lower_fwd_bwd("mosaic_tpu", "tpu", dtype).count("tpu_custom_call") >= 4


class TestTritonInterpret(DispatchImplTest):
    implementation = "triton"
    interpret = True

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_lowers_to_triton(self, dtype):
        """Triton lowering (not PTX compilation) runs on CPU: catches unsupported indexing."""
        # fwd+bwd: dispatch gather, combine-bwd gather and row dot, dispatch-bwd gather-sum.
        assert _lower_fwd_bwd("triton", "cuda", dtype).count("xla.gpu.triton") >= 4


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")
class TestTritonCompiled(DispatchImplTest):
    implementation = "triton"
    interpret = False


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU backend")
class TestMosaicTpuCompiled(DispatchImplTest):
    implementation = "mosaic_tpu"
    interpret = False


@pytest.mark.parametrize("n,num_keys", [(1, 1), (37, 5), (8192, 257), (300, 2**23)])
def test_stable_order_matches_a_stable_argsort(n, num_keys):
    """Both branches: one packed int32 key per entry, and argsort when keys * N overflows."""
    keys = np.random.default_rng(n).integers(0, min(num_keys, 12), n).astype(np.int32)
    got = jax.jit(dsp.stable_order, static_argnums=1)(jnp.asarray(keys), num_keys)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"))
