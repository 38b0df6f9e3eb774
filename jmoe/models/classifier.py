"""MoE classifiers for small vectors (MLP) or images (small ViT)."""

import flax.linen as nn
import jax.numpy as jnp

from jmoe.models.blocks import (
    DTYPES,
    MoEStack,
    RMSNorm,
    layer_specs,
    make_ffn,
    model_aux,
    param_with_axes,
)
from jmoe.models.config import ModelConfig, MoEConfig

_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class MLPStack(nn.Module):
    """Residual MLP blocks x + FFN(norm(x)), MoE FFN at the MoE layers (no attention)."""

    model: ModelConfig
    moe: MoEConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        c, m = self.model, self.moe
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        specs = layer_specs(c, m)
        layer_aux = {}
        prev = None
        for i in range(c.num_layers):
            h = RMSNorm(c.norm_eps, dt, pdt, name=f"norm_{i}")(x)
            ffn = make_ffn(c, m, specs.get(i), f"ffn_{i}")
            if i not in specs:
                x = x + ffn(h).astype(x.dtype)
                continue
            y, a = ffn(
                h, deterministic=deterministic, prev_logits=prev if m.gating_residual else None
            )
            x = x + y.astype(x.dtype)
            prev = a["router_logits"]
            layer_aux[f"layer_{i}"] = a
        return x, model_aux(layer_aux)


class Classifier(nn.Module):
    """`logits_BxC, aux = Classifier(model, moe).apply({'params': p}, inputs)`.

    `arch="mlp"`: inputs [B, input_dim] -> Dense -> residual (MoE) MLP blocks.
    `arch="vit"`: inputs [B, H, W] or [B, H*W] -> patches of `patch_size` -> linear patch
    embedding + learned positions -> bidirectional transformer blocks with MoE FFNs.
    Then RMSNorm, mean over tokens and a linear head. The `hash` router hashes a patch's
    index (its position) since there are no token ids.
    """

    model: ModelConfig
    moe: MoEConfig

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool = True):
        c = self.model
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        b = inputs.shape[0]
        x = inputs.astype(dt)
        if c.arch == "mlp":
            x = x.reshape(b, -1)
            w = param_with_axes(self, "w_in", _init, (x.shape[-1], c.d_model), (None, "embed"), pdt)
            x = (x @ w.astype(dt))[:, None, :]
            x, aux = MLPStack(c, self.moe, name="stack")(x, deterministic=deterministic)
        else:
            hh, ww = c.input_shape
            p = c.patch_size
            x = x.reshape(b, hh // p, p, ww // p, p).transpose(0, 1, 3, 2, 4)
            x = x.reshape(b, (hh // p) * (ww // p), p * p)
            n = x.shape[1]
            w = param_with_axes(self, "w_patch", _init, (p * p, c.d_model), (None, "embed"), pdt)
            pos = param_with_axes(
                self, "pos", nn.initializers.normal(0.02), (n, c.d_model), (None, "embed"), pdt
            )
            x = x @ w.astype(dt) + pos.astype(dt)
            positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            x, aux = MoEStack(c, self.moe, causal=False, name="stack")(
                x, positions, token_ids=positions, deterministic=deterministic
            )
        x = RMSNorm(c.norm_eps, dt, pdt, name="final_norm")(x).mean(axis=1)
        w = param_with_axes(self, "head", _init, (c.d_model, c.num_classes), ("embed", None), pdt)
        return (x @ w.astype(dt)).astype(jnp.float32), aux
