"""Total and active parameter counts from abstract shapes (no allocation)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.models.blocks import layer_specs
from jmoe.models.config import split


def abstract_params(model: nn.Module, config):
    """`jax.eval_shape` of the model's `params` (boxed with their logical axis names)."""
    m, _ = split(config)
    if m.kind == "lm":
        x = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    elif m.arch == "mlp":
        x = jax.ShapeDtypeStruct((1, m.input_dim), jnp.float32)
    else:
        x = jax.ShapeDtypeStruct((1, *m.input_shape), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(1)}
    return jax.eval_shape(lambda t: model.init(rngs, t), x)["params"]


def count_params(model: nn.Module, config) -> dict[str, int]:
    """{'total', 'active', 'expert', 'embedding'} parameter counts.

    Active parameters: everything except the routed experts a token does not use, i.e. a
    leaf with a leading `expert` axis of size E in an MoE layer with top-k K counts K/E of
    its size (dynamic routers: K is the maximum). Shared experts and routers count fully.
    """
    mcfg, moe = split(config)
    specs = layer_specs(mcfg, moe)
    params = abstract_params(model, config)
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    total = active = expert = embedding = 0
    for path, leaf in flat:
        names = getattr(leaf, "names", ())
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        size = math.prod(value.shape)
        total += size
        keys = [getattr(p, "key", str(p)) for p in path]
        if names and names[0] == "vocab" or names[-1:] == ("vocab",):
            embedding += size
        if names and names[0] == "expert":
            layer = next(int(k.split("_")[1]) for k in keys if k.startswith("layer_"))
            e, k = specs[layer]
            expert += size
            active += size * k // e
        else:
            active += size
    return {"total": total, "active": active, "expert": expert, "embedding": embedding}
