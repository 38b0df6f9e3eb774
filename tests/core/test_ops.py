"""jmoe.ops row movers: values and custom gradients against plain-jnp definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import ops
from pallas_kernels import gmm as gmm_kernels


def _problem(t, k, e, d, seed):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
    active = jnp.asarray(rng.random((t, k)) < 0.8)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    w = jnp.where(active, jnp.asarray(rng.random((t, k)), jnp.float32), 0.0)
    order, inv, sizes = ops.sort_by_expert(ids, active, e)
    return x, w, order, inv, sizes


def _plain(x, w, order, inv, t, k):
    """The same layer without custom VJPs: broadcast to slots, permute, unpermute, sum."""
    x_NxD = jnp.broadcast_to(x[:, None], (t, k, x.shape[-1])).reshape(t * k, -1)
    xs = x_NxD[order]
    ys = jnp.tanh(xs) * 1.5  # any row-wise function standing in for the experts
    y_TxKxD = ys[inv].reshape(t, k, -1)
    return jnp.sum(y_TxKxD * w[..., None], axis=1)


def _fused(x, w, order, inv, t, k):
    xs = ops.dispatch_rows(x, order, inv.reshape(t, k))
    ys = jnp.tanh(xs) * 1.5
    return ops.combine_rows(ys, order, inv.reshape(t, k), w)


@pytest.mark.parametrize("t,k,e,d", [(7, 1, 3, 5), (33, 4, 6, 16), (64, 8, 16, 24)])
def test_dispatch_combine_rows_match_plain(t, k, e, d):
    x, w, order, inv, _ = _problem(t, k, e, d, seed=t)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((t, d)), jnp.float32)
    got = jax.jit(_fused, static_argnums=(4, 5))(x, w, order, inv, t, k)
    want = _plain(x, w, order, inv, t, k)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, order, inv, t, k) * c)

    gx, gw = jax.jit(jax.grad(loss(_fused), (0, 1)))(x, w)
    rx, rw = jax.grad(loss(_plain), (0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_combine_rows_bf16_rows_accumulate_in_f32():
    t, k, e, d = 16, 4, 5, 8
    x, w, order, inv, _ = _problem(t, k, e, d, seed=3)
    ys = ops.dispatch_rows(x, order, inv.reshape(t, k)).astype(jnp.bfloat16)
    y = ops.combine_rows(ys, order, inv.reshape(t, k), w)
    assert y.dtype == jnp.float32
    dys = jax.grad(lambda ys: jnp.sum(ops.combine_rows(ys, order, inv.reshape(t, k), w)))(ys)
    assert dys.dtype == jnp.bfloat16
    # Each sorted row's gradient is its slot's weight (dy = 1 everywhere).
    np.testing.assert_allclose(
        np.asarray(dys[:, 0], np.float32), np.asarray(w.reshape(-1)[order]), rtol=1e-2
    )


@pytest.mark.parametrize("t,k,e", [(7, 1, 3), (33, 4, 6), (1024, 8, 256)])
def test_sort_by_expert_is_a_stable_sort(t, k, e):
    """Order = a stable argsort of the expert ids (inactive slots last), inv its inverse,
    sizes the active slots per expert."""
    rng = np.random.default_rng(t)
    ids = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
    active = jnp.asarray(rng.random((t, k)) < 0.8)
    order, inv, sizes = jax.jit(ops.sort_by_expert, static_argnums=2)(ids, active, e)
    keys = np.where(np.asarray(active), np.asarray(ids), e).reshape(-1)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(np.asarray(inv)[np.asarray(order)], np.arange(t * k))
    np.testing.assert_array_equal(sizes, np.bincount(keys, minlength=e + 1)[:e])


@pytest.mark.parametrize("impl", [None, "xla", "reference"])
@pytest.mark.parametrize("t,k,e,d,n", [(7, 1, 3, 5, 4), (33, 4, 6, 16, 20), (64, 8, 16, 24, 8)])
def test_dispatch_matmul_matches_dispatch_then_grouped_matmul(impl, t, k, e, d, n):
    """Values and gradients (x and the weights) against the unfused composition; inactive
    slots are rows past the groups (zero)."""
    x, _, order, inv, sizes = _problem(t, k, e, d, seed=t + 1)
    rng = np.random.default_rng(2)
    rhs = jnp.asarray(rng.standard_normal((e, d, n)) / np.sqrt(d), jnp.float32)
    c = jnp.asarray(rng.standard_normal((t * k, n)), jnp.float32)
    inv_TxK = inv.reshape(t, k)

    def fused(x, rhs):
        return ops.dispatch_matmul(x, order, inv_TxK, rhs, sizes, implementation=impl)

    def plain(x, rhs):
        xs = ops.dispatch_rows(x, order, inv_TxK)
        return ops.grouped_matmul(xs, rhs, sizes, implementation="reference")

    np.testing.assert_allclose(jax.jit(fused)(x, rhs), plain(x, rhs), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, rhs: jnp.sum(f(x, rhs) * c)
    got = jax.jit(jax.grad(loss(fused), (0, 1)))(x, rhs)
    want = jax.grad(loss(plain), (0, 1))(x, rhs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _combine_problem(t, k, e, f, d, *, seed, rng_seed):
    """A routed problem for `matmul_combine`: rows h [T*K, F], weights [E, F, D], a cotangent
    [T, D], combine weights, order, inv [T, K] and group sizes."""
    _, w, order, inv, sizes = _problem(t, k, e, d, seed=seed)
    rng = np.random.default_rng(rng_seed)
    h = jnp.asarray(rng.standard_normal((t * k, f)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32)
    c = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    return h, rhs, c, w, order, inv.reshape(t, k), sizes


@pytest.mark.parametrize("impl", [None, "xla", "reference"])
@pytest.mark.parametrize(
    "t,k,e,f,d", [(7, 1, 3, 5, 4), (33, 4, 6, 16, 20), (20, 2, 40, 9, 17), (64, 8, 16, 24, 8)]
)
def test_matmul_combine_matches_grouped_matmul_then_combine(impl, t, k, e, f, d):
    """Values and all three gradients (rows, weights, combine weights) against grouped_matmul
    then a plain unpermute-and-sum, on both paths (F < D with the native CPU kernel: the
    fused backward; else the composition); inactive slots (weight 0) are rows past the
    groups, and (t, k, e) = (20, 2, 40) leaves most experts empty."""
    h, rhs, c, w, order, inv_TxK, sizes = _combine_problem(t, k, e, f, d, seed=t + 2, rng_seed=3)

    def fused(h, rhs, w):
        return ops.matmul_combine(h, rhs, sizes, order, inv_TxK, w, implementation=impl)

    def plain(h, rhs, w):
        ys = ops.grouped_matmul(h, rhs, sizes, implementation="reference")
        return jnp.sum(ys[inv_TxK] * w[..., None], axis=1)

    np.testing.assert_allclose(jax.jit(fused)(h, rhs, w), plain(h, rhs, w), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * c)
    grad = jax.jit(jax.grad(loss(fused), (0, 1, 2)))
    # The fused backward (tgmm reading dy's rows by index) runs exactly where it should.
    fused_path = f < d and gmm_kernels.gathers_rows(impl)
    assert ("jmoe_tgmm_rows_f32" in grad.lower(h, rhs, w).as_text()) == fused_path
    got = grad(h, rhs, w)
    want = jax.grad(loss(plain), (0, 1, 2))(h, rhs, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_matmul_combine_bf16():
    """bf16 rows and weights (f32 combine weights) on the op's path for F < D: f32 output,
    gradients in the operands' dtypes and within bf16 rounding of the f32 composition."""
    t, k, e, f, d = 40, 4, 8, 16, 32
    h, rhs, c, w, order, inv_TxK, sizes = _combine_problem(t, k, e, f, d, seed=5, rng_seed=4)

    def loss(h, rhs, w):
        return jnp.sum(ops.matmul_combine(h, rhs, sizes, order, inv_TxK, w) * c)

    def ref_loss(h, rhs, w):
        ys = ops.grouped_matmul(h, rhs, sizes, implementation="reference")
        return jnp.sum(jnp.sum(ys[inv_TxK] * w[..., None], axis=1) * c)

    bf = lambda a: a.astype(jnp.bfloat16)
    got = jax.jit(jax.grad(loss, (0, 1, 2)))(bf(h), bf(rhs), w)
    want = jax.grad(ref_loss, (0, 1, 2))(*(bf(a).astype(jnp.float32) for a in (h, rhs)), w)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for g, r in zip(got, want, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=2e-2 * scale, rtol=0)
