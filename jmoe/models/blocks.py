"""Transformer building blocks with logical sharding names on every parameter.

Logical axes: `vocab`, `embed` (D), `heads` (query heads), `kv_heads`, `kv` (head dim),
`mlp` (FFN width), `expert` (inside `jmoe.layers.MoE`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.layers.chain import ChainOfExperts
from jmoe.models.config import ModelConfig, MoEConfig
from jmoe.models.schedules import layer_plan
from jmoe.sharding.rules import with_logical_partitioning

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def param_with_axes(mod: nn.Module, name, init, shape, axes, dtype):
    return mod.param(name, with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang and Sennrich, 2019) with a learned `embed`-sharded scale."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope(x_BxLxHxK, positions_BxL, theta: float):
    """Rotary position embedding (Su et al., 2021), rotate-half form."""
    k = x_BxLxHxK.shape[-1]
    freq = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
    ang = positions_BxL[..., None].astype(jnp.float32) * freq  # [B, L, K/2]
    sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
    """Multi-head attention with RoPE, grouped-query option and a KV cache for decoding.

    `decode=True` appends this call's keys/values to the `cache` collection at
    `cache_index` and attends over everything cached so far (prefill or one step).
    """

    cfg: ModelConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, *, decode: bool = False):
        c = self.cfg
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        h, g, k, d = c.num_heads, c.kv_heads, c.dim_per_head, x_BxLxD.shape[-1]
        w = lambda n, s, a: param_with_axes(self, n, _init, s, a, pdt).astype(dt)
        x = x_BxLxD.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, w("wq", (d, h, k), ("embed", "heads", "kv")))
        kk = jnp.einsum("bld,dhk->blhk", x, w("wk", (d, g, k), ("embed", "kv_heads", "kv")))
        v = jnp.einsum("bld,dhk->blhk", x, w("wv", (d, g, k), ("embed", "kv_heads", "kv")))
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, dt, pdt, "kv", name="q_norm")(q)
            kk = RMSNorm(c.norm_eps, dt, pdt, "kv", name="k_norm")(kk)
        if c.rope_theta > 0 and self.causal:
            q, kk = rope(q, positions_BxL, c.rope_theta), rope(kk, positions_BxL, c.rope_theta)
        b, length = x.shape[:2]
        q_pos = positions_BxL
        k_pos = positions_BxL
        if decode:
            ck = self.variable("cache", "key", jnp.zeros, (b, c.max_len, g, k), dt)
            cv = self.variable("cache", "value", jnp.zeros, (b, c.max_len, g, k), dt)
            idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            i = idx.value
            ck.value = jax.lax.dynamic_update_slice(ck.value, kk.astype(dt), (0, i, 0, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(dt), (0, i, 0, 0))
            idx.value = i + length
            kk, v = ck.value, cv.value
            k_pos = jnp.broadcast_to(jnp.arange(c.max_len), (b, c.max_len))
            valid = k_pos < i + length
        q = q.reshape(b, length, g, h // g, k)
        s = jnp.einsum("blgrk,bmgk->bgrlm", q, kk).astype(jnp.float32) / jnp.sqrt(k)
        mask = jnp.ones((b, length, k_pos.shape[1]), bool)
        if self.causal:
            mask = k_pos[:, None, :] <= q_pos[:, :, None]
        if decode:
            mask = mask & valid[:, None, :]
        s = jnp.where(mask[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(dt)
        o = jnp.einsum("bgrlm,bmgk->blgrk", p, v).reshape(b, length, h, k)
        wo = w("wo", (h, k, d), ("heads", "kv", "embed"))
        return jnp.einsum("blhk,hkd->bld", o, wo)


class DenseFFN(nn.Module):
    """SwiGLU FFN (Shazeer, 2020)."""

    d_ff: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        w = lambda n, s, a: param_with_axes(self, n, _init, s, a, self.param_dtype).astype(
            self.dtype
        )
        x = x.astype(self.dtype)
        hidden = jax.nn.silu(x @ w("w_gate", (d, self.d_ff), ("embed", "mlp")))
        hidden = hidden * (x @ w("w_in", (d, self.d_ff), ("embed", "mlp")))
        return hidden @ w("w_out", (self.d_ff, d), ("mlp", "embed"))


def make_ffn(model: ModelConfig, moe: MoEConfig, layer_spec, name: str):
    """A dense FFN (`layer_spec is None`) or an MoE / Chain-of-Experts FFN module."""
    dt, pdt = DTYPES[model.dtype], DTYPES[model.param_dtype]
    if layer_spec is None:
        return DenseFFN(model.d_ff, dt, pdt, name=name)
    num_experts, top_k = layer_spec
    kw = dict(
        num_experts=num_experts,
        top_k=top_k,
        hash_vocab_size=model.vocab_size,
        dtype=dt,
        param_dtype=pdt,
    )
    if moe.chain_iterations > 1:
        layer = moe.layer(**kw, parent=None)
        return ChainOfExperts(moe=layer, iterations=moe.chain_iterations, name=name)
    return moe.layer(**kw, name=name)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)), then x + FFN(norm(x))."""

    model: ModelConfig
    moe: MoEConfig
    layer_spec: Any = None  # None (dense) or (num_experts, top_k).
    causal: bool = True

    @nn.compact
    def __call__(
        self, x, positions, *, token_ids=None, prev_logits=None, deterministic=True, decode=False
    ):
        c = self.model
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        h = RMSNorm(c.norm_eps, dt, pdt, name="attn_norm")(x)
        x = x + Attention(c, self.causal, name="attn")(h, positions, decode=decode).astype(x.dtype)
        h = RMSNorm(c.norm_eps, dt, pdt, name="ffn_norm")(x)
        ffn = make_ffn(c, self.moe, self.layer_spec, "ffn")
        if self.layer_spec is None:
            return x + ffn(h).astype(x.dtype), None
        y, aux = ffn(h, deterministic=deterministic, token_ids=token_ids, prev_logits=prev_logits)
        return x + y.astype(x.dtype), aux


LOSS_KEYS = ("load_balance_loss", "z_loss", "entropy_loss")


def model_aux(layer_aux: dict[str, dict]) -> dict:
    """A model's aux from its MoE layers' aux by layer name: `layers` (each layer's statistics
    and losses, all but its logits and its Chain-of-Experts iterations) and each loss summed
    over the layers."""
    skip = ("router_logits", "iterations")
    aux = {
        "layers": {n: {k: v for k, v in a.items() if k not in skip} for n, a in layer_aux.items()}
    }
    for k in LOSS_KEYS:
        aux[k] = sum((a[k] for a in layer_aux.values()), jnp.float32(0.0))
    return aux


class MoEStack(nn.Module):
    """The blocks of a model, threading MoE++ gating-residual logits between MoE layers.

    Returns `(x, aux)` with `aux["layers"][f"layer_{l}"]` the stats of MoE layer l and the
    summed losses (`model_aux`).
    """

    model: ModelConfig
    moe: MoEConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x, positions, *, token_ids=None, deterministic=True, decode=False):
        c, m = self.model, self.moe
        specs = layer_specs(c, m)
        prev_logits = None
        layer_aux = {}
        for i in range(c.num_layers):
            x, a = Block(c, m, specs.get(i), self.causal, name=f"layer_{i}")(
                x,
                positions,
                token_ids=token_ids,
                prev_logits=prev_logits if m.gating_residual else None,
                deterministic=deterministic,
                decode=decode,
            )
            if a is not None:
                prev_logits = a["router_logits"]
                layer_aux[f"layer_{i}"] = a
        return x, model_aux(layer_aux)


def layer_specs(model: ModelConfig, moe: MoEConfig) -> dict[int, tuple[int, int]]:
    """{layer index: (num_experts, top_k)} for the MoE layers, from the DynaMoE schedule."""
    layers = model.moe_layers
    if not layers:
        return {}
    budget = moe.schedule_budget or moe.num_experts * len(layers)
    plan = layer_plan(
        moe.schedule,
        len(layers),
        budget,
        moe.top_k,
        min_experts=moe.schedule_min_experts,
        scale_top_k=moe.schedule_scale_top_k,
        cycles=moe.schedule_cycles,
    )
    return dict(zip(layers, plan, strict=True))
