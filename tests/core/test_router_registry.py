"""One home per router fact: a router added through the registry alone runs everywhere, the
layer's router fields are RouterConfig's, and router state lives in the layer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import models
from jmoe import routing as R
from jmoe.layers import MoE
from jmoe.layers.moe import ROUTER_FIELDS
from jmoe.models.config import MOE_LAYER_FIELDS, MoEConfig
from jmoe.routing.types import Routing
from jmoe.sharding import MeshConfig, make_mesh

KIND = "test_bottom_k"


def bottom_k(logits_TxS, cfg, *, rng=None):
    """A toy router: the K smallest logits, softmax over their negatives."""
    del rng
    neg, ids = jax.lax.top_k(-logits_TxS.astype(jnp.float32), cfg.top_k)
    w = jax.nn.softmax(neg, axis=-1)
    probs = jax.nn.softmax(logits_TxS.astype(jnp.float32), axis=-1)
    return Routing(ids.astype(jnp.int32), w, jnp.ones(ids.shape, bool), probs, logits_TxS)


@pytest.fixture
def new_router():
    R.register(R.RouterRecord(KIND, bottom_k))
    yield KIND
    R.unregister(KIND)


def _x(shape=(4, 16, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_new_router_runs_through_the_layer(new_router):
    layer = MoE(num_experts=8, top_k=2, d_ff=32, router=new_router)
    x = _x()
    v = jax.jit(layer.init)(jax.random.key(1), x)
    y, aux = jax.jit(layer.apply)(v, x)
    logits = aux["router_logits"].reshape(-1, 8)
    want = np.argsort(np.asarray(logits), axis=-1)[:, :2]
    got = np.asarray(R.route(logits, layer.router_config).expert_ids)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
    counts = np.bincount(want.ravel(), minlength=8)
    np.testing.assert_array_equal(np.asarray(aux["expert_counts"]), counts)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))


def test_new_router_trains_in_the_lm(new_router):
    from jmoe.train import step

    cfg = {
        "model": dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8),
        "moe": dict(num_experts=4, top_k=2, d_ff=16, router=new_router),
    }
    model = models.build(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    v = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens, deterministic=False)
        return jnp.mean(logits**2) + aux["load_balance_loss"]

    g = jax.jit(jax.grad(loss))(v["params"])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    batch = {"inputs": tokens, "targets": tokens}
    ev = jax.jit(step.make_eval_step(model))(v["params"], {}, batch, jax.random.key(2))
    hist = np.asarray(ev["moe/layer_0/experts_per_token_hist"])
    np.testing.assert_array_equal(hist, [0, 0, tokens.size])  # two experts for every token


def test_new_router_runs_under_expert_parallelism(new_router):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
    mesh = make_mesh(MeshConfig(data=2, expert=4), devices=jax.devices()[:8])
    kw = dict(num_experts=8, top_k=2, d_ff=32, router=new_router)
    x = _x()
    v = nn.meta.unbox(jax.jit(MoE(**kw).init)(jax.random.key(1), x))
    y0, aux0 = jax.jit(MoE(**kw).apply)(v, x)
    y1, aux1 = jax.jit(MoE(**kw, expert_axis="expert", mesh=mesh).apply)(v, x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux1["expert_counts"]), aux0["expert_counts"])


def test_registered_kind_is_validated_and_unregistered_kind_is_not_allowed(new_router):
    assert R.RouterConfig(kind=new_router).record.fn is bottom_k
    with pytest.raises(ValueError, match="already registered"):
        R.register(R.RouterRecord(new_router, bottom_k))
    with pytest.raises(ValueError, match="kind='nope' is not one of"):
        R.RouterConfig(kind="nope")


def test_layer_router_fields_are_router_config_fields():
    """The layer's router fields are generated from RouterConfig: same names, types and
    defaults, each passed through to `router_config`; MoEConfig carries them too."""
    cfg_fields = {f.name: f for f in dataclasses.fields(R.RouterConfig)}
    layer_fields = {f.name: f for f in dataclasses.fields(MoE)}
    assert set(ROUTER_FIELDS) == set(cfg_fields) - {"kind", "num_experts", "top_k"}
    for name in ROUTER_FIELDS:
        assert layer_fields[name].default == cfg_fields[name].default, name
        assert layer_fields[name].type == cfg_fields[name].type, name
        assert name in MOE_LAYER_FIELDS or name == "hash_vocab_size", name
    moe_cfg_fields = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    for name in set(ROUTER_FIELDS) - {"hash_vocab_size"}:
        assert moe_cfg_fields[name] == cfg_fields[name].default, name
    # Every field reaches the RouterConfig (values that differ from every default).
    values = dict(top_p=0.3, capacity_factor=2.5, min_capacity=3, batch_priority=True)
    values.update(normalize_weights=False, softmax_order="after", noise_std=0.1)
    values.update(jitter_eps=0.01, route_scale=2.0, bias_update_gamma=0.5, hash_seed=4)
    values.update(stochastic_eval="topk", hash_vocab_size=64)
    layer = MoE(num_experts=8, top_k=2, fine_grained=2, d_ff=32, **values)
    rc = layer.router_config
    assert (rc.num_experts, rc.top_k) == (16, 4)
    for name, value in values.items():
        assert getattr(rc, name) == value, name
    extra = MoE(router="moepp", num_zero_experts=1, num_copy_experts=2, num_const_experts=3)
    assert extra.router_config.num_selectable == 8 + 6
    grouped = MoE(router="sigmoid", num_experts=8, top_k=2, n_groups=4, topk_groups=2)
    assert (grouped.router_config.n_groups, grouped.router_config.topk_groups) == (4, 2)
    assert MoE(router="null", num_null_experts=3).router_config.num_extra == 3


def test_sigmoid_layer_router_state_modes():
    """Without `router_state`: a clear error. Read-only when not mutable; updated in training
    when mutable; never updated at evaluation."""
    layer = MoE(num_experts=4, top_k=2, d_ff=16, router="sigmoid", bias_update_gamma=0.1)
    x = _x((2, 8, 16))
    v = layer.init(jax.random.key(1), x)
    with pytest.raises(ValueError, match="keeps its selection bias in the 'router_state'"):
        layer.apply({"params": v["params"]}, x)
    y_ro, _ = layer.apply(v, x, deterministic=False)  # read-only: no error, no update
    (y_tr, aux), new = layer.apply(v, x, deterministic=False, mutable=["router_state"])
    np.testing.assert_array_equal(np.asarray(y_ro), np.asarray(y_tr))  # old bias used
    counts = np.asarray(aux["expert_counts"])
    np.testing.assert_allclose(
        new["router_state"]["bias"], 0.1 * np.sign(counts.mean() - counts), atol=1e-7
    )
    _, same = layer.apply(v, x, deterministic=True, mutable=["router_state"])
    np.testing.assert_array_equal(same["router_state"]["bias"], v["router_state"]["bias"])
