"""Score-based routers: top-k softmax, DeepSeek-V3 sigmoid, expert choice, dynamic top-p.

Every router is a pure function `(logits_TxS, cfg, ...) -> Routing`, computed in fp32.
"""

import jax
import jax.numpy as jnp

from jmoe import ops
from jmoe.routing.config import RouterConfig
from jmoe.routing.registry import RouterRecord, register
from jmoe.routing.types import Routing


def add_logit_noise(logits_TxS, noise_std: float, rng):
    """Gaussian logit noise for exploration in training (Shazeer et al., 2017, eq. 4)."""
    if noise_std == 0.0 or rng is None:
        return logits_TxS
    return logits_TxS + noise_std * jax.random.normal(rng, logits_TxS.shape, logits_TxS.dtype)


def topk(logits_TxS, cfg: RouterConfig, *, rng=None) -> Routing:
    """Softmax top-k routing (Switch: K=1, GShard/Mixtral: K=2).

    `softmax_order="before"`: p = softmax(logits), keep the K largest p (Switch, eq. 1-2);
    `"after"`: keep the K largest logits and softmax over them (Mixtral, eq. 1). With
    `normalize_weights` the K weights are renormalised to sum to 1.
    """
    logits = add_logit_noise(logits_TxS.astype(jnp.float32), cfg.noise_std, rng)
    probs = jax.nn.softmax(logits, axis=-1)
    if cfg.softmax_order == "before":
        w, ids = ops.top_k(probs, cfg.top_k)
        if cfg.normalize_weights:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
    else:
        top_logits, ids = ops.top_k(logits, cfg.top_k)
        w = jax.nn.softmax(top_logits, axis=-1)
    return Routing(ids.astype(jnp.int32), w, jnp.ones(ids.shape, bool), probs, logits)


def sigmoid(logits_TxS, cfg: RouterConfig, *, bias=None, rng=None) -> Routing:
    """DeepSeek-V3 routing (DeepSeek-AI, 2024, eqs. 13-16).

    s = sigmoid(logits); selection by s + b where b is a per-expert bias updated outside the
    gradient (`aux_free_bias_update`); with `n_groups > 1`, only the `topk_groups` groups with
    the largest sum of their two best (s + b) are eligible. The output weights are the selected
    s renormalised to sum 1, times `route_scale`.
    """
    logits = add_logit_noise(logits_TxS.astype(jnp.float32), cfg.noise_std, rng)
    s = jax.nn.sigmoid(logits)
    b = jnp.zeros((cfg.num_experts,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    sel = s + b
    if cfg.n_groups > 1:
        t = sel.shape[0]
        sel_g = sel.reshape(t, cfg.n_groups, cfg.num_experts // cfg.n_groups)
        top2 = ops.top_k(sel_g, min(2, sel_g.shape[-1]))[0].sum(-1)
        _, keep_groups = ops.top_k(top2, cfg.topk_groups)
        gmask = jnp.zeros((t, cfg.n_groups), bool).at[jnp.arange(t)[:, None], keep_groups].set(True)
        sel = jnp.where(jnp.repeat(gmask, cfg.num_experts // cfg.n_groups, axis=1), sel, -jnp.inf)
    _, ids = ops.top_k(sel, cfg.top_k)
    w = jnp.take_along_axis(s, ids, axis=-1)
    w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.route_scale
    probs = s / jnp.sum(s, axis=-1, keepdims=True)  # the normalised affinities of eq. 19.
    return Routing(ids.astype(jnp.int32), w, jnp.ones(ids.shape, bool), probs, logits)


def aux_free_bias_update(bias_E, load_E, gamma: float = 1e-3):
    """Auxiliary-loss-free balancing (DeepSeek-V3, sec. 2.1.2): b += gamma * sign(mean - load).

    Args:
      bias_E: current per-expert selection bias.
      load_E: tokens routed to each expert this step (summed over all replicas for a global
        update).
      gamma: bias update speed.
    """
    load = load_E.astype(jnp.float32)
    return bias_E + gamma * jnp.sign(jnp.mean(load) - load)


def expert_choice(logits_TxS, cfg: RouterConfig, *, rng=None) -> Routing:
    """Expert-choice routing (Zhou et al., 2022, eq. 1-2): each expert takes its top-C tokens.

    C = ceil(capacity_factor * T * top_k / E). A token may be taken by 0..E experts, so the
    result has K = E slots per token, slot e for expert e, masked where e did not pick it.
    """
    logits = add_logit_noise(logits_TxS.astype(jnp.float32), cfg.noise_std, rng)
    probs = jax.nn.softmax(logits, axis=-1)
    t, e = probs.shape
    c = cfg.expert_choice_capacity(t)
    _, tok_ExC = ops.top_k(probs.T, c)
    picked_ExT = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], tok_ExC].set(True)
    mask = picked_ExT.T
    ids = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (t, e))
    return Routing(ids, jnp.where(mask, probs, 0.0), mask, probs, logits)


def top_p(logits_TxS, cfg: RouterConfig, *, rng=None) -> Routing:
    """Dynamic top-p routing ("Harder Tasks Need More Experts", An et al., 2024, eqs. 3-5).

    Sort p = softmax(logits) in descending order and keep the shortest prefix whose
    cumulative probability reaches `top_p` (at least one expert, at most `top_k`). The kept
    probabilities are the weights, without renormalisation.
    """
    logits = add_logit_noise(logits_TxS.astype(jnp.float32), cfg.noise_std, rng)
    probs = jax.nn.softmax(logits, axis=-1)
    p_sorted, ids = ops.top_k(probs, cfg.top_k)
    before = jnp.cumsum(p_sorted, axis=-1) - p_sorted  # probability mass before each slot.
    mask = before < cfg.top_p
    mask = mask.at[:, 0].set(True)
    return Routing(ids.astype(jnp.int32), jnp.where(mask, p_sorted, 0.0), mask, probs, logits)


register(RouterRecord("topk", topk))
register(RouterRecord("sigmoid", sigmoid, selection_bias=True))
register(
    RouterRecord(
        "expert_choice", expert_choice, token_local=False, slots=lambda cfg: cfg.num_experts
    )
)
register(RouterRecord("top_p", top_p))
