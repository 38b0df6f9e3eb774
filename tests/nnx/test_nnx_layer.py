"""`jmoe.nnx.MoE` against the Linen `jmoe.MoE`: same fields, same parameters, same numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import meta

import jmoe
from jmoe import nnx as jnnx
from tests.core.test_layer import DM, E, F, T
from tests.core.test_layer import ROUTER_KW as LAYER_KW

# Every router (the Linen layer tests' settings; MoE++ with its gating residual here);
# `stochastic` evaluates by top-k so both layers route the same tokens.
ROUTER_KW = {**LAYER_KW, "moepp": {**LAYER_KW["moepp"], "gating_residual": True}}
TOK = jnp.arange(T).reshape(2, T // 2) * 7 % 256
EXTRA = {"topk": dict(num_shared_experts=1, fine_grained=2)}  # shared and fine-grained experts


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, T // 2, DM), jnp.float32)


def _pair(router, dispatch="dropless", **extra):
    """A Linen layer with its variables and the NNX layer loaded with them."""
    kw = dict(num_experts=E, d_ff=F, router=router, dispatch=dispatch, capacity_factor=1.0)
    kw.update(ROUTER_KW[router], **EXTRA.get(router, {}), **extra)
    linen = jmoe.MoE(**kw)
    v = jax.tree.map(jnp.asarray, meta.unbox(linen.init(jax.random.key(1), _x(), token_ids=TOK)))
    params = dict(v["params"])
    for name in ("const_gate", "gating_residual", "router"):  # non-trivial MoE++ gates
        if name in params and not float(jnp.abs(params[name]).sum()):
            params[name] = 0.3 * jax.random.normal(jax.random.key(5), params[name].shape)
    if "router_state" in v:  # a non-zero selection bias, so it matters
        v["router_state"] = {"bias": 0.1 * jax.random.normal(jax.random.key(3), (E,))}
    v = {**v, "params": params}
    model = jnnx.MoE(DM, rngs=nnx.Rngs(0), **kw)
    return linen, v, jnnx.load_linen_variables(model, v)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=what)


def _loss(y, aux):
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))) + aux["load_balance_loss"]


def _cases():
    """Every router x both dispatch modes; capacity runs by default for three routers."""
    for router in sorted(ROUTER_KW):
        for dispatch in ("dropless", "capacity"):
            fast = dispatch == "dropless" or router in ("topk", "sigmoid", "expert_choice")
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param(router, dispatch, id=f"{router}-{dispatch}", marks=marks)


@pytest.mark.parametrize("router,dispatch", list(_cases()))
def test_nnx_layer_equals_linen_forward_and_gradients(router, dispatch):
    linen, v, model = _pair(router, dispatch)
    x, tok = _x(2), TOK
    prev = jax.random.normal(jax.random.key(4), (2, T // 2, linen.router_config.num_selectable))

    def linen_loss(params, x):
        y, aux = linen.apply({**v, "params": params}, x, token_ids=tok, prev_logits=prev)
        return _loss(y, aux), (y, aux)

    def nnx_loss(m, x):
        y, aux = m(x, token_ids=tok, prev_logits=prev)
        return _loss(y, aux), (y, aux)

    (l0, (y0, aux0)), g0 = jax.jit(jax.value_and_grad(linen_loss, (0, 1), has_aux=True))(
        v["params"], x
    )
    (l1, (y1, aux1)), g1 = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))(
        model, x
    )
    _close(y1, y0, "y")
    _close(l1, l0, "loss")
    assert set(aux1) == set(aux0)
    for k in aux0:
        _close(aux1[k], aux0[k], f"aux[{k}]")
    grads1 = nnx.to_pure_dict(g1[0])
    assert set(grads1) == set(g0[0])
    for k in g0[0]:
        _close(grads1[k], g0[0][k], f"d {k}")
    _close(g1[1], g0[1], "d x")


def test_training_moves_router_state_as_linen_does():
    linen, v, model = _pair("sigmoid", bias_update_gamma=0.1)
    x = _x(6)
    (y0, _), new = linen.apply(v, x, deterministic=False, mutable=["router_state"])
    y_eval, _ = model(x)  # evaluation (the default): the bias stays
    _close(model.bias[...], v["router_state"]["bias"], "bias after evaluation")
    model.train()
    y1, _ = model(x)
    _close(y1, y0, "y in training")
    _close(model.bias[...], new["router_state"]["bias"], "moved bias")
    assert not np.allclose(model.bias[...], v["router_state"]["bias"])
    model.eval()
    assert model.deterministic


def test_fields_come_from_the_linen_layer():
    """The NNX layer's fields are the Linen layer's (names, types, defaults): they cannot
    drift, and each one reaches the settings and the RouterConfig."""
    linen_fields = {f.name: f for f in dataclasses.fields(jmoe.MoE)}
    del linen_fields["parent"], linen_fields["name"]
    nnx_fields = {f.name: f for f in dataclasses.fields(jnnx.MoESettings)}
    assert list(nnx_fields) == list(linen_fields) == list(jnnx.FIELD_NAMES)
    for name, f in linen_fields.items():
        assert (nnx_fields[name].type, nnx_fields[name].default) == (f.type, f.default), name
    kw = dict(num_experts=8, top_k=2, fine_grained=2, d_ff=32, top_p=0.3, noise_std=0.1)
    model = jnnx.MoE(DM, rngs=nnx.Rngs(0), **kw)
    assert model.config.router_config == jmoe.MoE(**kw).router_config
    assert set(jnnx.MoE.__init__.__signature__.parameters) >= set(linen_fields)


def test_bad_settings_raise_value_errors_naming_the_field():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="dispatch='sorted' is not one of"):
        jnnx.MoE(DM, rngs=rngs, dispatch="sorted")
    with pytest.raises(ValueError, match="kind='nope' is not one of"):
        jnnx.MoE(DM, rngs=rngs, router="nope")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_expert'\].*num_experts"):
        jnnx.MoE(DM, rngs=rngs, num_expert=4)
    with pytest.raises(ValueError, match="d_model=0 must be"):
        jnnx.MoE(0, rngs=rngs)
    model = jnnx.MoE(DM, rngs=rngs, num_experts=E, d_ff=F)
    with pytest.raises(ValueError, match=r"x must have shape \[..., d_model=16\]"):
        model(jnp.ones((2, 8)))


def test_parameters_convert_both_ways():
    linen, v, model = _pair("sigmoid")
    back = jnnx.linen_variables(model)
    assert jax.tree.structure(back) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v), strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = jnnx.MoE(
        DM, rngs=nnx.Rngs(7), **{f: getattr(model.config, f) for f in jnnx.FIELD_NAMES}
    )
    y0, _ = linen.apply(jnnx.linen_variables(fresh), _x())
    y1, _ = fresh(_x())
    _close(y1, y0, "an NNX-initialised layer through Linen")
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        jnnx.load_linen_variables(model, {"params": v["params"]})


def test_linen_layer_through_nnx_bridge_out_of_the_box():
    """`nnx.bridge.ToNNX(jmoe.MoE(...))` with no global flag and no mesh: lazy_init, the
    Linen numbers, a RouterState bias moved with mutable=["router_state"]."""
    linen = jmoe.MoE(num_experts=E, top_k=2, d_ff=F, router="sigmoid", bias_update_gamma=0.1)
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, _x())
    assert isinstance(model.bias, jnnx.RouterState)
    v = jnnx.linen_variables(model)
    (y0, _), new = linen.apply(v, _x(1), deterministic=False, mutable=["router_state"])
    y1, _ = model(_x(1), deterministic=False, mutable=["router_state"])
    _close(y1, y0, "y")
    _close(model.bias[...], new["router_state"]["bias"], "bias")
    assert nnx.get_partition_spec(nnx.state(model))["w_out"].get_value() == jax.P(
        "expert", "tensor", "fsdp"
    )


def test_router_randomness_draws_from_the_router_stream():
    x = _x()
    kw = dict(num_experts=E, top_k=1, d_ff=F, router="stochastic")
    model = jnnx.MoE(DM, rngs=nnx.Rngs(params=0, router=1), **kw)
    draws = [np.asarray(model(x)[1]["expert_counts"]) for _ in range(2)]
    assert not np.array_equal(*draws)  # each call draws afresh
    key = jax.random.key(3)
    _close(model(x, rngs=key)[0], model(x, rngs=key)[0], "the same key, the same routing")
    without = jnnx.MoE(DM, rngs=nnx.Rngs(params=0), **kw)
    with pytest.raises(ValueError, match="rngs=nnx.Rngs\\(params=..., router=...\\)"):
        without(x)
