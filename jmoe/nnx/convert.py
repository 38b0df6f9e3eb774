"""Linen <-> NNX: parameter conversion both ways, and Linen models (the LM) through the bridge.

Linen keeps variables by collection (`{"params": {...}, "router_state": {...}}`); NNX keeps
one tree of typed variables (`nnx.Param`, `RouterState`) by attribute path. For jmoe's NNX
layer, and for any Linen module wrapped by `nnx.bridge.ToNNX`, the attribute paths are the
Linen paths, so a checkpoint converts by merging or splitting the collections:
`load_linen_variables(model, variables)` and `linen_variables(model)`.
"""

from typing import Any

from flax import nnx
from flax.core import meta, unfreeze
from flax.nnx import variablelib

from jmoe.nnx.moe import MoE, RouterState  # noqa: F401  (registers the router_state type)


def _flat(tree, prefix=()) -> dict[tuple, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*prefix, k)))
    return out


def _nest(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def linen_variables(model: nnx.Module) -> dict[str, dict]:
    """The Linen variables (`{"params": ..., "router_state": ...}`) of an NNX model.

    For a `jmoe.nnx.MoE`, or a Linen model under `nnx.bridge.ToNNX`: what the Linen module's
    `apply` takes. RNG state is left out.
    """
    flat: dict[tuple, Any] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))):
        col = variablelib.variable_name_from_type(type(var), allow_register=True)
        flat[(col, *(str(k) for k in path))] = var.get_value()
    return _nest(flat)


def load_linen_variables(model: nnx.Module, variables) -> nnx.Module:
    """Sets an NNX model's variables from Linen variables (e.g. a Linen checkpoint).

    Args:
      model: a `jmoe.nnx.MoE` or an `nnx.bridge.ToNNX` model (initialised).
      variables: `{"params": ..., "router_state": ...}`, boxed or not, of the same module.

    Returns:
      `model`, updated in place.

    Raises:
      ValueError: naming the paths that are missing on either side or differ in shape.
    """
    variables = unfreeze(meta.unbox(variables))
    want = {}
    for col, tree in variables.items():
        for path, v in _flat(tree).items():
            want[path] = (col, v)
    state = nnx.state(model, nnx.Not(nnx.RngState))
    have = {tuple(str(k) for k in p): var for p, var in nnx.to_flat_state(state)}
    if set(want) != set(have):
        missing = sorted("/".join(p) for p in set(have) - set(want))
        extra = sorted("/".join(p) for p in set(want) - set(have))
        raise ValueError(f"variables do not match the model: missing {missing}, unknown {extra}")
    for path, var in have.items():
        col, value = want[path]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(
                f"{col}/{'/'.join(path)} has shape {value.shape}, the model's "
                f"{var.get_value().shape}"
            )
        var.set_value(value)
    return model


def bridge(linen_module, *sample_args, rngs=None, variables=None, **sample_kwargs) -> nnx.Module:
    """A Linen module (e.g. `jmoe.models.build(config)`, the LM) as an initialised NNX module.

    `nnx.bridge.ToNNX(linen_module, rngs=rngs).lazy_init(*sample_args, **sample_kwargs)`, then,
    given `variables` (a Linen checkpoint's `{"params": ..., "router_state": ...}`), those
    values. Call it as the Linen module's `apply` without variables:
    `logits, aux = model(tokens, deterministic=False, mutable=["router_state"])` moves the
    router state in training, and `nnx.Optimizer(model, tx, wrt=nnx.Param)` fine-tunes it.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    model = nnx.bridge.ToNNX(linen_module, rngs=rngs)
    nnx.bridge.lazy_init(model, *sample_args, **sample_kwargs)
    if variables is not None:
        load_linen_variables(model, variables)
    return model
