"""Routers with extra or no learned choice: null experts, MoE++, THOR, hash."""

import jax
import jax.numpy as jnp

from jmoe import ops
from jmoe.routing.config import RouterConfig
from jmoe.routing.registry import RouterRecord, register
from jmoe.routing.routers import add_logit_noise, topk
from jmoe.routing.types import Routing


def null(logits_TxS, cfg: RouterConfig, *, rng=None) -> Routing:
    """AdaMoE null experts (Zeng et al., 2024, sec. 3.2).

    Top-k over E real plus M null experts, with softmax over all E + M logits. Null experts
    output zero and cost no FLOPs, so the number of real experts per token varies from 0 to K.
    The selected real experts' weights are renormalised among themselves (eq. 6); null slots
    keep weight 0 but stay selected in `mask` so the balance loss counts them.
    """
    logits = add_logit_noise(logits_TxS.astype(jnp.float32), cfg.noise_std, rng)
    probs = jax.nn.softmax(logits, axis=-1)
    p, ids = ops.top_k(probs, cfg.top_k)
    real = ids < cfg.num_experts
    w = jnp.where(real, p, 0.0)
    if cfg.normalize_weights:
        w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-9)
    return Routing(ids.astype(jnp.int32), w, jnp.ones(ids.shape, bool), probs, logits)


def stochastic(logits_TxS, cfg: RouterConfig, *, rng=None, deterministic=False) -> Routing:
    """THOR stochastic experts (Zuo et al., 2021, sec. 3): a uniformly random expert per token.

    Training (`deterministic=False`) and `stochastic_eval="random"` draw each token's expert
    uniformly with `rng`; `stochastic_eval="topk"` uses the largest logits at evaluation.
    """
    logits = logits_TxS.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    t = logits.shape[0]
    if deterministic and cfg.stochastic_eval == "topk":
        _, ids = ops.top_k(logits, cfg.top_k)
    else:
        if rng is None:
            raise ValueError("router 'stochastic' needs rng (pass rngs={'router': key} to apply)")
        keys = jax.random.split(rng, t)
        ids = jax.vmap(
            lambda k: jax.random.choice(k, cfg.num_experts, (cfg.top_k,), replace=False)
        )(keys)
    w = jnp.full(ids.shape, 1.0 / cfg.top_k, jnp.float32)
    return Routing(ids.astype(jnp.int32), w, jnp.ones(ids.shape, bool), probs, logits)


def hash_table(cfg: RouterConfig) -> jax.Array:
    """int32[K, V]: the fixed, balanced token-id -> expert tables of the hash router."""
    base = jnp.arange(cfg.hash_vocab_size, dtype=jnp.int32) % cfg.num_experts
    keys = jax.random.split(jax.random.PRNGKey(cfg.hash_seed), cfg.top_k)
    return jnp.stack([jax.random.permutation(k, base) for k in keys])


def hash_route(logits_TxS, cfg: RouterConfig, *, token_ids=None) -> Routing:
    """Hash layers (Roller et al., 2021): expert = table[token id], one table per slot.

    Slots that hash to the same expert are merged into the first (later ones masked).
    """
    if token_ids is None:
        raise ValueError("router 'hash' needs token_ids (int32[T], values < hash_vocab_size)")
    logits = logits_TxS.astype(jnp.float32)
    ids = hash_table(cfg)[:, token_ids.reshape(-1)].T  # [T, K]
    dup = jnp.zeros(ids.shape, bool)
    for j in range(1, cfg.top_k):
        dup = dup.at[:, j].set(jnp.any(ids[:, :j] == ids[:, j : j + 1], axis=-1))
    mask = ~dup
    w = mask / jnp.sum(mask, axis=-1, keepdims=True)
    return Routing(
        ids.astype(jnp.int32), w.astype(jnp.float32), mask, jax.nn.softmax(logits, axis=-1), logits
    )


def _check_null(cfg: RouterConfig) -> None:
    if cfg.num_null_experts == 0:
        raise ValueError("kind='null' needs num_null_experts >= 1")


register(RouterRecord("null", null, extra_fields=("num_null_experts",), validate=_check_null))
# MoE++ (Jin et al., 2024, sec. 3): top-k over the FFN and zero-computation columns (zero,
# copy, constant); the gating residual (eq. 7) is added to the logits by the layer.
register(
    RouterRecord(
        "moepp", topk, extra_fields=("num_zero_experts", "num_copy_experts", "num_const_experts")
    )
)
# THOR draws in training, and at evaluation with `stochastic_eval="random"`.
_thor_draws = lambda cfg, deterministic: not deterministic or cfg.stochastic_eval == "random"
register(RouterRecord("stochastic", stochastic, noise=False, draws=_thor_draws))
register(RouterRecord("hash", hash_route, noise=False, token_ids=True))
