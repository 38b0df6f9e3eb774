"""A small Linen model with an MoE layer trains on real data (scikit-learn's digits)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from jmoe import MoE
from jmoe.routing import ROUTER_KINDS, aux_free_bias_update

EXTRA = {
    "null": dict(num_null_experts=2),
    "moepp": dict(
        num_zero_experts=1, num_copy_experts=1, num_const_experts=1, gating_residual=True
    ),
    "top_p": dict(top_k=3, top_p=0.5),
    "stochastic": dict(top_k=1),
    "expert_choice": dict(top_k=2, capacity_factor=1.0),
    "hash": dict(hash_vocab_size=16),
}


class DigitsMoE(nn.Module):
    router: str
    dispatch: str = "dropless"

    @nn.compact
    def __call__(self, x, *, deterministic=True):
        h = nn.gelu(nn.Dense(32)(x))
        # Hash routing keys on a "token id": the digit image's mean-intensity bucket.
        token_ids = jnp.clip((x.mean(-1) * 16).astype(jnp.int32), 0, 15)
        kw = dict(num_experts=4, top_k=2, d_ff=64, router=self.router, dispatch=self.dispatch)
        y, aux = MoE(**{**kw, **EXTRA.get(self.router, {})})(
            h[:, None, :], deterministic=deterministic, token_ids=token_ids[:, None]
        )
        return nn.Dense(10)(h + y[:, 0]), aux


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


@pytest.mark.parametrize(
    "router,dispatch", [(r, "dropless") for r in ROUTER_KINDS] + [("topk", "capacity")]
)
def test_loss_falls_on_digits(digits, router, dispatch):
    x, y = digits
    model = DigitsMoE(router, dispatch)
    rngs = {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(1)}
    variables = model.init(rngs, x[:8])
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p, st, xb, yb, rng, deterministic):
        logits, aux = model.apply(
            {"params": p, **st}, xb, deterministic=deterministic, rngs={"router": rng}
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce + 0.01 * aux["load_balance_loss"], (ce, aux)

    @jax.jit
    def step(p, st, o, rng):
        (_, (ce, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, st, x, y, rng, False)
        upd, o = opt.update(g, o, p)
        if "router_state" in st:  # DeepSeek-V3 aux-loss-free bias update.
            st = jax.tree.map(lambda b: aux_free_bias_update(b, aux["expert_counts"], 1e-2), st)
        return optax.apply_updates(p, upd), st, o, ce

    ce0 = float(loss_fn(params, state, x, y, jax.random.PRNGKey(2), True)[1][0])
    for i in range(60):
        params, state, opt_state, ce = step(params, state, opt_state, jax.random.PRNGKey(i))
    ce_end = float(loss_fn(params, state, x, y, jax.random.PRNGKey(3), True)[1][0])
    assert np.isfinite(ce_end)
    assert ce_end < 0.5 * ce0, (ce0, ce_end)
