"""The MoE transformer LM: shapes, sharding names, causality, KV cache, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import models
from jmoe.layers import MoE
from jmoe.layers.chain import ChainOfExperts

MODEL = dict(
    vocab_size=64,
    d_model=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    d_ff=64,
    max_len=24,
    moe_every=2,
    moe_offset=1,
)
MOE = dict(num_experts=4, top_k=2, d_ff=32)
RNGS = {"params": jax.random.PRNGKey(0), "router": jax.random.PRNGKey(1)}


def _cfg(model=None, moe=None):
    return {"model": {**MODEL, **(model or {})}, "moe": {**MOE, **(moe or {})}}


def _tokens(b=2, length=12, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, length), 0, MODEL["vocab_size"])


def _init(cfg, tokens):
    model = models.build(cfg)
    return model, jax.jit(model.init)(RNGS, tokens)


def _shapes(cfg, tokens=None):
    """Abstract variables (boxed, with logical names): tracing only, no compilation."""
    model = models.build(cfg)
    return jax.eval_shape(model.init, RNGS, _tokens() if tokens is None else tokens)


def _jit_apply(model, **kw):
    """A jitted `model.apply` to reuse within a test (eager applies are slow)."""
    return jax.jit(lambda v, x: model.apply(v, x, **kw))


def _apply(model, variables, x, **kw):
    return _jit_apply(model, **kw)(variables, x)


@pytest.fixture(scope="module")
def base():
    model, v = _init(_cfg(), _tokens())
    return model, nn.unbox(v["params"]), _jit_apply(model)


def test_shapes_aux_and_layer_pattern(base):
    model, params, apply = base
    logits, aux = apply({"params": params}, _tokens())
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert set(aux["layers"]) == {"layer_1"}  # moe_every=2, moe_offset=1 of 3 layers.
    stats = aux["layers"]["layer_1"]
    assert stats["expert_load"].shape == (4,)
    assert float(stats["expert_counts"].sum()) == 2 * 12 * 2
    np.testing.assert_allclose(aux["load_balance_loss"], stats["load_balance_loss"])
    p = params["stack"]
    assert p["layer_1"]["ffn"]["w_gate_in"].shape == (4, 32, 32, 2)
    assert p["layer_0"]["ffn"]["w_in"].shape == (32, 64)  # dense FFN.
    assert p["layer_0"]["attn"]["wk"].shape == (32, 2, 8)  # GQA: 2 kv heads.


def test_causal(base):
    model, params, apply = base
    a = _tokens()
    b = a.at[:, 8:].set((a[:, 8:] + 1) % 64)
    la, _ = apply({"params": params}, a)
    lb, _ = apply({"params": params}, b)
    np.testing.assert_allclose(la[:, :8], lb[:, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, 8:], lb[:, 8:])


def test_every_param_has_logical_names():
    for tie in (True, False):
        v = _shapes(_cfg({"tie_embeddings": tie}))
        leaves = jax.tree_util.tree_flatten_with_path(
            v["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )[0]
        assert leaves
        for path, leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), path
            assert len(leaf.names) == leaf.value.ndim, path
        names = {n for _, leaf in leaves for n in leaf.names}
        assert {"vocab", "embed", "heads", "kv_heads", "kv", "mlp", "expert"} <= names
        assert ("unembed" in v["params"]) == (not tie)


def test_kv_cache_decoding_matches_full_forward(base):
    model, params, apply = base
    toks = _tokens(1, 10, seed=3)
    full, _ = apply({"params": params}, toks)
    decode = _jit_apply(model, decode=True, mutable=["cache"])
    (l0, _), upd = decode({"params": params, "cache": model.init_cache(1)}, toks[:, :6])
    outs, cache = [l0], upd["cache"]
    for i in range(6, 10):
        (li, _), upd = decode({"params": params, "cache": cache}, toks[:, i : i + 1])
        cache = upd["cache"]
        outs.append(li)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-4, atol=2e-4)


def test_bf16():
    cfg = _cfg({"dtype": "bfloat16", "param_dtype": "bfloat16", "num_layers": 2})
    v = _shapes(cfg)
    for path, x in jax.tree_util.tree_flatten_with_path(nn.unbox(v["params"]))[0]:
        want = jnp.float32 if "router" in str(path) else jnp.bfloat16
        assert x.dtype == want, path
    model, v = _init(cfg, _tokens())
    logits, _ = _apply(model, {"params": nn.unbox(v["params"])}, _tokens())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_gating_residual_threads_previous_logits():
    cfg = _cfg(
        {"moe_every": 1, "moe_offset": 0, "num_layers": 2},
        {"router": "moepp", "num_zero_experts": 1, "num_copy_experts": 1, "gating_residual": True},
    )
    model, v = _init(cfg, _tokens())
    params = nn.unbox(v["params"])
    apply = _jit_apply(model)
    base_out, _ = apply({"params": params}, _tokens())
    for layer, should_change in (("layer_0", False), ("layer_1", True)):
        p = jax.tree.map(lambda x: x, params)
        g = p["stack"][layer]["ffn"]["gating_residual"]
        p["stack"][layer]["ffn"]["gating_residual"] = g + 3.0 * jnp.eye(g.shape[0])
        out, _ = apply({"params": p}, _tokens())
        # Layer 0 has no previous MoE layer, so its gating weights must not matter.
        assert (not np.allclose(out, base_out)) == should_change, layer


def test_hash_router_uses_token_ids():
    cfg = _cfg({"moe_every": 1, "moe_offset": 0, "num_layers": 2}, {"router": "hash", "top_k": 1})
    model, v = _init(cfg, _tokens())
    toks = jnp.full((2, 12), 5, jnp.int32)
    _, aux = _apply(model, {"params": nn.unbox(v["params"])}, toks)
    for stats in aux["layers"].values():
        assert int(jnp.max(stats["expert_counts"])) == 24  # every token to one expert.


@pytest.mark.parametrize("chain", [1, 2])
def test_sigmoid_router_state_is_updated_by_the_layers(chain):
    """Training with mutable router_state moves every layer's (and iteration's) bias by the
    aux-loss-free rule from its own loads; without `mutable` the bias is read unchanged."""
    gamma = 0.01
    moe = {"router": "sigmoid", "chain_iterations": chain, "bias_update_gamma": gamma}
    cfg = _cfg({"num_layers": 2, "moe_offset": 0, "moe_every": 1}, moe)
    tokens = _tokens()
    model, v = _init(cfg, tokens)
    v = nn.meta.unbox(v)
    (_, aux), new = model.apply(
        v, tokens, deterministic=False, rngs={"router": RNGS["router"]}, mutable=["router_state"]
    )
    assert jax.tree.structure(new["router_state"]) == jax.tree.structure(v["router_state"])
    layers = new["router_state"]["stack"]
    assert set(layers) == {"layer_0", "layer_1"}
    for name, state in layers.items():
        old = v["router_state"]["stack"][name]["ffn"]
        if chain == 1:
            counts = np.asarray(aux["layers"][name]["expert_counts"])
            want = gamma * np.sign(counts.mean() - counts)
            np.testing.assert_allclose(state["ffn"]["bias"] - old["bias"], want, atol=1e-7)
        else:
            assert set(state["ffn"]) == {f"iter_{t}" for t in range(chain)}
            for t in range(chain):
                moved = np.abs(state["ffn"][f"iter_{t}"]["bias"] - old[f"iter_{t}"]["bias"])
                assert np.all((moved < 1e-7) | (np.abs(moved - gamma) < 1e-7)) and moved.max() > 0
    logits_ro, _ = model.apply(v, tokens, deterministic=True)
    logits_new, _ = model.apply({**v, **new}, tokens, deterministic=True)
    assert not np.allclose(logits_ro, logits_new)  # the moved bias changes the selection
    if chain > 1:
        assert set(v["params"]["stack"]["layer_1"]["ffn"]) == {"experts", "iter_0", "iter_1"}


def test_router_state_missing_is_a_clear_error():
    cfg = _cfg(None, {"router": "sigmoid"})
    model, v = _init(cfg, _tokens())
    with pytest.raises(ValueError, match="keeps its selection bias in the 'router_state'"):
        model.apply({"params": v["params"]}, _tokens())


def test_chain_of_experts_shares_experts_and_composes():
    moe = MoE(num_experts=4, top_k=2, d_ff=16)
    chain = ChainOfExperts(moe=moe, iterations=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    v = nn.unbox(jax.jit(chain.init)(RNGS, x))
    p = v["params"]
    assert set(p) == {"experts", "iter_0", "iter_1", "iter_2"}
    assert set(p["iter_0"]) == {"router"} and "w_gate_in" in p["experts"]
    assert not np.allclose(p["iter_0"]["router"], p["iter_1"]["router"])
    y, aux = jax.jit(chain.apply)(v, x)
    h, moe_apply = x, jax.jit(moe.apply)
    for t in range(3):
        yt, _ = moe_apply({"params": {**p["experts"], **p[f"iter_{t}"]}}, h)
        h = h + yt
    np.testing.assert_allclose(y, h - x, rtol=1e-5, atol=1e-5)
    assert len(aux["iterations"]) == 3
    assert float(aux["expert_counts"].sum()) == 3 * 10 * 2


def test_schedule_sets_per_layer_experts():
    cfg = _cfg(
        {"num_layers": 4, "moe_every": 1, "moe_offset": 0},
        {"schedule": "descending", "schedule_budget": 16, "schedule_scale_top_k": True},
    )
    v = _shapes(cfg)
    shapes = [
        v["params"]["stack"][f"layer_{i}"]["ffn"]["w_gate_in"].value.shape[0] for i in range(4)
    ]
    assert shapes == models.experts_per_layer("descending", 4, 16) == [6, 5, 3, 2]


def test_fine_grained_and_shared_experts():
    cfg = _cfg({}, {"fine_grained": 2, "num_shared_experts": 1})
    model, v = models.build(cfg), _shapes(cfg)
    ffn = v["params"]["stack"]["layer_1"]["ffn"]
    assert ffn["w_gate_in"].value.shape == (8, 32, 16, 2)
    counts = models.count_params(model, cfg)
    expert = 3 * 8 * 32 * 16
    assert counts["expert"] == expert and counts["total"] - counts["active"] == expert // 2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_expertz"):
        models.build(_cfg({}, {"num_expertz": 3}))
    with pytest.raises(TypeError, match="ModelConfig.d_model"):
        models.build(_cfg({"d_model": "big"}))
    with pytest.raises(ValueError, match="schedule"):
        models.build(_cfg({}, {"schedule": "zigzag"}))
    with pytest.raises(ValueError, match="num_kv_heads"):
        models.build(_cfg({"num_kv_heads": 3}))


def test_classifier_vit_and_mlp():
    for arch, x in (("mlp", jnp.ones((3, 64))), ("vit", jnp.ones((3, 8, 8)))):
        cfg = _cfg({"kind": "classifier", "arch": arch, "num_layers": 2, "moe_offset": 0})
        model = models.build(cfg)
        v = jax.jit(model.init)(RNGS, x)
        logits, aux = _apply(model, v, x)
        assert logits.shape == (3, 10) and aux["layers"]


def test_import_jmoe_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, jmoe, jmoe.models, jmoe.train, jmoe.train.defaults; "
        "heavy = [m for m in ('grain', 'matplotlib', 'orbax', 'tensorboardX') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
