"""Decoder-only MoE transformer language model."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.models.blocks import DTYPES, MoEStack, RMSNorm, param_with_axes
from jmoe.models.config import ModelConfig, MoEConfig


class TransformerLM(nn.Module):
    """`logits_BxLxV, aux = TransformerLM(model, moe).apply({'params': p}, tokens_BxL)`.

    Token embedding -> `num_layers` pre-norm blocks (causal attention with RoPE and optional
    GQA; an MoE FFN at the MoE layers, a dense SwiGLU FFN elsewhere) -> RMSNorm -> tied or
    untied output projection. Logits are float32. `decode=True` uses the `cache` collection
    (initialise it with `init_cache`) and positions continue from the cached length.
    """

    model: ModelConfig
    moe: MoEConfig

    @nn.compact
    def __call__(self, tokens_BxL, *, deterministic: bool = True, decode: bool = False):
        c = self.model
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        b, length = tokens_BxL.shape
        embed = param_with_axes(
            self,
            "embed",
            nn.initializers.normal(1.0),
            (c.vocab_size, c.d_model),
            ("vocab", "embed"),
            pdt,
        )
        x = jnp.take(embed, tokens_BxL, axis=0).astype(dt)
        start = jnp.zeros((), jnp.int32)
        if decode:
            idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            start = idx.value
            idx.value = start + length
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))
        x, aux = MoEStack(c, self.moe, causal=True, name="stack")(
            x, positions, token_ids=tokens_BxL, deterministic=deterministic, decode=decode
        )
        x = RMSNorm(c.norm_eps, dt, pdt, name="final_norm")(x)
        if c.tie_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, embed.astype(dt)) / jnp.sqrt(c.d_model)
        else:
            w = param_with_axes(
                self,
                "unembed",
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                (c.d_model, c.vocab_size),
                ("embed", "vocab"),
                pdt,
            )
            logits = x @ w.astype(dt)
        return logits.astype(jnp.float32), aux

    def init_cache(self, batch_size: int):
        """An empty `cache` collection for `batch_size` sequences of up to `max_len` tokens."""
        tokens = jnp.zeros((batch_size, 1), jnp.int32)
        shapes = jax.eval_shape(
            lambda: self.init(
                {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(0)},
                tokens,
                decode=True,
            )
        )
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
