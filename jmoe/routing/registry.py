"""The router registry: one record per router kind, holding its function and its traits.

Every question the library asks about a router (does it keep a selection bias, does it need
token ids or an rng, can it run per token shard, how many extra columns does it add) is a
field of its `RouterRecord`; no module outside a router's own tests its name. A new router
is one function and one `register` call.
"""

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jmoe.routing.config import RouterConfig


@dataclasses.dataclass(frozen=True)
class RouterRecord:
    """A router kind and its traits.

    Attributes:
      kind: the name used by `RouterConfig(kind=...)` and `MoE(router=...)`.
      fn: `fn(logits_TxS, cfg, **inputs) -> Routing`. It is passed only the inputs its traits
        ask for: `rng=` (logit noise in training, or its draws), `bias=`, `token_ids=`,
        `deterministic=`.
      noise: takes Gaussian logit noise (`cfg.noise_std`) through `rng=` in training.
      selection_bias: selects with a per-expert bias kept outside the gradient (the layer's
        `router_state/bias`, moved by aux-loss-free balancing, DeepSeek-V3 sec. 2.1.2).
      token_ids: routes by token id (`token_ids=` int32[T]).
      draws: `draws(cfg, deterministic)`: the router draws from `rng=` itself (and gets
        `deterministic=`); None for routers that draw nothing but logit noise.
      token_local: a token's routing depends on that token's logits alone, so it can run per
        token shard under expert parallelism (expert choice cannot).
      extra_fields: `RouterConfig` fields that count router-selectable columns beyond the E
        FFN experts (null or zero-computation experts); only this kind may set them.
      slots: K of the routing result for a config (default `cfg.top_k`).
      validate: further checks of a config of this kind; raises `ValueError`.
    """

    kind: str
    fn: Callable[..., Any]
    noise: bool = True
    selection_bias: bool = False
    token_ids: bool = False
    draws: Callable[["RouterConfig", bool], bool] | None = None
    token_local: bool = True
    extra_fields: tuple[str, ...] = ()
    slots: Callable[["RouterConfig"], int] = lambda cfg: cfg.top_k
    validate: Callable[["RouterConfig"], None] = lambda cfg: None

    def needs_rng(self, cfg: "RouterConfig", deterministic: bool) -> bool:
        """Whether routing with `cfg` in this mode needs an rng."""
        if self.draws is not None:
            return self.draws(cfg, deterministic)
        return self.noise and not deterministic and cfg.noise_std > 0

    def inputs(self, *, rng, bias, token_ids, deterministic: bool) -> dict[str, Any]:
        """The keyword arguments `fn` takes, from everything a caller may hold."""
        kw: dict[str, Any] = {}
        if self.draws is not None:
            kw.update(rng=rng, deterministic=deterministic)
        elif self.noise:
            kw["rng"] = None if deterministic else rng
        if self.selection_bias:
            kw["bias"] = bias
        if self.token_ids:
            kw["token_ids"] = token_ids
        return kw


ROUTERS: dict[str, RouterRecord] = {}


def register(record: RouterRecord) -> RouterRecord:
    """Adds `record` to `ROUTERS` (its kind must be new) and returns it."""
    if record.kind in ROUTERS:
        raise ValueError(f"router kind {record.kind!r} is already registered")
    ROUTERS[record.kind] = record
    return record


def unregister(kind: str) -> None:
    """Removes a kind added with `register` (for tests and experiments)."""
    ROUTERS.pop(kind)


def record(kind: str) -> RouterRecord:
    """The record of `kind`; a `ValueError` naming the registered kinds otherwise."""
    if kind not in ROUTERS:
        raise ValueError(f"kind={kind!r} is not one of {tuple(ROUTERS)}")
    return ROUTERS[kind]


def extra_fields() -> tuple[str, ...]:
    """Every `RouterConfig` field some router counts as extra columns."""
    return tuple(dict.fromkeys(f for r in ROUTERS.values() for f in r.extra_fields))
