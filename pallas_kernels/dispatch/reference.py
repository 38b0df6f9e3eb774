"""Plain-jnp capacity dispatch/combine: the test oracle. Index based, no [T, E, C] one-hot."""

import jax
import jax.numpy as jnp


def positions(expert_ids_TxK, valid_TxK, num_experts, *, priority_TxK=None):
    """Each slot's position in its expert's buffer; invalid slots get -1.

    Slots are ordered by token then slot (token order), or by descending priority when
    `priority_TxK` is given (batch-prioritised routing, V-MoE). Sort based: O(T*K log(T*K)).
    """
    t, k = expert_ids_TxK.shape
    n = t * k
    # Expert ids outside [0, E) (null / extra experts) are never buffered.
    valid_TxK = valid_TxK & (expert_ids_TxK >= 0) & (expert_ids_TxK < num_experts)
    e_N = jnp.where(valid_TxK, expert_ids_TxK, num_experts).reshape(n).astype(jnp.int32)
    if priority_TxK is None:
        order_N = jnp.argsort(e_N, stable=True)
    else:
        # Sort by expert, then by descending priority (stable: ties keep token order).
        by_prio = jnp.argsort(-priority_TxK.reshape(n).astype(jnp.float32), stable=True)
        order_N = by_prio[jnp.argsort(e_N[by_prio], stable=True)]
    sorted_e = e_N[order_N]
    counts_E = jnp.bincount(e_N, length=num_experts + 1)
    starts = jnp.concatenate([jnp.zeros((1,), counts_E.dtype), jnp.cumsum(counts_E)[:-1]])
    pos_sorted = jnp.arange(n) - starts[sorted_e]
    pos_N = jnp.zeros((n,), jnp.int32).at[order_N].set(pos_sorted.astype(jnp.int32))
    return jnp.where(valid_TxK, pos_N.reshape(t, k), -1)


def dispatch(x_TxD: jax.Array, expert_ids_TxK, pos_TxK, num_experts: int, capacity: int):
    """buf[e, c] = x[t] for the slot (t, k) with expert e and position c < capacity, else 0."""
    t, k = expert_ids_TxK.shape
    keep = (pos_TxK >= 0) & (pos_TxK < capacity)
    keep = keep & (expert_ids_TxK >= 0) & (expert_ids_TxK < num_experts)
    flat = jnp.where(keep, expert_ids_TxK * capacity + pos_TxK, num_experts * capacity)
    tok_TxK = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k))
    src = (
        jnp.full((num_experts * capacity + 1,), t, jnp.int32)
        .at[flat.reshape(-1)]
        .set(tok_TxK.reshape(-1).astype(jnp.int32), mode="drop")[:-1]
    )
    x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, x_TxD.shape[1]), x_TxD.dtype)])
    return x_pad[src].reshape(num_experts, capacity, x_TxD.shape[1])


def combine(buf_ExCxD, expert_ids_TxK, pos_TxK, weights_TxK):
    """y[t] = sum_k w[t, k] * buf[e[t, k], pos[t, k]] over kept slots."""
    e, c, d = buf_ExCxD.shape
    keep = (pos_TxK >= 0) & (pos_TxK < c) & (expert_ids_TxK >= 0) & (expert_ids_TxK < e)
    flat = jnp.where(keep, expert_ids_TxK * c + pos_TxK, 0)
    rows = buf_ExCxD.reshape(e * c, d)
    y = jnp.zeros((expert_ids_TxK.shape[0], d), jnp.float32)
    for j in range(expert_ids_TxK.shape[1]):
        w = jnp.where(keep[:, j], weights_TxK[:, j], 0.0).astype(jnp.float32)
        y = y + rows[flat[:, j]].astype(jnp.float32) * w[:, None]
    return y.astype(buf_ExCxD.dtype)
