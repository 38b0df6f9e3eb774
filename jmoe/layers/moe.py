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
import jax
import jax.numpy as jnp

from jmoe import dispatch as dispatch_lib
from jmoe import experts as experts_lib
from jmoe import losses
from jmoe.routing import RouterConfig, Routing, route
from jmoe.routing.config import check_choice
from jmoe.sharding import balance as balance_lib
from jmoe.sharding import expert_parallel as ep_lib
from jmoe.sharding.mesh import axis_size, batch_axes

# `RouterConfig` fields the layer holds under a meaning of its own: `router` is the kind, and
# `num_experts` / `top_k` count coarse experts (times `fine_grained` in the RouterConfig).
# Every other router field of the layer is generated from `RouterConfig` (type and default).
_OWN_ROUTER_FIELDS = ("kind", "num_experts", "top_k")
_SPECS = [f for f in dataclasses.fields(RouterConfig) if f.name not in _OWN_ROUTER_FIELDS]
ROUTER_FIELDS: tuple[str, ...] = tuple(f.name for f in _SPECS)
_RouterFields = type(
    "_RouterFields",
    (nn.Module,),
    {
        "__module__": __name__,
        "__annotations__": {f.name: f.type for f in _SPECS},
        **{f.name: f.default for f in _SPECS},
    },
)

_fan_in = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1
)
_expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)
# SwiGLU's [..., D, F, 2] (gate, up) weights: fan-in D.
_pair_fan_in = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-3, out_axis=(-2, -1)
)
_pair_expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-3, out_axis=(-2, -1), batch_axis=(0,)
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
    (eq. 7) are handled here.

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
        check_choice("dispatch", self.dispatch, dispatch_lib.DISPATCH_KINDS)
        check_choice("activation", self.activation, experts_lib.ACTIVATIONS)
        check_choice("balance_loss_scope", self.balance_loss_scope, balance_lib.BALANCE_LOSS_SCOPES)
        if self.fine_grained < 1 or self.d_ff % self.fine_grained:
            raise ValueError(
                f"d_ff={self.d_ff} must be divisible by fine_grained={self.fine_grained} (>= 1)"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        self.router_config  # noqa: B018  (validates the router fields now)

    @property
    def router_config(self) -> RouterConfig:
        m = self.fine_grained
        return RouterConfig(
            kind=self.router,
            num_experts=self.num_experts * m,
            top_k=self.top_k * m,
            **{name: getattr(self, name) for name in ROUTER_FIELDS},
        )

    def _expert_params(self, d_model: int, num: int, width: int, names=("expert",), prefix=""):
        """`w_gate_in` [num, D, F, 2] (SwiGLU) or `w_in` [num, D, F], and `w_out` [num, F, D]."""
        lead = (num,) if names else ()
        mk = lambda n, init, s, a: self.param(
            prefix + n,
            nn.with_logical_partitioning(init, (*names, *a)),
            (*lead, *s),
            self.param_dtype,
        ).astype(self.dtype)
        name_in, name_out = experts_lib.param_names(self.activation)
        if self.activation == "swiglu":
            init = _pair_expert_init if names else _pair_fan_in
            w_in = mk(name_in, init, (d_model, width, 2), ("embed", "mlp", None))
        else:
            init = _expert_init if names else _fan_in
            w_in = mk(name_in, init, (d_model, width), ("embed", "mlp"))
        out_init = _expert_init if names else _fan_in
        return {name_in: w_in, name_out: mk(name_out, out_init, (width, d_model), ("mlp", "embed"))}

    def _num_batch_shards(self) -> int:
        """Data-parallel shards of the tokens (micro-batches of the `micro_batch` loss)."""
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return 1
        return axis_size(mesh, batch_axes(mesh, self.data_axes, self.expert_axis))

    def _logits(self, x_TxD, prev_logits, cfg: RouterConfig, deterministic: bool):
        x = x_TxD.astype(jnp.float32)
        if cfg.jitter_eps > 0 and not deterministic:
            lo, hi = 1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps
            x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32, lo, hi)
        w = self.param(
            "router",
            nn.with_logical_partitioning(_fan_in, ("embed", None)),
            (x.shape[-1], cfg.num_selectable),
            jnp.float32,
        )
        logits = x @ w
        if self.gating_residual:
            w_g = self.param(
                "gating_residual",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)),
                (cfg.num_selectable,) * 2,
                jnp.float32,
            )
            if prev_logits is not None:
                logits = logits + prev_logits.reshape(logits.shape).astype(jnp.float32) @ w_g
        return logits

    def _bias(self, cfg: RouterConfig):
        """The `router_state/bias` variable of a router with a selection bias, else None."""
        if not cfg.record.selection_bias:
            return None
        if not self.has_variable("router_state", "bias") and not self.is_mutable_collection(
            "router_state"
        ):
            raise router_state_error(self.router)
        return self.variable("router_state", "bias", jnp.zeros, (cfg.num_experts,), jnp.float32)

    def _route(self, logits, cfg: RouterConfig, token_ids, bias, deterministic: bool):
        rng = self.make_rng("router") if cfg.record.needs_rng(cfg, deterministic) else None
        bias = None if bias is None else bias.value
        if token_ids is not None:
            token_ids = token_ids.reshape(-1)
        call = dict(rng=rng, bias=bias, token_ids=token_ids, deterministic=deterministic)
        if self.expert_axis is not None:  # token-local routers run per token shard
            return ep_lib.route_sharded(
                logits,
                cfg,
                mesh=self.mesh,
                expert_axis=self.expert_axis,
                data_axes=self.data_axes,
                **call,
            )
        return route(logits, cfg, **call)

    def _update_bias(self, bias, routing: Routing, cfg: RouterConfig, deterministic: bool):
        """Aux-loss-free balancing in training, when `router_state` is mutable (not at init)."""
        if bias is None or deterministic or self.is_initializing():
            return
        if not self.is_mutable_collection("router_state"):
            return
        counts = jax.lax.stop_gradient(routing.counts(cfg.num_selectable))
        bias.value = balance_lib.global_bias_update(bias.value, counts, cfg.bias_update_gamma)

    def _zero_computation(self, x_TxD, routing: Routing, cfg: RouterConfig):
        """MoE++ copy (E(x) = x) and constant (a1 x + a2 v) experts; zero experts add nothing."""
        first_copy = cfg.num_experts + cfg.num_zero_experts
        first_const = first_copy + cfg.num_copy_experts
        w = jnp.where(routing.mask, routing.weights, 0.0)
        ids = routing.expert_ids
        copy_w = jnp.sum(jnp.where((ids >= first_copy) & (ids < first_const), w, 0.0), -1)
        out = copy_w[:, None] * x_TxD.astype(jnp.float32)
        if cfg.num_const_experts:
            d = x_TxD.shape[-1]
            v = self.param(
                "const_v",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                (cfg.num_const_experts, d),
                jnp.float32,
            )
            w_c = self.param(
                "const_gate",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "embed", None)),
                (cfg.num_const_experts, d, 2),
                jnp.float32,
            )
            for j in range(cfg.num_const_experts):
                wj = jnp.sum(jnp.where(ids == first_const + j, w, 0.0), -1)[:, None]
                a = jax.nn.softmax(x_TxD.astype(jnp.float32) @ w_c[j], axis=-1)
                out = out + wj * (a[:, :1] * x_TxD + a[:, 1:] * v[j])
        return out

    def _experts(self, x_TxD, routing: Routing, cfg: RouterConfig):
        e, width = cfg.num_experts, self.d_ff // self.fine_grained
        params = self._expert_params(x_TxD.shape[-1], e, width)
        x = x_TxD.astype(self.dtype)
        if self.expert_axis is not None:
            return ep_lib.expert_parallel_ffn(
                params,
                x,
                routing,
                cfg,
                mesh=self.mesh,
                expert_axis=self.expert_axis,
                data_axes=self.data_axes,
                tensor_axis=self.tensor_axis,
                dispatch=self.dispatch,
                activation=self.activation,
                buffer_factor=self.ep_buffer_factor,
                implementation=self.gmm_implementation,
                a2a=self.ep_a2a,
            )
        if self.dispatch == "dropless":
            plan = dispatch_lib.dropless_plan(routing, e)
            y = experts_lib.dispatched_ffn(
                params,
                x,
                plan.order_N,
                plan.inv_N.reshape(routing.expert_ids.shape),
                plan.group_sizes_E,
                dispatch_lib.combine_weights(routing, e),
                self.activation,
                implementation=self.gmm_implementation,
            )
            return y.astype(x.dtype), jnp.float32(0.0), {}
        t, k = routing.expert_ids.shape
        cap = dispatch_lib.capacity(t, k, e, cfg.capacity_factor, cfg.min_capacity)
        buf, plan = dispatch_lib.capacity_dispatch(
            x, routing, e, cap, batch_priority=cfg.batch_priority
        )
        y = dispatch_lib.capacity_combine(
            experts_lib.batched_ffn(params, buf, self.activation), plan, routing, e
        )
        return y, plan.dropped / jnp.maximum(plan.active, 1), {}

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, token_ids=None, prev_logits=None):
        """Applies the layer.

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
        cfg = self.router_config
        x_TxD = x.reshape(-1, x.shape[-1])
        logits = self._logits(x_TxD, prev_logits, cfg, deterministic)
        bias = self._bias(cfg)
        routing = self._route(logits, cfg, token_ids, bias, deterministic)
        self._update_bias(bias, routing, cfg, deterministic)
        y, dropped_fraction, ep_aux = self._experts(x_TxD, routing, cfg)
        y = y.astype(jnp.float32)
        if cfg.num_copy_experts or cfg.num_const_experts:
            y = y + self._zero_computation(x_TxD, routing, cfg)
        if self.num_shared_experts:
            shared = self._expert_params(
                x.shape[-1],
                1,
                self.num_shared_experts * self.d_ff // self.fine_grained,
                names=(),
                prefix="shared_",
            )
            y = y + experts_lib.dense_ffn(shared, x_TxD.astype(self.dtype), self.activation)
        aux = {
            "load_balance_loss": balance_lib.balance_loss(
                routing, self.balance_loss_scope, self._num_batch_shards()
            ),
            "z_loss": losses.z_loss(routing.logits),
            "entropy_loss": losses.dynamic_loss(routing),
            "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32),
            "router_logits": logits.reshape(*x.shape[:-1], cfg.num_selectable),
            **losses.routing_stats(routing, cfg.num_experts),
            **ep_aux,
        }
        return y.astype(self.dtype).reshape(x.shape), aux
