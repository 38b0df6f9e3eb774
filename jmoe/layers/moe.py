"""The MoE layer: router -> dispatcher -> experts -> combine, as a Flax Linen module.

Axis legend:
  T: tokens (all leading axes of the input flattened)   D: model width (`embed`)
  E: FFN experts (`expert`; num_experts * fine_grained)  F: expert FFN width (`mlp`)
  S: router columns (E plus null / zero-computation experts)
  K: slots per token (top_k * fine_grained; E for expert choice)   C: capacity per expert
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jmoe import dispatch as dispatch_lib
from jmoe import experts as experts_lib
from jmoe.layers import core
from jmoe.layers.core import ROUTER_FIELDS
from jmoe.routing import RouterConfig
from jmoe.sharding import balance as balance_lib
from jmoe.sharding.rules import with_logical_partitioning

# Every router field of the layer but `router`, `num_experts` and `top_k` (see
# `core.OWN_ROUTER_FIELDS`) is generated from `RouterConfig` (type and default).
_SPECS = [f for f in dataclasses.fields(RouterConfig) if f.name in ROUTER_FIELDS]
_RouterFields = type(
    "_RouterFields",
    (nn.Module,),
    {
        "__module__": __name__,
        "__annotations__": {f.name: f.type for f in _SPECS},
        **{f.name: f.default for f in _SPECS},
    },
)


def router_state_error(router: str) -> ValueError:
    """The error for a layer with router state applied without its `router_state`."""
    return ValueError(
        f"router={router!r} keeps its selection bias in the 'router_state' collection: apply "
        "with variables={'params': ..., 'router_state': ...} from init (and "
        "mutable=['router_state'] in training to update it)"
    )


class MoE(_RouterFields):
    """Mixture-of-Experts FFN. `y, aux = MoE(...).apply(variables, x)` for x of shape [..., D].

    Routers are named by `router` (a key of `jmoe.routing.ROUTERS`); every other router field
    (`top_p`, `capacity_factor`, `noise_std`, ...) is a `RouterConfig` field of the same name.
    `dispatch` is `dropless` (grouped GEMM, nothing dropped) or `capacity` (buffers of C rows,
    overflow dropped and reported in `aux["dropped_fraction"]`). `fine_grained=m` splits each
    expert into m experts of width d_ff/m and activates m*top_k of them; `num_shared_experts`
    experts of that width run on every token (DeepSeekMoE, Dai et al., 2024, eq. 10-11).
    MoE++ copy and constant experts (Jin et al., 2024, eq. 4-5) and the gating residual
    (eq. 7) are handled by the layer. The forward pass is `jmoe.layers.core.forward`, which
    the NNX layer (`jmoe.nnx.MoE`) shares; this module creates the variables.

    Router state: a router with a selection bias (`sigmoid`) keeps it in the `router_state`
    collection, as BatchNorm keeps its statistics. In training (`deterministic=False`) with
    `apply(..., mutable=["router_state"])` the layer moves it by the aux-loss-free rule
    (DeepSeek-V3, sec. 2.1.2) from this batch's expert loads (global over the data axes in
    the jit view), outside the gradient; applied without `mutable`, it reads it unchanged.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    router: str = "topk"
    dispatch: dispatch_lib.DispatchKind = "dropless"
    gating_residual: bool = False
    fine_grained: int = 1
    num_shared_experts: int = 0
    activation: experts_lib.Activation = "swiglu"
    gmm_implementation: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Expert parallelism (jmoe.sharding): set `expert_axis` to shard experts over that mesh axis
    # (mesh from `mesh` or `jax.set_mesh`); tokens split over `data_axes` + `expert_axis`.
    expert_axis: str | None = None
    data_axes: tuple[str, ...] = ("data", "fsdp")
    tensor_axis: str | None = None
    mesh: Any = None
    ep_buffer_factor: float | None = None
    ep_a2a: str = "auto"  # auto | padded | ragged | ragged_emulated (jmoe.sharding.A2A_KINDS)
    balance_loss_scope: balance_lib.BalanceLossScope = "global_batch"

    def __post_init__(self):
        super().__post_init__()
        core.validate(self)

    @property
    def router_config(self) -> RouterConfig:
        return core.router_config(self)

    def _bias(self):
        """The `router_state/bias` variable of a router with a selection bias, else None."""
        shape = core.bias_shape(self)
        if shape is None:
            return None
        if not self.has_variable("router_state", "bias") and not self.is_mutable_collection(
            "router_state"
        ):
            raise router_state_error(self.router)
        return self.variable("router_state", "bias", jnp.zeros, shape, jnp.float32)

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, token_ids=None, prev_logits=None):
        """Applies the layer (`jmoe.layers.core.forward` over this module's variables).

        Args:
          x: [..., D] inputs.
          deterministic: evaluation mode (no router noise; THOR uses `stochastic_eval`).
          token_ids: int [...] token ids, needed by the `hash` router.
          prev_logits: [..., S] previous layer's router logits for the MoE++ gating residual.

        Returns:
          `(y, aux)`: y of x's shape and dtype `self.dtype`; aux holds `load_balance_loss`,
          `z_loss`, `entropy_loss`, `expert_load` / `expert_counts` [S], `dropped_fraction`,
          `experts_per_token_{mean,min,max}`, `experts_per_token_hist` [K + 1] (tokens that
          use 0..K FFN experts), `router_entropy` and `router_logits` [..., S].
        """
        if x.ndim < 2:
            raise ValueError(f"x must have rank >= 2 ([..., D]), got shape {x.shape}")
        params = {
            name: self.param(name, with_logical_partitioning(p.init, p.axes), p.shape, p.dtype)
            for name, p in core.param_specs(self, x.shape[-1]).items()
        }
        bias = self._bias()
        update = (
            bias is not None
            and not self.is_initializing()
            and self.is_mutable_collection("router_state")
        )
        y, aux, new_bias = core.forward(
            self,
            params,
            x,
            bias=None if bias is None else bias.value,
            make_rng=lambda: self.make_rng("router"),
            deterministic=deterministic,
            token_ids=token_ids,
            prev_logits=prev_logits,
            update_bias=update,
        )
        if update and not deterministic:
            bias.value = new_bias
        return y, aux
