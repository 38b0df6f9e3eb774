"""The routing result shared by every router, dispatcher and loss."""

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int


@struct.dataclass
class Routing:
    """Which experts each token uses, and with what weight.

    Attributes:
      expert_ids: int32[T, K] column chosen by each slot; columns `0..E-1` are FFN experts,
        columns `>= E` are router-selected extra experts (null or zero-computation).
      weights: float32[T, K] combine weight of each slot (0 where `mask` is False).
      mask: bool[T, K] slot is selected. A slot costs expert FLOPs iff `mask & (id < E)`.
      probs: float32[T, S] router probabilities over all S selectable columns (for losses).
      logits: float32[T, S] router logits (for the z-loss and gating residuals).
    """

    expert_ids: Int[Array, "T K"]
    weights: Float[Array, "T K"]
    mask: Bool[Array, "T K"]
    probs: Float[Array, "T S"]
    logits: Float[Array, "T S"]

    def active(self, num_experts: int) -> jax.Array:
        """bool[T, K]: slots that run an FFN expert."""
        return self.mask & (self.expert_ids < num_experts)

    def counts(self, num_columns: int) -> jax.Array:
        """float32[S]: selected slots per column (FFN and extra experts)."""
        ids = jnp.where(self.mask, self.expert_ids, num_columns).reshape(-1)
        return jnp.bincount(ids, length=num_columns + 1)[:num_columns].astype(jnp.float32)
