"""The MoE layer against a dense reference (every expert on every token), forward and grads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import MoE, experts, route
from jmoe import dispatch as D
from jmoe.routing import RouterConfig

T, DM, F, E = 24, 16, 32, 4
ROUTER_KW = {
    "topk": dict(top_k=2),
    "sigmoid": dict(top_k=2, route_scale=1.5),
    "expert_choice": dict(top_k=1, capacity_factor=1.0),
    "top_p": dict(top_k=3, top_p=0.6),
    "null": dict(top_k=2, num_null_experts=2),
    "moepp": dict(top_k=2, num_zero_experts=1, num_copy_experts=1, num_const_experts=1),
    "hash": dict(top_k=2),
    "stochastic": dict(top_k=1, stochastic_eval="topk"),
}


def _x(seed=0, shape=(2, T // 2, DM)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _dense_weights(routing, num_experts):
    w = jnp.where(routing.active(num_experts), routing.weights, 0.0)
    ids = jnp.where(routing.active(num_experts), routing.expert_ids, 0)
    t = ids.shape[0]
    return jnp.zeros((t, num_experts)).at[jnp.arange(t)[:, None], ids].add(w)


def _reference_apply(layer: MoE, params, x, token_ids):
    """The dense oracle built from the pure functions (no dispatch, no grouped GEMM)."""
    cfg = layer.router_config
    x_TxD = x.reshape(-1, x.shape[-1])
    routing = route(x_TxD @ params["router"], cfg, token_ids=token_ids.reshape(-1))
    ex = {k: params[k] for k in ("w_gate_in", "w_in", "w_out") if k in params}
    y = experts.dense_reference(ex, x_TxD, _dense_weights(routing, cfg.num_experts), "swiglu")
    if cfg.kind == "moepp":  # copy expert id E+1, constant expert id E+2.
        w = jnp.where(routing.mask, routing.weights, 0.0)
        w_copy = jnp.sum(jnp.where(routing.expert_ids == E + 1, w, 0.0), -1)[:, None]
        w_const = jnp.sum(jnp.where(routing.expert_ids == E + 2, w, 0.0), -1)[:, None]
        a = jax.nn.softmax(x_TxD @ params["const_gate"][0], -1)
        y = y + w_copy * x_TxD + w_const * (a[:, :1] * x_TxD + a[:, 1:] * params["const_v"][0])
    return y.reshape(x.shape)


def _init(layer, x, token_ids):
    v = layer.init({"params": jax.random.PRNGKey(1)}, x, token_ids=token_ids)
    params = nn.meta.unbox(v["params"])
    if "const_gate" in params:  # make the constant expert's gate non-trivial.
        params["const_gate"] = jax.random.normal(jax.random.PRNGKey(5), params["const_gate"].shape)
    return params, {k: val for k, val in v.items() if k != "params"}


@pytest.mark.parametrize("router", sorted(ROUTER_KW))
def test_dropless_matches_dense_reference(router):
    _check_dropless_against_reference(router, F)


@pytest.mark.parametrize("router", ["topk", "null", "top_p"])
def test_dropless_narrow_experts_match_dense_reference(router):
    """d_ff < d_model: the output projection's backward runs fused with the combine
    (`jmoe.ops.matmul_combine`) where the grouped GEMM gathers rows itself (native CPU)."""
    _check_dropless_against_reference(router, DM // 2)


def _check_dropless_against_reference(router, d_ff):
    layer = MoE(num_experts=E, d_ff=d_ff, router=router, **ROUTER_KW[router])
    x = _x()
    tok = jnp.arange(T).reshape(2, T // 2) * 7 % 256
    params, state = _init(layer, x, tok)
    g = jax.random.normal(jax.random.PRNGKey(9), x.shape)

    def loss_layer(p, x):
        y, _ = layer.apply({"params": p, **state}, x, token_ids=tok)
        return jnp.sum(y * g)

    def loss_ref(p, x):
        return jnp.sum(_reference_apply(layer, p, x, tok) * g)

    y, aux = layer.apply({"params": params, **state}, x, token_ids=tok)
    np.testing.assert_allclose(y, _reference_apply(layer, params, x, tok), atol=1e-5, rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    gl = jax.grad(loss_layer, argnums=(0, 1))(params, x)
    gr = jax.grad(loss_ref, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(gl), jax.tree.leaves(gr), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(gl[0]["router"]).sum()) > 0 or router in ("hash", "stochastic")


@pytest.mark.parametrize("router", ["topk", "top_p", "null", "sigmoid"])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_capacity_with_room_equals_dropless(router, batch_priority):
    kw = dict(num_experts=E, d_ff=F, router=router, **ROUTER_KW[router])
    x = _x(3)
    dropless = MoE(**kw)
    big = MoE(**kw, dispatch="capacity", capacity_factor=float(E), batch_priority=batch_priority)
    params, state = _init(dropless, x, None)
    f = lambda m, p, x: m.apply({"params": p, **state}, x)
    y0, a0 = f(dropless, params, x)
    y1, a1 = f(big, params, x)
    np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
    assert float(a1["dropped_fraction"]) == 0.0
    g0 = jax.grad(lambda p: jnp.sum(f(dropless, p, x)[0] ** 2))(params)
    g1 = jax.grad(lambda p: jnp.sum(f(big, p, x)[0] ** 2))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_small_capacity_drops_exactly_the_overflow(batch_priority):
    t, k, e, cap = 40, 2, 4, 7
    cfg = RouterConfig(num_experts=e, top_k=k)
    x = _x(4, (t, DM))
    logits = jax.random.normal(jax.random.PRNGKey(2), (t, e)) * 3
    routing = route(logits, cfg)
    buf, plan = D.capacity_dispatch(x, routing, e, cap, batch_priority=batch_priority)
    ids = np.asarray(routing.expert_ids)
    counts = np.bincount(ids.ravel(), minlength=e)
    assert int(plan.dropped) == int(np.maximum(counts - cap, 0).sum()) > 0
    # Which slots survive: the first `cap` per expert in token order, or by top weight.
    top_w = np.asarray(routing.weights).max(-1)
    kept = np.zeros((t, k), bool)
    for ex in range(e):
        slots = [(i, j) for i in range(t) for j in range(k) if ids[i, j] == ex]
        if batch_priority:
            slots = sorted(slots, key=lambda s: -top_w[s[0]])
        for i, j in slots[:cap]:
            kept[i, j] = True
    np.testing.assert_array_equal(np.asarray(plan.pos_TxK) < cap, kept)
    y = D.capacity_combine(buf, plan, routing, e)  # identity experts: y = sum of kept weights * x
    w_kept = np.where(kept, np.asarray(routing.weights), 0.0).sum(-1)
    np.testing.assert_allclose(y, np.asarray(x) * w_kept[:, None], atol=1e-6)


def test_layer_reports_dropped_fraction():
    layer = MoE(num_experts=E, top_k=2, d_ff=F, dispatch="capacity", capacity_factor=0.25)
    x = _x(5)
    params, _ = _init(layer, x, None)
    _, aux = layer.apply({"params": params}, x)
    cap = D.capacity(T, 2, E, 0.25)
    counts = np.asarray(aux["expert_counts"])
    expected = np.maximum(counts - cap, 0).sum() / (T * 2)
    np.testing.assert_allclose(float(aux["dropped_fraction"]), expected, rtol=1e-6)
    assert expected > 0


def test_fine_grained_and_shared_experts_shapes_and_active_params():
    layer = MoE(num_experts=4, top_k=1, d_ff=32, fine_grained=4, num_shared_experts=2)
    x = _x(6)
    params, _ = _init(layer, x, None)
    assert params["w_gate_in"].shape == (16, DM, 8, 2)
    assert params["shared_w_gate_in"].shape == (DM, 16, 2)  # 2 shared experts of width 32 / 4
    y, aux = layer.apply({"params": params}, x)
    assert y.shape == x.shape
    assert float(aux["experts_per_token_mean"]) == 4.0


def test_bf16_end_to_end():
    layer = MoE(num_experts=E, top_k=2, d_ff=F, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = _x(7).astype(jnp.bfloat16)
    v = layer.init(jax.random.PRNGKey(0), x)
    y, aux = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16 and aux["router_logits"].dtype == jnp.float32
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0].astype(jnp.float32)))(
        v["params"]
    )
    assert all(
        bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
        for leaf in jax.tree.leaves(nn.meta.unbox(g))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=9), "top_k=9 > number of selectable experts=8"),
        (dict(router="nope"), "kind='nope' is not one of"),
        (dict(dispatch="magic"), "dispatch='magic' is not one of"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0 must be > 0"),
        (dict(d_ff=30, fine_grained=4), "d_ff=30 must be divisible by fine_grained=4"),
        (dict(router="null", num_null_experts=-2), "num_null_experts=-2 must be >= 0"),
        (dict(router="top_p", top_p=2.0), r"top_p=2.0 must be in \(0, 1\]"),
        (dict(activation="relu"), "activation='relu' is not one of"),
    ],
)
def test_bad_layer_config_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(**{"num_experts": 8, "d_ff": 32, **kwargs})


def test_wrong_input_rank_raises():
    with pytest.raises(ValueError, match="x must have rank >= 2"):
        MoE(num_experts=4, d_ff=8).init(jax.random.PRNGKey(0), jnp.zeros((16,)))
