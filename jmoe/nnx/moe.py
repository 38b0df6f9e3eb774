"""The MoE layer as a Flax NNX module, over the same pure core as the Linen layer.

`jmoe.nnx.MoE(d_model, rngs=nnx.Rngs(0), **fields)` takes every field of `jmoe.layers.MoE`
(`MoESettings` is generated from that layer's dataclass fields, so the two cannot drift),
holds the parameters `jmoe.layers.core.param_specs` lists as `nnx.Param` attributes named as
in the Linen layer's `params` collection, and the sigmoid router's selection bias as a
`RouterState` variable named `bias` (the Linen `router_state/bias`). Its call is
`jmoe.layers.core.forward`.
"""

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.layers import core
from jmoe.layers.moe import MoE as LinenMoE
from jmoe.sharding.rules import nnx_sharding_metadata

# The Linen layer's fields but Linen's own `parent` and `name`, in its order and with its types
# and defaults: the one list of the NNX layer's fields.
LAYER_FIELDS: tuple[dataclasses.Field, ...] = tuple(
    f for f in dataclasses.fields(LinenMoE) if f.name not in ("parent", "name")
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in LAYER_FIELDS)


def _check(self):
    core.validate(self)


MoESettings = dataclasses.make_dataclass(
    "MoESettings",
    [(f.name, f.type, dataclasses.field(default=f.default)) for f in LAYER_FIELDS],
    frozen=True,
    namespace={
        "__doc__": "The settings of `jmoe.nnx.MoE`: every `jmoe.layers.MoE` field, validated "
        "by `jmoe.layers.core.validate` at construction.",
        "__module__": __name__,
        "__post_init__": _check,
        "router_config": property(core.router_config),
    },
)


class RouterState(nnx.Variable):
    """Router state outside the gradient: the sigmoid router's selection bias [E].

    The NNX form of the Linen layer's `router_state` collection (`nnx.bridge` maps that
    collection to this type too). `nnx.Optimizer(model, tx, wrt=nnx.Param)` leaves it alone;
    the layer moves it itself in training.
    """


nnx.register_variable_name("router_state", RouterState, overwrite=True)


def settings(**fields) -> Any:
    """`MoESettings(**fields)`; a `ValueError` naming an unknown field and the known ones."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} of jmoe.nnx.MoE; allowed: {', '.join(FIELD_NAMES)}"
        )
    return MoESettings(**fields)


class MoE(nnx.Module):
    """Mixture-of-Experts FFN as an NNX module: `y, aux = MoE(d_model, rngs=rngs, ...)(x)`.

    The same fields, `(y, aux)` result and numbers as `jmoe.layers.MoE` (see its docstring);
    the fields are read back as `model.config.<field>`. Parameters are `nnx.Param`s with
    logical axes (`out_sharding`) and mesh rules (`sharding_rules`, default
    `jmoe.sharding.DEFAULT_RULES`), so `nnx.get_partition_spec(nnx.state(model))` gives
    their mesh specs; built under `jax.set_mesh(mesh)` (or with `mesh=`) they are placed at
    creation, and without a mesh they are created unsharded (no global flag needed).

    Training mode (`deterministic=False`, or `model.train()`) draws router randomness from
    the `router` stream of `rngs` (else its `default` stream) and moves the selection bias
    (`RouterState`, aux-loss-free balancing) from each batch's loads, as the Linen layer does
    with `mutable=["router_state"]`.

    Args:
      d_model: D, the width of the inputs (Linen infers it from the first input).
      rngs: `nnx.Rngs` for the parameters (`params` stream) and the router's draws.
      deterministic: the default mode of `__call__` (True: evaluation, as in Linen).
      sharding_rules: logical -> mesh axis rules (default `jmoe.sharding.DEFAULT_RULES`).
      **fields: the `jmoe.layers.MoE` fields (`num_experts`, `top_k`, `router`, ...).
    """

    def __init__(
        self,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        deterministic: bool = True,
        sharding_rules=None,
        **fields,
    ):
        self.config = settings(**fields)
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r} must be an int >= 1")
        self.d_model = d_model
        self.deterministic = deterministic
        self.param_names = tuple(core.param_specs(self.config, d_model))
        for name, spec in core.param_specs(self.config, d_model).items():
            meta = nnx_sharding_metadata(spec.axes, self.config.mesh, sharding_rules)
            value = spec.init(rngs.params(), spec.shape, spec.dtype)
            setattr(self, name, nnx.Param(value, **meta))
        shape = core.bias_shape(self.config)
        self.bias = nnx.data(None) if shape is None else RouterState(jnp.zeros(shape, jnp.float32))
        has_stream = "router" in vars(rngs) or "default" in vars(rngs)
        self.rngs = rngs["router"].fork() if has_stream else nnx.data(None)

    def _make_rng(self, rngs):
        rngs = rngs if rngs is not None else self.rngs
        if isinstance(rngs, jax.Array):
            return lambda: rngs
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs["router"]
        if rngs is None:
            raise ValueError(
                f"router={self.config.router!r} with these settings draws in this mode: build "
                "the layer with rngs=nnx.Rngs(params=..., router=...) or pass rngs= to the call"
            )
        return rngs

    def __call__(
        self, x, *, deterministic=None, token_ids=None, prev_logits=None, rngs=None
    ) -> tuple[jax.Array, dict]:
        """Applies the layer; arguments and result as `jmoe.layers.MoE.__call__`.

        Args:
          x: [..., d_model] inputs.
          deterministic: evaluation mode; None: the module's `deterministic` attribute.
          token_ids: int [...] token ids (`hash` router).
          prev_logits: [..., S] previous layer's router logits (MoE++ gating residual).
          rngs: overrides the module's router stream (`nnx.Rngs`, `RngStream` or a key).
        """
        if x.shape[-1:] != (self.d_model,):
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {x.shape}")
        det = self.deterministic if deterministic is None else deterministic
        params = {name: getattr(self, name)[...] for name in self.param_names}
        bias = None if self.bias is None else self.bias[...]
        y, aux, new_bias = core.forward(
            self.config,
            params,
            x,
            bias=bias,
            make_rng=lambda: self._make_rng(rngs)(),
            deterministic=det,
            token_ids=token_ids,
            prev_logits=prev_logits,
            update_bias=True,
        )
        if self.bias is not None and not det:
            self.bias[...] = new_bias
        return y, aux


def _signature() -> inspect.Signature:
    """`MoE.__init__`'s signature with every field spelled out (for help() and IDEs)."""
    base = inspect.signature(MoE.__init__)
    params = [p for p in base.parameters.values() if p.kind != p.VAR_KEYWORD]
    kw = inspect.Parameter.KEYWORD_ONLY
    params += [
        inspect.Parameter(f.name, kw, default=f.default, annotation=f.type) for f in LAYER_FIELDS
    ]
    return base.replace(parameters=params)


MoE.__init__.__signature__ = _signature()
