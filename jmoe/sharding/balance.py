"""Load-balance losses and aux-loss-free bias updates over data-parallel shards.

"Demons in the Detail" (Qiu et al., 2025): the micro-batch balance loss computes f_i on each
data-parallel replica's own tokens and pushes every micro-batch (often every sequence) to be
balanced; the global-batch loss sums the expert counts over all replicas first (P_i stays
local), which balances the corpus and lets experts specialise.
"""

from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jmoe import losses
from jmoe.routing.routers import aux_free_bias_update
from jmoe.routing.types import Routing

BalanceLossScope = Literal["micro_batch", "global_batch"]
BALANCE_LOSS_SCOPES: tuple[str, ...] = get_args(BalanceLossScope)


def _counts(ids_TxK, mask_TxK, num_columns):
    ids = jnp.where(mask_TxK, ids_TxK, num_columns).reshape(-1)
    return jnp.bincount(ids, length=num_columns + 1)[:num_columns].astype(jnp.float32)


def balance_loss(routing: Routing, scope: BalanceLossScope = "global_batch", num_shards: int = 1):
    """Switch balance loss in the global view of a batch split into `num_shards` shards.

    `global_batch`: counts over all tokens (the loss of the whole batch, as on one device).
    `micro_batch`: each contiguous shard of T / num_shards tokens (one data-parallel replica's
    micro-batch) gets its own loss; the result is their mean.
    """
    if scope not in BALANCE_LOSS_SCOPES:
        raise ValueError(f"balance_loss_scope={scope!r} is not one of {BALANCE_LOSS_SCOPES}")
    if scope == "global_batch" or num_shards == 1:
        return losses.load_balance_loss(routing)
    t, s = routing.probs.shape
    if t % num_shards:
        raise ValueError(f"{t} tokens cannot be split into {num_shards} micro-batches")
    k = routing.expert_ids.shape[-1]
    probs = routing.probs.reshape(num_shards, t // num_shards, s)
    ids = routing.expert_ids.reshape(num_shards, -1, k)
    mask = routing.mask.reshape(num_shards, -1, k)
    counts = jax.vmap(lambda i, m: _counts(i, m, s))(ids, mask)
    return jnp.mean(jax.vmap(losses.load_balance_loss_from_counts)(probs, counts))


def global_balance_loss(routing: Routing, axis_names: str | Sequence[str]):
    """Global-batch balance loss inside `shard_map`/`pmap` over the data-parallel `axis_names`.

    Counts are psum'd over the replicas before the loss; each replica's loss uses its local
    P_i, and the mean over replicas equals the loss of the whole global batch.
    """
    counts = jax.lax.psum(routing.counts(routing.probs.shape[-1]), axis_names)
    local = losses.load_balance_loss_from_counts(routing.probs, counts)
    return jax.lax.pmean(local, axis_names)


def global_bias_update(
    bias_E, counts_E, gamma: float = 1e-3, axis_names: str | Sequence[str] | None = None
):
    """Aux-loss-free bias update (DeepSeek-V3) from loads summed over all replicas.

    In the global (jit/GSPMD) view the layer's `aux["expert_counts"]` are already global sums;
    inside `shard_map`/`pmap` pass the data-parallel `axis_names` and the local counts are
    psum'd first, so every replica applies the same update.
    """
    counts = counts_E[: bias_E.shape[0]].astype(jnp.float32)
    if axis_names:
        counts = jax.lax.psum(counts, axis_names)
    return aux_free_bias_update(bias_E, counts, gamma)
