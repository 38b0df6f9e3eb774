"""Routers against hand-computed cases and hypothesis properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmoe import dispatch as D
from jmoe import routing as R

SETTINGS = settings(max_examples=6, deadline=None)
_route = jax.jit(R.route, static_argnames=("cfg", "deterministic"))


def _logits(seed, t, s):
    return jax.random.normal(jax.random.PRNGKey(seed), (t, s)) * 2.0


def test_topk_hand_case():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    r = R.route(logits, R.RouterConfig(num_experts=3, top_k=2, normalize_weights=False))
    np.testing.assert_array_equal(r.expert_ids, [[1, 2], [0, 2]])
    np.testing.assert_allclose(r.weights, [[0.6, 0.3], [0.5, 0.3]], rtol=1e-6)
    r = R.route(logits, R.RouterConfig(num_experts=3, top_k=2))
    np.testing.assert_allclose(r.weights, [[2 / 3, 1 / 3], [5 / 8, 3 / 8]], rtol=1e-6)
    # Mixtral: softmax over the selected logits equals the renormalised probabilities.
    r_after = R.route(logits, R.RouterConfig(num_experts=3, top_k=2, softmax_order="after"))
    np.testing.assert_allclose(r_after.weights, r.weights, rtol=1e-6)


def test_topk_noise_needs_rng_and_training():
    cfg = R.RouterConfig(num_experts=4, top_k=1, noise_std=1.0)
    x = _logits(0, 64, 4)
    clean = R.route(x, cfg)
    eval_noisy = R.route(x, cfg, rng=jax.random.PRNGKey(1), deterministic=True)
    train_noisy = R.route(x, cfg, rng=jax.random.PRNGKey(1), deterministic=False)
    np.testing.assert_array_equal(clean.expert_ids, eval_noisy.expert_ids)
    assert np.any(np.asarray(clean.expert_ids) != np.asarray(train_noisy.expert_ids))


def test_sigmoid_hand_case_bias_and_scale():
    s = jnp.array([[0.9, 0.8, 0.1, 0.2]])
    logits = jnp.log(s / (1 - s))
    cfg = R.RouterConfig(kind="sigmoid", num_experts=4, top_k=2, route_scale=2.5)
    r = R.route(logits, cfg)
    np.testing.assert_array_equal(r.expert_ids, [[0, 1]])
    np.testing.assert_allclose(r.weights, [[2.5 * 0.9 / 1.7, 2.5 * 0.8 / 1.7]], rtol=1e-5)
    # The bias changes the selection but not the weights' source (s, not s + b).
    r = R.route(logits, cfg, bias=jnp.array([0.0, -1.0, 0.0, 0.75]))
    np.testing.assert_array_equal(r.expert_ids, [[3, 0]])
    np.testing.assert_allclose(r.weights, [[2.5 * 0.2 / 1.1, 2.5 * 0.9 / 1.1]], rtol=1e-5)


def test_sigmoid_group_limited():
    # Groups {0,1} and {2,3}; group score = sum of its top-2 of s. Group 1 wins (0.7+0.6)
    # over group 0 (0.95+0.05), so expert 0 is excluded despite the largest score.
    s = jnp.array([[0.95, 0.05, 0.7, 0.6]])
    logits = jnp.log(s / (1 - s))
    cfg = R.RouterConfig(kind="sigmoid", num_experts=4, top_k=2, n_groups=2, topk_groups=1)
    r = R.route(logits, cfg)
    np.testing.assert_array_equal(r.expert_ids, [[2, 3]])


def test_aux_free_bias_update():
    b = R.aux_free_bias_update(jnp.zeros(4), jnp.array([10.0, 0.0, 5.0, 5.0]), gamma=0.1)
    np.testing.assert_allclose(b, [-0.1, 0.1, 0.0, 0.0])


def test_expert_choice_hand_case():
    probs = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    cfg = R.RouterConfig(kind="expert_choice", num_experts=2, top_k=1, capacity_factor=1.0)
    r = R.route(jnp.log(probs), cfg)  # C = ceil(1 * 4 * 1 / 2) = 2
    np.testing.assert_array_equal(r.mask, [[1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_allclose(r.weights, [[0.7, 0], [0.6, 0], [0, 0.8], [0, 0.55]], rtol=1e-6)


def test_top_p_hand_case():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.2, 0.2]])
    cfg = R.RouterConfig(kind="top_p", num_experts=4, top_k=3, top_p=0.7)
    r = R.route(jnp.log(probs), cfg)
    np.testing.assert_array_equal(r.mask, [[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(jnp.sum(r.weights, -1), [0.8, 0.9, 0.8], rtol=1e-5)


def test_null_hand_case():
    probs = jnp.array([[0.4, 0.1, 0.3, 0.2], [0.1, 0.1, 0.5, 0.3]])  # columns 2, 3 are null.
    cfg = R.RouterConfig(kind="null", num_experts=2, num_null_experts=2, top_k=2)
    r = R.route(jnp.log(probs), cfg)
    np.testing.assert_array_equal(r.expert_ids, [[0, 2], [2, 3]])
    np.testing.assert_allclose(r.weights, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(r.active(2), [[True, False], [False, False]])
    np.testing.assert_allclose(r.counts(4), [1, 0, 2, 1])


def test_stochastic_uniform_and_eval_rule():
    cfg = R.RouterConfig(kind="stochastic", num_experts=4, top_k=1, stochastic_eval="topk")
    x = _logits(0, 4000, 4)
    r = R.route(x, cfg, rng=jax.random.PRNGKey(0), deterministic=False)
    counts = np.bincount(np.asarray(r.expert_ids).ravel(), minlength=4)
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts
    r_eval = R.route(x, cfg, deterministic=True)
    np.testing.assert_array_equal(r_eval.expert_ids[:, 0], jnp.argmax(x, -1))
    with pytest.raises(ValueError, match="needs rng"):
        R.route(x, cfg, deterministic=False)


def test_hash_is_fixed_and_balanced():
    cfg = R.RouterConfig(kind="hash", num_experts=4, top_k=1, hash_vocab_size=256)
    tok = jnp.arange(256)
    r1 = R.route(_logits(0, 256, 4), cfg, token_ids=tok)
    r2 = R.route(_logits(1, 256, 4), cfg, token_ids=tok)
    np.testing.assert_array_equal(r1.expert_ids, r2.expert_ids)
    np.testing.assert_array_equal(np.bincount(np.asarray(r1.expert_ids).ravel()), [64] * 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=8, top_k=9), "top_k=9 > number of selectable experts=8"),
        (dict(kind="bogus"), "kind='bogus' is not one of"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(kind="null", num_null_experts=-1), "num_null_experts=-1 must be >= 0"),
        (dict(kind="topk", num_null_experts=2), "need kind in"),
        (dict(kind="sigmoid", num_experts=8, n_groups=3), "n_groups=3"),
        (dict(softmax_order="middle"), "softmax_order='middle'"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.RouterConfig(**kwargs)


def test_wrong_logits_shape_raises():
    with pytest.raises(ValueError, match=r"logits_TxS must have shape \[T, 4\]"):
        R.route(jnp.zeros((3, 5)), R.RouterConfig(num_experts=4, top_k=1))


CASES = st.tuples(st.sampled_from([1, 5, 33]), st.integers(1, 9), st.integers(0, 10_000))


@SETTINGS
@given(CASES, st.data())
def test_topk_picks_k_largest(case, data):
    t, e, seed = case
    k = data.draw(st.integers(1, e))
    x = _logits(seed, t, e)
    r = _route(x, R.RouterConfig(num_experts=e, top_k=k))
    assert np.all(np.asarray(r.weights) >= 0)
    p = np.asarray(jax.nn.softmax(x, -1))
    chosen = np.take_along_axis(p, np.asarray(r.expert_ids), -1)
    kth = np.sort(p, -1)[:, -k]
    assert np.all(chosen >= kth[:, None] - 1e-7)
    assert all(len(set(row)) == k for row in np.asarray(r.expert_ids))


@SETTINGS
@given(CASES, st.floats(0.05, 1.0), st.data())
def test_top_p_shortest_prefix(case, p_thr, data):
    t, e, seed = case
    k = data.draw(st.integers(1, e))
    x = _logits(seed, t, e)
    r = _route(x, R.RouterConfig(kind="top_p", num_experts=e, top_k=k, top_p=p_thr))
    p_sorted = -np.sort(-np.asarray(jax.nn.softmax(x, -1)), -1)[:, :k]
    n = np.asarray(r.mask).sum(-1)
    cum = np.cumsum(p_sorted, -1)
    for i in range(t):
        assert 1 <= n[i] <= k
        if n[i] > 1:  # one fewer expert would not have reached p.
            assert cum[i, n[i] - 2] < p_thr + 1e-6
        if n[i] < k:  # the kept prefix reaches p.
            assert cum[i, n[i] - 1] >= p_thr - 1e-6
    assert np.all(np.asarray(r.weights) >= 0)


@SETTINGS
@given(CASES, st.floats(0.1, 3.0), st.data())
def test_expert_choice_capacity_bound(case, cf, data):
    t, e, seed = case
    k = data.draw(st.integers(1, e))
    cfg = R.RouterConfig(kind="expert_choice", num_experts=e, top_k=k, capacity_factor=cf)
    r = _route(_logits(seed, t, e), cfg)
    per_expert = np.asarray(r.mask).sum(0)
    assert np.all(per_expert == cfg.expert_choice_capacity(t))
    assert np.all(np.asarray(r.weights) >= 0)


@SETTINGS
@given(CASES, st.integers(1, 4), st.data())
def test_null_and_zero_experts_are_inactive(case, extra, data):
    t, e, seed = case
    for kind, kw in (
        ("null", dict(num_null_experts=extra)),
        ("moepp", dict(num_zero_experts=extra, num_copy_experts=1)),
    ):
        cfg = R.RouterConfig(kind=kind, num_experts=e, top_k=1, **kw)
        k = data.draw(st.integers(1, cfg.num_selectable))
        cfg = R.RouterConfig(kind=kind, num_experts=e, top_k=k, **kw)
        r = _route(_logits(seed, t, cfg.num_selectable), cfg)
        ids, act = np.asarray(r.expert_ids), np.asarray(r.active(e))
        np.testing.assert_array_equal(act, ids < e)
        x = jnp.ones((t, 3))
        _, plan = D.dropless_dispatch(x, r, e)  # only FFN-expert slots become GEMM rows.
        assert int(plan.group_sizes_E.sum()) == int(act.sum())
        assert np.all(np.asarray(r.weights) >= 0)
