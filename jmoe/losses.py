"""Auxiliary losses and routing statistics, as pure functions of a `Routing`."""

import jax
import jax.numpy as jnp

from jmoe.routing.types import Routing


def load_balance_loss_from_counts(probs_TxS, counts_S):
    """Switch load-balance loss S * sum_i f_i * P_i with externally supplied counts.

    Fedus et al. (2021), eq. 4. `f_i = counts_i / sum(counts)`; passing counts summed over all
    data-parallel replicas (and micro-steps) gives the global-batch loss of "Demons in the
    Detail" (Qiu et al., 2025, eq. 3), while `P_i` stays the local mean router probability.
    """
    counts = jax.lax.stop_gradient(counts_S.astype(jnp.float32))
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = jnp.mean(probs_TxS.astype(jnp.float32), axis=0)
    return probs_TxS.shape[-1] * jnp.sum(f * p)


def load_balance_loss(routing: Routing):
    """Switch load-balance loss over every selectable column (null experts included)."""
    return load_balance_loss_from_counts(routing.probs, routing.counts(routing.probs.shape[-1]))


def z_loss(logits_TxS):
    """Router z-loss (Zoph et al., 2022, ST-MoE eq. 5): mean over tokens of logsumexp^2."""
    return jnp.mean(jax.nn.logsumexp(logits_TxS.astype(jnp.float32), axis=-1) ** 2)


def entropy(probs_TxS):
    """Mean router entropy -sum_i p_i log p_i per token."""
    p = probs_TxS.astype(jnp.float32)
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def dynamic_loss(routing: Routing):
    """Entropy ("dynamic") loss of top-p routing (An et al., 2024, eq. 7): a decisive router."""
    return entropy(routing.probs)


def symmetric_kl(logits_a, logits_b):
    """THOR consistency loss (Zuo et al., 2021, eq. 2): KL(a||b) + KL(b||a), mean over rows."""
    la = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    lb = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(la) * (la - lb) + jnp.exp(lb) * (lb - la), axis=-1)
    return jnp.mean(kl)


def experts_per_token(routing: Routing, num_experts: int):
    """float32[T]: FFN experts used by each token."""
    return jnp.sum(routing.active(num_experts), axis=-1).astype(jnp.float32)


def routing_stats(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Per-column load, experts-per-token summary and router entropy."""
    s = routing.probs.shape[-1]
    counts = routing.counts(s)
    ept = experts_per_token(routing, num_experts)
    return {
        "expert_counts": counts,
        "expert_load": counts / jnp.maximum(jnp.sum(counts), 1.0),
        "experts_per_token_mean": jnp.mean(ept),
        "experts_per_token_min": jnp.min(ept),
        "experts_per_token_max": jnp.max(ept),
        "experts_per_token_hist": jnp.bincount(
            ept.astype(jnp.int32), length=routing.expert_ids.shape[-1] + 1
        ),
        "router_entropy": entropy(routing.probs),
    }
