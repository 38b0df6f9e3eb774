"""Losses and statistics against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import losses
from jmoe.routing import RouterConfig, Routing, route


def _routing(ids, probs, mask=None):
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask)
    probs = jnp.asarray(probs, jnp.float32)
    return Routing(ids, jnp.where(mask, 0.5, 0.0), mask, probs, jnp.log(probs))


def test_switch_balance_loss_hand_case():
    # 2 tokens, top-1, 2 experts: f = [1, 0]; P = [0.7, 0.3] -> 2 * 0.7 = 1.4.
    r = _routing([[0], [0]], [[0.8, 0.2], [0.6, 0.4]])
    np.testing.assert_allclose(losses.load_balance_loss(r), 1.4, rtol=1e-6)
    # Perfect balance with uniform probabilities gives 1.
    r = _routing([[0], [1]], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(losses.load_balance_loss(r), 1.0, rtol=1e-6)


def test_balance_loss_from_external_counts_and_gradient_only_through_p():
    probs = jnp.array([[0.8, 0.2], [0.6, 0.4]])
    val = losses.load_balance_loss_from_counts(probs, jnp.array([10.0, 30.0]))
    np.testing.assert_allclose(val, 2 * (0.25 * 0.7 + 0.75 * 0.3), rtol=1e-6)
    g = jax.grad(lambda c: losses.load_balance_loss_from_counts(probs, c))(jnp.array([1.0, 3.0]))
    np.testing.assert_array_equal(g, [0.0, 0.0])


def test_null_columns_count_in_balance_loss():
    cfg = RouterConfig(kind="null", num_experts=2, num_null_experts=2, top_k=1)
    probs = jnp.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.6, 0.2, 0.1]])
    r = route(jnp.log(probs), cfg)
    np.testing.assert_allclose(r.counts(4), [0, 1, 1, 0])
    p_mean = probs.mean(0)
    np.testing.assert_allclose(
        losses.load_balance_loss(r), 4 * 0.5 * (p_mean[1] + p_mean[2]), rtol=1e-5
    )


def test_z_loss_and_entropy():
    logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
    expected = (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2
    np.testing.assert_allclose(losses.z_loss(logits), expected, rtol=1e-6)
    probs = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(losses.entropy(probs), np.log(2.0) / 2, rtol=1e-6)


def test_symmetric_kl_zero_iff_equal():
    a = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
    np.testing.assert_allclose(losses.symmetric_kl(a, a), 0.0, atol=1e-6)
    assert float(losses.symmetric_kl(a, a[::-1])) > 0.1


def test_routing_stats():
    r = _routing(
        [[0, 2], [1, 2], [0, 1]],
        np.full((3, 3), 1 / 3),
        mask=[[True, True], [True, False], [True, True]],
    )
    st = losses.routing_stats(r, num_experts=2)  # column 2 is an extra (non-FFN) column.
    np.testing.assert_allclose(st["expert_counts"], [2, 2, 1])
    np.testing.assert_allclose(st["expert_load"], [0.4, 0.4, 0.2])
    np.testing.assert_allclose(st["experts_per_token_mean"], 4 / 3, rtol=1e-6)
    assert float(st["experts_per_token_min"]) == 1 and float(st["experts_per_token_max"]) == 2
    np.testing.assert_allclose(st["router_entropy"], np.log(3.0), rtol=1e-6)
