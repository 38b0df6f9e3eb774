"""Router configuration: one frozen dataclass, the single home of every router field.

The `MoE` layer's router fields and `MoEConfig` are generated from `RouterConfig`, and its
kind-specific facts come from the kind's `RouterRecord` (`jmoe.routing.registry`).
"""

import dataclasses
import math
from typing import Literal, get_args

from jmoe.routing import registry

SoftmaxOrder = Literal["before", "after"]
StochasticEval = Literal["random", "topk"]


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts, and how many each expert may take.

    Attributes:
      kind: router name, a key of `jmoe.routing.ROUTERS`.
      num_experts: E, the number of FFN experts.
      top_k: K, experts per token (the maximum for dynamic routers; for `expert_choice` the
        average used in its capacity).
      top_p: cumulative-probability threshold of the `top_p` router, in (0, 1].
      capacity_factor: C = ceil(cf * T * K / E) for `expert_choice` and capacity dispatch.
      min_capacity: lower bound of the capacity-dispatch C.
      batch_priority: capacity dispatch fills buffers in order of each token's top weight
        (batch-prioritised routing, Riquelme et al., 2021, sec. 4.1) instead of token order.
      num_null_experts: AdaMoE null experts M (router `null`).
      num_zero_experts, num_copy_experts, num_const_experts: MoE++ zero-computation experts.
      normalize_weights: renormalise the selected weights to sum to 1 (Mixtral) or not (Switch).
      softmax_order: `before` (softmax over all experts, then select) or `after` (select on
        logits, softmax over the K selected).
      noise_std: std of Gaussian logit noise added in training when an rng is given.
      jitter_eps: multiplicative router-input jitter x * U(1 - eps, 1 + eps) in training
        (Switch Transformer, Fedus et al., 2021, sec. 2.4).
      route_scale: DeepSeek-V3 routed scaling factor (router `sigmoid`).
      n_groups, topk_groups: DeepSeek-V3 group-limited routing (router `sigmoid`).
      bias_update_gamma: step of the aux-loss-free selection-bias update (routers with a
        selection bias; DeepSeek-V3, sec. 2.1.2).
      stochastic_eval: THOR rule at evaluation: `random` expert per token, or `topk` by logits.
      hash_vocab_size, hash_seed: the fixed token-id -> expert table of router `hash`.
    """

    kind: str = "topk"
    num_experts: int = 8
    top_k: int = 2
    top_p: float = 0.5
    capacity_factor: float = 1.25
    min_capacity: int = 0
    batch_priority: bool = False
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_const_experts: int = 0
    normalize_weights: bool = True
    softmax_order: SoftmaxOrder = "before"
    noise_std: float = 0.0
    jitter_eps: float = 0.0
    route_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    bias_update_gamma: float = 1e-3
    stochastic_eval: StochasticEval = "random"
    hash_vocab_size: int = 256
    hash_seed: int = 0

    def __post_init__(self):
        rec = registry.record(self.kind)
        check_choice("softmax_order", self.softmax_order, get_args(SoftmaxOrder))
        check_choice("stochastic_eval", self.stochastic_eval, get_args(StochasticEval))
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        for name in (*registry.extra_fields(), "min_capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
            if getattr(self, name) and name not in (*rec.extra_fields, "min_capacity"):
                owners = tuple(k for k, r in registry.ROUTERS.items() if name in r.extra_fields)
                raise ValueError(
                    f"{name}={getattr(self, name)} need kind in {owners}, got kind={self.kind!r}"
                )
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_k > self.num_selectable:
            raise ValueError(
                f"top_k={self.top_k} > number of selectable experts={self.num_selectable} "
                f"(num_experts={self.num_experts} plus extra experts)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        for name in ("noise_std", "jitter_eps", "bias_update_gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.hash_vocab_size < 1:
            raise ValueError(f"hash_vocab_size={self.hash_vocab_size} must be >= 1")
        self._check_groups()
        rec.validate(self)

    def _check_groups(self):
        if self.n_groups < 1 or self.num_experts % self.n_groups:
            raise ValueError(
                f"n_groups={self.n_groups} must be >= 1 and divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(
                f"topk_groups={self.topk_groups} must be in [1, n_groups={self.n_groups}]"
            )
        if self.n_groups > 1 and self.top_k > self.topk_groups * self.num_experts // self.n_groups:
            raise ValueError(
                f"top_k={self.top_k} > experts in the kept groups "
                f"({self.topk_groups} x {self.num_experts // self.n_groups})"
            )

    @property
    def record(self) -> registry.RouterRecord:
        """This kind's traits."""
        return registry.record(self.kind)

    @property
    def num_extra(self) -> int:
        """Router-selectable experts beyond the FFN experts (null or zero-computation)."""
        return sum(getattr(self, f) for f in self.record.extra_fields)

    @property
    def num_selectable(self) -> int:
        """S: columns of the router logits (FFN experts first, then the extra ones)."""
        return self.num_experts + self.num_extra

    @property
    def max_slots(self) -> int:
        """K of the routing result: slots per token."""
        return self.record.slots(self)

    def expert_choice_capacity(self, num_tokens: int) -> int:
        """C = ceil(capacity_factor * T * K / E), at most T (an expert cannot take more tokens)."""
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(c, num_tokens))
