"""The MoE layer: router -> dispatcher -> experts -> combine, as a Flax Linen module.

Axis legend:
  T: tokens (all leading axes of the input flattened)   D: model width (`embed`)
  E: FFN experts (`expert`; num_experts * fine_grained)  F: expert FFN width (`mlp`)
  S: router columns (E plus null / zero-computation experts)
  K: slots per token (top_k * fine_grained; E for expert choice)   C: capacity per expert
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe import dispatch as dispatch_lib
from jmoe import experts as experts_lib
from jmoe import losses
from jmoe.routing import RouterConfig, Routing, route
from jmoe.routing.config import RouterKind, SoftmaxOrder, StochasticEval
from jmoe.sharding import balance as balance_lib
from jmoe.sharding import expert_parallel as ep_lib
from jmoe.sharding.mesh import axis_size, batch_axes

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


class MoE(nn.Module):
    """Mixture-of-Experts FFN. `y, aux = MoE(...).apply(variables, x)` for x of shape [..., D].

    Routers are named by `router` (see `jmoe.routing.ROUTER_KINDS`); `dispatch` is `dropless`
    (grouped GEMM, nothing dropped) or `capacity` (buffers of C rows, overflow dropped and
    reported in `aux["dropped_fraction"]`). `fine_grained=m` splits each expert into m experts
    of width d_ff/m and activates m*top_k of them; `num_shared_experts` experts of that width
    run on every token (DeepSeekMoE, Dai et al., 2024, eq. 10-11). MoE++ copy and constant
    experts (Jin et al., 2024, eq. 4-5) and the gating residual (eq. 7) are handled here.
    The sigmoid router's selection bias lives in the `router_state` collection; update it
    with `jmoe.routing.aux_free_bias_update` outside the gradient.
    """

    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    router: RouterKind = "topk"
    dispatch: dispatch_lib.DispatchKind = "dropless"
    capacity_factor: float = 1.25
    min_capacity: int = 0
    batch_priority: bool = False
    top_p: float = 0.5
    num_null_experts: int = 0
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_const_experts: int = 0
    gating_residual: bool = False
    normalize_weights: bool = True
    softmax_order: SoftmaxOrder = "before"
    noise_std: float = 0.0
    jitter_eps: float = 0.0
    route_scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    stochastic_eval: StochasticEval = "random"
    hash_vocab_size: int = 256
    hash_seed: int = 0
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
        if self.dispatch not in dispatch_lib.DISPATCH_KINDS:
            raise ValueError(
                f"dispatch={self.dispatch!r} is not one of {dispatch_lib.DISPATCH_KINDS}"
            )
        if self.activation not in experts_lib.ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is not one of {experts_lib.ACTIVATIONS}"
            )
        if self.fine_grained < 1 or self.d_ff % self.fine_grained:
            raise ValueError(
                f"d_ff={self.d_ff} must be divisible by fine_grained={self.fine_grained} (>= 1)"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        if self.jitter_eps < 0 or self.min_capacity < 0:
            raise ValueError("jitter_eps and min_capacity must be >= 0")
        if self.balance_loss_scope not in balance_lib.BALANCE_LOSS_SCOPES:
            raise ValueError(
                f"balance_loss_scope={self.balance_loss_scope!r} is not one of "
                f"{balance_lib.BALANCE_LOSS_SCOPES}"
            )
        self.router_config  # noqa: B018  (validates the router fields now)

    @property
    def router_config(self) -> RouterConfig:
        m = self.fine_grained
        return RouterConfig(
            kind=self.router,
            num_experts=self.num_experts * m,
            top_k=self.top_k * m,
            top_p=self.top_p,
            capacity_factor=self.capacity_factor,
            num_null_experts=self.num_null_experts,
            num_zero_experts=self.num_zero_experts,
            num_copy_experts=self.num_copy_experts,
            num_const_experts=self.num_const_experts,
            normalize_weights=self.normalize_weights,
            softmax_order=self.softmax_order,
            noise_std=self.noise_std,
            route_scale=self.route_scale,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            stochastic_eval=self.stochastic_eval,
            hash_vocab_size=self.hash_vocab_size,
            hash_seed=self.hash_seed,
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
        if self.jitter_eps > 0 and not deterministic:
            noise = jax.random.uniform(
                self.make_rng("router"),
                x.shape,
                jnp.float32,
                1.0 - self.jitter_eps,
                1.0 + self.jitter_eps,
            )
            x = x * noise
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

    def _route(self, logits, cfg: RouterConfig, token_ids, deterministic: bool) -> Routing:
        needs_rng = (not deterministic and (cfg.noise_std > 0 or cfg.kind == "stochastic")) or (
            cfg.kind == "stochastic" and cfg.stochastic_eval == "random"
        )
        rng = self.make_rng("router") if needs_rng else None
        bias = None
        if cfg.kind == "sigmoid":
            bias = self.variable(
                "router_state", "bias", jnp.zeros, (cfg.num_experts,), jnp.float32
            ).value
        if token_ids is not None:
            token_ids = token_ids.reshape(-1)
        if self.expert_axis is not None:  # token-local routers run per token shard
            return ep_lib.route_sharded(
                logits,
                cfg,
                mesh=self.mesh,
                expert_axis=self.expert_axis,
                data_axes=self.data_axes,
                rng=rng,
                bias=bias,
                token_ids=token_ids,
                deterministic=deterministic,
            )
        return route(
            logits, cfg, rng=rng, bias=bias, token_ids=token_ids, deterministic=deterministic
        )

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
                e,
                mesh=self.mesh,
                expert_axis=self.expert_axis,
                data_axes=self.data_axes,
                tensor_axis=self.tensor_axis,
                dispatch=self.dispatch,
                capacity_factor=self.capacity_factor,
                min_capacity=self.min_capacity,
                batch_priority=self.batch_priority,
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
        cap = dispatch_lib.capacity(t, k, e, self.capacity_factor, self.min_capacity)
        buf, plan = dispatch_lib.capacity_dispatch(
            x, routing, e, cap, batch_priority=self.batch_priority
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
          `experts_per_token_{mean,min,max}`, `router_entropy` and `router_logits` [..., S].
        """
        if x.ndim < 2:
            raise ValueError(f"x must have rank >= 2 ([..., D]), got shape {x.shape}")
        cfg = self.router_config
        x_TxD = x.reshape(-1, x.shape[-1])
        logits = self._logits(x_TxD, prev_logits, cfg, deterministic)
        routing = self._route(logits, cfg, token_ids, deterministic)
        y, dropped_fraction, ep_aux = self._experts(x_TxD, routing, cfg)
        y = y.astype(jnp.float32)
        if cfg.kind == "moepp":
            y = y + self._zero_computation(x_TxD, routing, cfg)
        if self.num_shared_experts:
            shared = self._expert_params(
                x.shape[-1],
                1,
                self.num_shared_experts * self.d_ff // self.fine_grained,
                names=(),
                prefix="shared_",
            )
            shared = {k: v for k, v in shared.items()}
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
