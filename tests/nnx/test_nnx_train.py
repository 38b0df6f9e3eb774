"""NNX users train with jmoe: a small NNX model with `jmoe.nnx.MoE` on the digits, and the
Linen LM converted through `jmoe.nnx.bridge`, both fine-tuned with `nnx.Optimizer`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import meta
from sklearn.datasets import load_digits

from jmoe import models
from jmoe import nnx as jnnx


class DigitsMoE(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(64, 32, rngs=rngs)
        self.moe = jnnx.MoE(
            32, num_experts=4, top_k=2, d_ff=64, router="sigmoid", bias_update_gamma=1e-2, rngs=rngs
        )
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.gelu(self.inp(x))
        y, aux = self.moe(h[:, None, :])
        return self.out(h + y[:, 0]), aux


def test_nnx_model_trains_on_digits_with_nnx_optimizer():
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)
    model = DigitsMoE(rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(m):
        logits, aux = m(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.01 * aux["load_balance_loss"], ce

    @nnx.jit
    def step(m, o):
        (_, ce), g = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        o.update(m, g)
        return ce

    model.eval()
    ce0 = float(loss_fn(model)[1])
    bias0 = np.asarray(model.moe.bias[...])
    model.train()
    for _ in range(60):
        step(model, opt)
    model.eval()
    ce_end = float(loss_fn(model)[1])
    assert np.isfinite(ce_end) and ce_end < 0.5 * ce0, (ce0, ce_end)
    assert not np.allclose(model.moe.bias[...], bias0)  # the layer balanced itself


def test_linen_lm_fine_tunes_through_the_bridge():
    cfg = {
        "model": dict(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=8),
        "moe": dict(num_experts=4, top_k=2, d_ff=16, router="sigmoid", bias_update_gamma=0.01),
    }
    lm = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    linen_vars = meta.unbox(lm.init(jax.random.key(1), tokens))  # e.g. a Linen checkpoint
    model = jnnx.bridge(lm, tokens, variables=linen_vars)
    logits0, _ = lm.apply(linen_vars, tokens)
    np.testing.assert_allclose(model(tokens)[0], logits0, rtol=1e-6, atol=1e-6)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        logits, aux = m(tokens[:, :-1], deterministic=False, mutable=["router_state"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + 0.01 * aux["load_balance_loss"]

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(loss_fn)(m)
        o.update(m, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    tuned = jnnx.linen_variables(model)  # back to Linen: the same numbers
    assert jax.tree.structure(tuned) == jax.tree.structure(linen_vars)
    bias = tuned["router_state"]["stack"]["layer_0"]["ffn"]["bias"]
    assert not np.allclose(bias, linen_vars["router_state"]["stack"]["layer_0"]["ffn"]["bias"])
    np.testing.assert_allclose(lm.apply(tuned, tokens)[0], model(tokens)[0], rtol=1e-6, atol=1e-6)
