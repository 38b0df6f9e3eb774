"""Routing zoo: one `Routing` result, one `route` entry point, a registry of routers."""

from collections.abc import Callable

import jax

from jmoe.routing.config import ROUTER_KINDS, RouterConfig, RouterKind
from jmoe.routing.extra import hash_route, hash_table, moepp, null, stochastic
from jmoe.routing.routers import (
    add_logit_noise,
    aux_free_bias_update,
    expert_choice,
    sigmoid,
    top_p,
    topk,
)
from jmoe.routing.types import Routing

ROUTERS: dict[str, Callable[..., Routing]] = {
    "topk": topk,
    "sigmoid": sigmoid,
    "expert_choice": expert_choice,
    "top_p": top_p,
    "null": null,
    "moepp": moepp,
    "stochastic": stochastic,
    "hash": hash_route,
}
assert set(ROUTERS) == set(ROUTER_KINDS)


def route(
    logits_TxS: jax.Array,
    cfg: RouterConfig,
    *,
    rng=None,
    bias=None,
    token_ids=None,
    deterministic: bool = True,
) -> Routing:
    """Routes tokens with the router named by `cfg.kind`.

    Args:
      logits_TxS: router logits, one column per selectable expert (FFN experts first).
      cfg: the router configuration.
      rng: PRNG key for training noise / stochastic routing (ignored when `deterministic`,
        except by `stochastic` with `stochastic_eval="random"`).
      bias: per-expert selection bias of the `sigmoid` router.
      token_ids: int32[T] token ids for the `hash` router.
      deterministic: evaluation mode (no noise).

    Raises:
      ValueError: when the logits do not have shape [T, S] with S = cfg.num_selectable.
    """
    if logits_TxS.ndim != 2 or logits_TxS.shape[1] != cfg.num_selectable:
        raise ValueError(
            f"logits_TxS must have shape [T, {cfg.num_selectable}] for {cfg.kind!r} "
            f"router, got {logits_TxS.shape}"
        )
    noise_rng = None if deterministic else rng
    if cfg.kind == "sigmoid":
        return sigmoid(logits_TxS, cfg, bias=bias, rng=noise_rng)
    if cfg.kind == "stochastic":
        return stochastic(logits_TxS, cfg, rng=rng, deterministic=deterministic)
    if cfg.kind == "hash":
        return hash_route(logits_TxS, cfg, token_ids=token_ids)
    return ROUTERS[cfg.kind](logits_TxS, cfg, rng=noise_rng)


__all__ = [
    "ROUTERS",
    "ROUTER_KINDS",
    "RouterConfig",
    "RouterKind",
    "Routing",
    "add_logit_noise",
    "aux_free_bias_update",
    "expert_choice",
    "hash_route",
    "hash_table",
    "moepp",
    "null",
    "route",
    "sigmoid",
    "stochastic",
    "top_p",
    "topk",
]
