"""Router configuration: one frozen dataclass validated at construction time."""

import dataclasses
import math
from typing import Literal, get_args

RouterKind = Literal[
    "topk", "sigmoid", "expert_choice", "top_p", "null", "moepp", "stochastic", "hash"
]
ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)
SoftmaxOrder = Literal["before", "after"]
StochasticEval = Literal["random", "topk"]


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts.

    Attributes:
      kind: router name, one of `ROUTER_KINDS`.
      num_experts: E, the number of FFN experts.
      top_k: K, experts per token (the maximum for dynamic routers; for `expert_choice` the
        average used in its capacity).
      top_p: cumulative-probability threshold of the `top_p` router, in (0, 1].
      capacity_factor: used by `expert_choice` (C = ceil(cf * T * K / E)).
      num_null_experts: AdaMoE null experts M (router `null`).
      num_zero_experts, num_copy_experts, num_const_experts: MoE++ zero-computation experts.
      normalize_weights: renormalise the selected weights to sum to 1 (Mixtral) or not (Switch).
      softmax_order: `before` (softmax over all experts, then select) or `after` (select on
        logits, softmax over the K selected).
      noise_std: std of Gaussian logit noise added in training when an rng is given.
      route_scale: DeepSeek-V3 routed scaling factor (router `sigmoid`).
      n_groups, topk_groups: DeepSeek-V3 group-limited routing (router `sigmoid`).
      stochastic_eval: THOR rule at evaluation: `random` expert per token, or `topk` by logits.
      hash_vocab_size, hash_seed: the fixed token-id -> expert table of router `hash`.
    """

    kind: RouterKind = "topk"
    num_experts: int = 8
    top_k: int = 2
    top_p: float = 0.5
    capacity_factor: float = 1.0
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_const_experts: int = 0
    normalize_weights: bool = True
    softmax_order: SoftmaxOrder = "before"
    noise_std: float = 0.0
    route_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    stochastic_eval: StochasticEval = "random"
    hash_vocab_size: int = 256
    hash_seed: int = 0

    def __post_init__(self):
        _check_choice("kind", self.kind, ROUTER_KINDS)
        _check_choice("softmax_order", self.softmax_order, get_args(SoftmaxOrder))
        _check_choice("stochastic_eval", self.stochastic_eval, get_args(StochasticEval))
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        for name in (
            "num_null_experts",
            "num_zero_experts",
            "num_copy_experts",
            "num_const_experts",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
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
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")
        self._check_groups()
        if self.kind == "hash" and self.hash_vocab_size < 1:
            raise ValueError(f"hash_vocab_size={self.hash_vocab_size} must be >= 1")
        extras = (
            self.num_null_experts
            + self.num_zero_experts
            + self.num_copy_experts
            + self.num_const_experts
        )
        if extras and self.kind not in ("null", "moepp"):
            raise ValueError(
                f"null/zero-computation experts need kind in ('null', 'moepp'), "
                f"got kind={self.kind!r}"
            )
        if self.kind == "null" and self.num_null_experts == 0:
            raise ValueError("kind='null' needs num_null_experts >= 1")

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
    def num_extra(self) -> int:
        """Router-selectable experts beyond the FFN experts (null or zero-computation)."""
        if self.kind == "null":
            return self.num_null_experts
        if self.kind == "moepp":
            return self.num_zero_experts + self.num_copy_experts + self.num_const_experts
        return 0

    @property
    def num_selectable(self) -> int:
        """S: columns of the router logits (FFN experts first, then the extra ones)."""
        return self.num_experts + self.num_extra

    @property
    def max_slots(self) -> int:
        """K of the routing result: slots per token."""
        return self.num_experts if self.kind == "expert_choice" else self.top_k

    def expert_choice_capacity(self, num_tokens: int) -> int:
        """C = ceil(capacity_factor * T * K / E), at most T (an expert cannot take more tokens)."""
        c = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(c, num_tokens))
