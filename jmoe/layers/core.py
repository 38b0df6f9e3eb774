"""The MoE layer's forward pass as pure functions of explicit parameters and state.

One core, two front ends: the Linen `jmoe.layers.MoE` and the NNX `jmoe.nnx.MoE` create
the parameters `param_specs` lists (names, shapes, dtypes, initialisers, logical axes) in
their own way and call `forward`, which routes, dispatches, runs the experts (MoE++
zero-computation and shared experts included), assembles `aux` and returns the router's
moved selection bias. Nothing here reads a Flax scope; no module imports `flax.linen`.

`s` below is the layer's settings: any object with the `jmoe.layers.MoE` fields as
attributes (the Linen module itself, or the NNX layer's `config`).

Axis legend: T tokens, D model width, E FFN experts, F expert width, S router columns.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

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
OWN_ROUTER_FIELDS = ("kind", "num_experts", "top_k")
ROUTER_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RouterConfig) if f.name not in OWN_ROUTER_FIELDS
)

_init = jax.nn.initializers
_fan_in = _init.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)
_expert_init = _init.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)
# SwiGLU's [..., D, F, 2] (gate, up) weights: fan-in D.
_pair_fan_in = _init.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-3, out_axis=(-2, -1)
)
_pair_expert_init = _init.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-3, out_axis=(-2, -1), batch_axis=(0,)
)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of the layer: `init(key, shape, dtype)` and its logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    init: Callable
    axes: tuple[str | None, ...]


def validate(s) -> None:
    """Checks the layer's settings; raises `ValueError` naming the field and what is allowed."""
    check_choice("dispatch", s.dispatch, dispatch_lib.DISPATCH_KINDS)
    check_choice("activation", s.activation, experts_lib.ACTIVATIONS)
    check_choice("balance_loss_scope", s.balance_loss_scope, balance_lib.BALANCE_LOSS_SCOPES)
    if s.fine_grained < 1 or s.d_ff % s.fine_grained:
        raise ValueError(f"d_ff={s.d_ff} must be divisible by fine_grained={s.fine_grained} (>= 1)")
    if s.num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={s.num_shared_experts} must be >= 0")
    router_config(s)  # validates the router fields


def router_config(s) -> RouterConfig:
    """The `RouterConfig` of the layer's settings (experts counted after `fine_grained`)."""
    m = s.fine_grained
    return RouterConfig(
        kind=s.router,
        num_experts=s.num_experts * m,
        top_k=s.top_k * m,
        **{name: getattr(s, name) for name in ROUTER_FIELDS},
    )


def _ffn_specs(s, d_model: int, num: int, width: int, prefix: str, names) -> dict:
    lead = (num,) if names else ()
    name_in, name_out = experts_lib.param_names(s.activation)
    if s.activation == "swiglu":
        init = _pair_expert_init if names else _pair_fan_in
        w_in = ParamSpec(
            (*lead, d_model, width, 2), s.param_dtype, init, (*names, "embed", "mlp", None)
        )
    else:
        init = _expert_init if names else _fan_in
        w_in = ParamSpec((*lead, d_model, width), s.param_dtype, init, (*names, "embed", "mlp"))
    out_init = _expert_init if names else _fan_in
    w_out = ParamSpec((*lead, width, d_model), s.param_dtype, out_init, (*names, "mlp", "embed"))
    return {prefix + name_in: w_in, prefix + name_out: w_out}


def param_specs(s, d_model: int) -> dict[str, ParamSpec]:
    """The layer's parameters by name, in the order the Linen layer creates them."""
    cfg = router_config(s)
    n, f32 = cfg.num_selectable, jnp.float32
    specs = {"router": ParamSpec((d_model, n), f32, _fan_in, ("embed", None))}
    if s.gating_residual:
        specs["gating_residual"] = ParamSpec((n, n), f32, _init.zeros, (None, None))
    width = s.d_ff // s.fine_grained
    specs.update(_ffn_specs(s, d_model, cfg.num_experts, width, "", ("expert",)))
    if cfg.num_const_experts:
        c = cfg.num_const_experts
        specs["const_v"] = ParamSpec((c, d_model), f32, _init.normal(1.0), (None, "embed"))
        specs["const_gate"] = ParamSpec((c, d_model, 2), f32, _init.zeros, (None, "embed", None))
    if s.num_shared_experts:
        specs.update(_ffn_specs(s, d_model, 1, s.num_shared_experts * width, "shared_", ()))
    return specs


def bias_shape(s) -> tuple[int, ...] | None:
    """Shape of the router state (`router_state/bias`, [E]), or None for a router without it."""
    cfg = router_config(s)
    return (cfg.num_experts,) if cfg.record.selection_bias else None


def num_batch_shards(s) -> int:
    """Data-parallel shards of the tokens (micro-batches of the `micro_batch` loss)."""
    mesh = s.mesh if s.mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    return axis_size(mesh, batch_axes(mesh, s.data_axes, s.expert_axis))


def router_logits(s, params, x_TxD, prev_logits, cfg: RouterConfig, deterministic, make_rng):
    """fp32 router logits [T, S]: input jitter in training, the MoE++ gating residual."""
    x = x_TxD.astype(jnp.float32)
    if cfg.jitter_eps > 0 and not deterministic:
        lo, hi = 1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps
        x = x * jax.random.uniform(make_rng(), x.shape, jnp.float32, lo, hi)
    logits = x @ params["router"]
    if s.gating_residual and prev_logits is not None:
        prev = prev_logits.reshape(logits.shape).astype(jnp.float32)
        logits = logits + prev @ params["gating_residual"]
    return logits


def route_tokens(s, logits, cfg: RouterConfig, token_ids, bias, deterministic, make_rng):
    """The routing of every token (per token shard under expert parallelism when exact)."""
    rng = make_rng() if cfg.record.needs_rng(cfg, deterministic) else None
    if token_ids is not None:
        token_ids = token_ids.reshape(-1)
    call = dict(rng=rng, bias=bias, token_ids=token_ids, deterministic=deterministic)
    if s.expert_axis is not None:  # token-local routers run per token shard
        return ep_lib.route_sharded(
            logits, cfg, mesh=s.mesh, expert_axis=s.expert_axis, data_axes=s.data_axes, **call
        )
    return route(logits, cfg, **call)


def moved_bias(bias, routing: Routing, cfg: RouterConfig):
    """Aux-loss-free balancing (DeepSeek-V3, sec. 2.1.2) from this batch's loads, no gradient."""
    counts = jax.lax.stop_gradient(routing.counts(cfg.num_selectable))
    return balance_lib.global_bias_update(bias, counts, cfg.bias_update_gamma)


def expert_weights(s, params, prefix: str = "") -> dict:
    """The FFN weights named `prefix + w_*`, cast to the compute dtype, without the prefix."""
    names = experts_lib.param_names(s.activation)
    return {n: params[prefix + n].astype(s.dtype) for n in names}


def zero_computation(params, x_TxD, routing: Routing, cfg: RouterConfig):
    """MoE++ copy (E(x) = x) and constant (a1 x + a2 v) experts; zero experts add nothing."""
    first_copy = cfg.num_experts + cfg.num_zero_experts
    first_const = first_copy + cfg.num_copy_experts
    w = jnp.where(routing.mask, routing.weights, 0.0)
    ids = routing.expert_ids
    copy_w = jnp.sum(jnp.where((ids >= first_copy) & (ids < first_const), w, 0.0), -1)
    out = copy_w[:, None] * x_TxD.astype(jnp.float32)
    for j in range(cfg.num_const_experts):
        v, w_c = params["const_v"], params["const_gate"]
        wj = jnp.sum(jnp.where(ids == first_const + j, w, 0.0), -1)[:, None]
        a = jax.nn.softmax(x_TxD.astype(jnp.float32) @ w_c[j], axis=-1)
        out = out + wj * (a[:, :1] * x_TxD + a[:, 1:] * v[j])
    return out


def routed_experts(s, params, x_TxD, routing: Routing, cfg: RouterConfig):
    """The routed experts' output, the capacity-dropped fraction and expert-parallel aux."""
    e = cfg.num_experts
    weights = expert_weights(s, params)
    x = x_TxD.astype(s.dtype)
    impl = s.gmm_implementation
    if s.expert_axis is not None:
        return ep_lib.expert_parallel_ffn(
            weights,
            x,
            routing,
            cfg,
            mesh=s.mesh,
            expert_axis=s.expert_axis,
            data_axes=s.data_axes,
            tensor_axis=s.tensor_axis,
            dispatch=s.dispatch,
            activation=s.activation,
            buffer_factor=s.ep_buffer_factor,
            implementation=impl,
            a2a=s.ep_a2a,
        )
    if s.dispatch == "dropless":
        plan = dispatch_lib.dropless_plan(routing, e)
        inv_TxK = plan.inv_N.reshape(routing.expert_ids.shape)
        w_TxK = dispatch_lib.combine_weights(routing, e)
        y = experts_lib.dispatched_ffn(
            weights,
            x,
            plan.order_N,
            inv_TxK,
            plan.group_sizes_E,
            w_TxK,
            s.activation,
            implementation=impl,
        )
        return y.astype(x.dtype), jnp.float32(0.0), {}
    t, k = routing.expert_ids.shape
    cap = dispatch_lib.capacity(t, k, e, cfg.capacity_factor, cfg.min_capacity)
    buf, plan = dispatch_lib.capacity_dispatch(
        x, routing, e, cap, batch_priority=cfg.batch_priority
    )
    y = dispatch_lib.capacity_combine(
        experts_lib.batched_ffn(weights, buf, s.activation), plan, routing, e
    )
    return y, plan.dropped / jnp.maximum(plan.active, 1), {}


def layer_aux(s, routing: Routing, cfg: RouterConfig, logits, x_shape, dropped, ep_aux) -> dict:
    """The layer's `aux`: losses, routing statistics, the logits, expert-parallel aux."""
    return {
        "load_balance_loss": balance_lib.balance_loss(
            routing, s.balance_loss_scope, num_batch_shards(s)
        ),
        "z_loss": losses.z_loss(routing.logits),
        "entropy_loss": losses.dynamic_loss(routing),
        "dropped_fraction": jnp.asarray(dropped, jnp.float32),
        "router_logits": logits.reshape(*x_shape[:-1], cfg.num_selectable),
        **losses.routing_stats(routing, cfg.num_experts),
        **ep_aux,
    }


def forward(
    s,
    params: dict,
    x,
    *,
    bias=None,
    make_rng: Callable[[], jax.Array] | None = None,
    deterministic: bool = True,
    token_ids=None,
    prev_logits=None,
    update_bias: bool = False,
):
    """The MoE layer's forward pass.

    Args:
      s: the layer's settings (see the module docstring).
      params: the parameters `param_specs` names, as arrays.
      x: [..., D] inputs.
      bias: the router state ([E] selection bias) of a router with one, else None.
      make_rng: returns a fresh key of the `router` stream (jitter, noise, random routing);
        called only when the settings and mode need one.
      deterministic: evaluation mode.
      token_ids: int [...] token ids (`hash` router).
      prev_logits: [..., S] previous layer's router logits (MoE++ gating residual).
      update_bias: move the bias by aux-loss-free balancing (only in training).

    Returns:
      `(y, aux, bias)`: y of x's shape in `s.dtype`, aux as documented on `jmoe.layers.MoE`,
      and the (moved, when `update_bias` and not `deterministic`) bias.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have rank >= 2 ([..., D]), got shape {x.shape}")
    cfg = router_config(s)
    x_TxD = x.reshape(-1, x.shape[-1])
    logits = router_logits(s, params, x_TxD, prev_logits, cfg, deterministic, make_rng)
    routing = route_tokens(s, logits, cfg, token_ids, bias, deterministic, make_rng)
    if bias is not None and update_bias and not deterministic:
        bias = moved_bias(bias, routing, cfg)
    y, dropped, ep_aux = routed_experts(s, params, x_TxD, routing, cfg)
    y = y.astype(jnp.float32)
    if cfg.num_copy_experts or cfg.num_const_experts:
        y = y + zero_computation(params, x_TxD, routing, cfg)
    if s.num_shared_experts:
        shared = expert_weights(s, params, "shared_")
        y = y + experts_lib.dense_ffn(shared, x_TxD.astype(s.dtype), s.activation)
    aux = layer_aux(s, routing, cfg, logits, x.shape, dropped, ep_aux)
    return y.astype(s.dtype).reshape(x.shape), aux, bias
