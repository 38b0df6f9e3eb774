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


def _apply(model, variables, x, **kw):
    """Jitted `model.apply` (eager applies compile every op separately: slow)."""
    mutable = kw.pop("mutable", False)
    fn = lambda v, x: model.apply(v, x, mutable=mutable, **kw)
    return jax.jit(fn)(variables, x)


def test_shapes_aux_and_layer_pattern():
    model, v = _init(_cfg(), _tokens())
    logits, aux = _apply(model, {"params": nn.unbox(v["params"])}, _tokens())
    assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
    assert set(aux["layers"]) == {"layer_1"}  # moe_every=2, moe_offset=1 of 3 layers.
    stats = aux["layers"]["layer_1"]
    assert stats["expert_load"].shape == (4,)
    assert float(stats["expert_counts"].sum()) == 2 * 12 * 2
    np.testing.assert_allclose(aux["load_balance_loss"], stats["load_balance_loss"])
    p = v["params"]["stack"]
    assert "w_in" in p["layer_1"]["ffn"] and p["layer_1"]["ffn"]["w_in"].value.shape == (4, 32, 32)
    assert p["layer_0"]["ffn"]["w_in"].value.shape == (32, 64)  # dense FFN.
    assert p["layer_0"]["attn"]["wk"].value.shape == (32, 2, 8)  # GQA: 2 kv heads.


def test_every_param_has_logical_names():
    for tie in (True, False):
        _, v = _init(_cfg({"tie_embeddings": tie}), _tokens())
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


def test_causal():
    model, v = _init(_cfg(), _tokens())
    params = nn.unbox(v["params"])
    a = _tokens()
    b = a.at[:, 8:].set((a[:, 8:] + 1) % 64)
    la, _ = _apply(model, {"params": params}, a)
    lb, _ = _apply(model, {"params": params}, b)
    np.testing.assert_allclose(la[:, :8], lb[:, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, 8:], lb[:, 8:])


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_kv_cache_decoding_matches_full_forward(kv_heads):
    model, v = _init(_cfg({"num_kv_heads": kv_heads}), _tokens())
    params = nn.unbox(v["params"])
    toks = _tokens(1, 10, seed=3)
    full, _ = _apply(model, {"params": params}, toks)
    cache = model.init_cache(1)
    (l0, _), upd = _apply(
        model, {"params": params, "cache": cache}, toks[:, :6], decode=True, mutable=["cache"]
    )
    outs = [l0]
    cache = upd["cache"]
    for i in range(6, 10):
        (li, _), upd = _apply(
            model,
            {"params": params, "cache": cache},
            toks[:, i : i + 1],
            decode=True,
            mutable=["cache"],
        )
        cache = upd["cache"]
        outs.append(li)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-4, atol=2e-4)


def test_bf16():
    model, v = _init(_cfg({"dtype": "bfloat16", "param_dtype": "bfloat16"}), _tokens())
    assert all(
        x.dtype == jnp.bfloat16
        for x in jax.tree.leaves(nn.unbox(v["params"]))
        if x.ndim > 1 and x.shape[-1] != 4
    )  # routers stay float32.
    logits, _ = _apply(model, {"params": nn.unbox(v["params"])}, _tokens())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_gating_residual_threads_previous_logits():
    cfg = _cfg(
        {"moe_every": 1, "moe_offset": 0},
        {"router": "moepp", "num_zero_experts": 1, "num_copy_experts": 1, "gating_residual": True},
    )
    model, v = _init(cfg, _tokens())
    params = nn.unbox(v["params"])
    base, _ = _apply(model, {"params": params}, _tokens())
    for layer, should_change in (("layer_0", False), ("layer_1", True)):
        p = jax.tree.map(lambda x: x, params)
        g = p["stack"][layer]["ffn"]["gating_residual"]
        p["stack"][layer]["ffn"]["gating_residual"] = g + 3.0 * jnp.eye(g.shape[0])
        out, _ = _apply(model, {"params": p}, _tokens())
        # Layer 0 has no previous MoE layer, so its gating weights must not matter.
        assert (not np.allclose(out, base)) == should_change, layer


def test_hash_router_uses_token_ids():
    cfg = _cfg({"moe_every": 1, "moe_offset": 0}, {"router": "hash", "top_k": 1})
    model, v = _init(cfg, _tokens())
    toks = jnp.full((2, 12), 5, jnp.int32)
    _, aux = _apply(model, {"params": nn.unbox(v["params"])}, toks)
    for stats in aux["layers"].values():
        assert int(jnp.max(stats["expert_counts"])) == 24  # every token to one expert.


def test_sigmoid_router_state_and_counts_tree():
    cfg = _cfg({}, {"router": "sigmoid"})
    model, v = _init(cfg, _tokens())
    _, aux = _apply(model, {"params": v["params"], "router_state": v["router_state"]}, _tokens())
    assert jax.tree.structure(aux["router_state_counts"]) == jax.tree.structure(v["router_state"])


def test_chain_of_experts_shares_experts_and_composes():
    moe = MoE(num_experts=4, top_k=2, d_ff=16)
    chain = ChainOfExperts(moe=moe, iterations=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    v = nn.unbox(chain.init(RNGS, x))
    p = v["params"]
    assert set(p) == {"experts", "iter_0", "iter_1", "iter_2"}
    assert set(p["iter_0"]) == {"router"} and "w_in" in p["experts"]
    assert not np.allclose(p["iter_0"]["router"], p["iter_1"]["router"])
    y, aux = jax.jit(chain.apply)(v, x)
    h = x
    for t in range(3):
        yt, _ = jax.jit(moe.apply)({"params": {**p["experts"], **p[f"iter_{t}"]}}, h)
        h = h + yt
    np.testing.assert_allclose(y, h - x, rtol=1e-5, atol=1e-5)
    assert len(aux["iterations"]) == 3
    assert float(aux["expert_counts"].sum()) == 3 * 10 * 2


def test_chain_in_model():
    cfg = _cfg({}, {"chain_iterations": 2, "router": "sigmoid"})
    model, v = _init(cfg, _tokens())
    assert set(v["params"]["stack"]["layer_1"]["ffn"]) == {"experts", "iter_0", "iter_1"}
    _, aux = _apply(model, {"params": v["params"], "router_state": v["router_state"]}, _tokens())
    assert jax.tree.structure(aux["router_state_counts"]) == jax.tree.structure(v["router_state"])


def test_schedule_sets_per_layer_experts():
    cfg = _cfg(
        {"num_layers": 4, "moe_every": 1, "moe_offset": 0},
        {"schedule": "descending", "schedule_budget": 16, "schedule_scale_top_k": True},
    )
    model, v = _init(cfg, _tokens())
    shapes = [v["params"]["stack"][f"layer_{i}"]["ffn"]["w_in"].value.shape[0] for i in range(4)]
    assert shapes == models.experts_per_layer("descending", 4, 16) == [6, 5, 3, 2]


def test_fine_grained_and_shared_experts():
    cfg = _cfg({}, {"fine_grained": 2, "num_shared_experts": 1})
    model, v = _init(cfg, _tokens())
    ffn = v["params"]["stack"]["layer_1"]["ffn"]
    assert ffn["w_in"].value.shape == (8, 32, 16)
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
