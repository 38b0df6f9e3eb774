"""Routing zoo: one `Routing` result, one `route` entry point, a registry of router records."""

import jax

from jmoe.routing.config import RouterConfig
from jmoe.routing.extra import hash_route, hash_table, null, stochastic
from jmoe.routing.registry import ROUTERS, RouterRecord, register, unregister
from jmoe.routing.routers import (
    add_logit_noise,
    aux_free_bias_update,
    expert_choice,
    sigmoid,
    top_p,
    topk,
)
from jmoe.routing.types import Routing

# The built-in kinds (`ROUTERS` also holds any registered later).
ROUTER_KINDS: tuple[str, ...] = tuple(ROUTERS)


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
        except by routers that draw at evaluation, e.g. `stochastic` with
        `stochastic_eval="random"`).
      bias: per-expert selection bias of a router with `selection_bias` (e.g. `sigmoid`).
      token_ids: int32[T] token ids for a router with `token_ids` (e.g. `hash`).
      deterministic: evaluation mode (no noise).

    Raises:
      ValueError: when the logits do not have shape [T, S] with S = cfg.num_selectable.
    """
    if logits_TxS.ndim != 2 or logits_TxS.shape[1] != cfg.num_selectable:
        raise ValueError(
            f"logits_TxS must have shape [T, {cfg.num_selectable}] for {cfg.kind!r} "
            f"router, got {logits_TxS.shape}"
        )
    rec = cfg.record
    kw = rec.inputs(rng=rng, bias=bias, token_ids=token_ids, deterministic=deterministic)
    return rec.fn(logits_TxS, cfg, **kw)


__all__ = [
    "ROUTERS",
    "ROUTER_KINDS",
    "RouterConfig",
    "RouterRecord",
    "Routing",
    "add_logit_noise",
    "aux_free_bias_update",
    "expert_choice",
    "hash_route",
    "hash_table",
    "null",
    "register",
    "route",
    "sigmoid",
    "stochastic",
    "top_p",
    "topk",
    "unregister",
]
