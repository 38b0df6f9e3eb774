"""Expert-parallel MoE on 8 simulated CPU devices equals the single-device layer."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.layers import MoE
from jmoe.sharding import expert_parallel_ffn
from tests.sharding._helpers import (
    E,
    K,
    init_variables,
    inputs,
    layer_kwargs,
    loss_and_grad,
    mesh_of,
)

MESHES = {"8x1": (8, 1, 1), "2x4": (2, 4, 1), "1x8": (1, 8, 1), "2x2x2t": (2, 2, 2)}
ROUTERS = ("topk", "sigmoid", "null")
DISPATCHES = ("dropless", "capacity")
# Default run: top-k on every mesh, sigmoid and null on 2x4; every other case is `slow`.
FAST = {("topk", d, m) for d in DISPATCHES for m in MESHES} | {
    (r, d, "2x4") for r in ("sigmoid", "null") for d in DISPATCHES
}


def _cases():
    for r, d, m in itertools.product(ROUTERS, DISPATCHES, MESHES):
        marks = () if (r, d, m) in FAST else (pytest.mark.slow,)
        yield pytest.param(r, d, m, id=f"{r}-{d}-{m}", marks=marks)


@functools.cache
def _reference(router, dispatch):
    x = inputs()
    model = MoE(**layer_kwargs(router, dispatch))
    v = init_variables(model, x, router)
    return x, v, loss_and_grad(model, v, x)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("router,dispatch,mesh_name", list(_cases()))
def test_matches_single_device(router, dispatch, mesh_name):
    data, expert, tensor = MESHES[mesh_name]
    mesh = mesh_of(data=data, expert=expert, tensor=tensor)
    x, v, (val0, y0, aux0, g0) = _reference(router, dispatch)
    model = MoE(
        **layer_kwargs(router, dispatch),
        expert_axis="expert",
        tensor_axis="tensor",
        mesh=mesh,
    )
    val1, y1, aux1, g1 = loss_and_grad(model, v, x)
    _close(y1, y0, "output")
    _close(val1, val0, "loss")
    for key in aux0:
        _close(aux1[key], aux0[key], f"aux[{key}]")
    assert float(aux1["ep_overflow_fraction"]) == 0.0  # exact buffers never overflow
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1), strict=True
    ):
        _close(b, a, f"grad {jax.tree_util.keystr(path)}")
    if dispatch == "capacity":
        assert float(aux0["dropped_fraction"]) > 0 or router == "null"  # drops are exercised


@pytest.mark.parametrize(
    "mesh_name",
    [pytest.param(m, marks=() if m == "2x4" else (pytest.mark.slow,)) for m in MESHES],
)
@pytest.mark.parametrize("router", ["topk", pytest.param("null", marks=pytest.mark.slow)])
def test_ragged_exchange_matches_single_device(router, mesh_name):
    """The ragged all-to-all path (emulated on XLA:CPU, which lacks ragged-all-to-all)."""
    data, expert, tensor = MESHES[mesh_name]
    mesh = mesh_of(data=data, expert=expert, tensor=tensor)
    x, v, (val0, y0, aux0, g0) = _reference(router, "dropless")
    model = MoE(
        **layer_kwargs(router),
        expert_axis="expert",
        tensor_axis="tensor",
        mesh=mesh,
        ep_a2a="ragged_emulated",
    )
    val1, y1, aux1, g1 = loss_and_grad(model, v, x)
    _close(y1, y0, "output")
    _close(val1, val0, "loss")
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        _close(b, a, "grad")
    assert float(aux1["ep_overflow_fraction"]) == 0.0
    # Only the active rows move: 2 * (active slots) * D * 4 bytes, per device on average.
    active = float(jnp.sum(aux0["expert_counts"][:E]))
    np.testing.assert_allclose(
        float(aux1["ep_a2a_bytes"]), 2 * active * x.shape[-1] * 4 / (data * expert), rtol=1e-6
    )


def test_set_mesh_context_and_fsdp():
    """The mesh can come from `jax.set_mesh`; an fsdp axis also splits the tokens."""
    mesh = mesh_of(fsdp=2, expert=4)
    x, v, (val0, y0, aux0, g0) = _reference("topk", "dropless")
    model = MoE(**layer_kwargs(), expert_axis="expert")
    with jax.set_mesh(mesh):
        val1, y1, aux1, g1 = loss_and_grad(model, v, x)
    _close(y1, y0, "output")
    _close(val1, val0, "loss")
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        _close(b, a, "grad")


@pytest.mark.parametrize(
    "dispatch,a2a",
    [("dropless", "padded"), ("dropless", "ragged_emulated"), ("capacity", "padded")],
)
def test_bounded_buffers_report_overflow(dispatch, a2a):
    """A small all-to-all bound drops slots, and says so; the exact bound never does."""
    mesh = mesh_of(expert=8)
    x = inputs()
    # Skewed routing: every token's first choice is expert 0.
    logits = jax.random.normal(jax.random.key(5), (x.shape[0] * x.shape[1], E))
    logits = logits.at[:, 0].add(10.0)
    from jmoe.routing import RouterConfig, route

    routing = route(logits, RouterConfig(num_experts=E, top_k=K))
    model = MoE(**layer_kwargs(dispatch=dispatch, capacity_factor=4.0))
    params = init_variables(model, x)["params"]
    params = {k: v for k, v in params.items() if k.startswith("w_")}
    x_td = x.reshape(-1, x.shape[-1])
    cfg = RouterConfig(num_experts=E, top_k=K, capacity_factor=4.0)
    run = functools.partial(expert_parallel_ffn, mesh=mesh, dispatch=dispatch)
    y_exact, _, aux_exact = jax.jit(lambda p, xx: run(p, xx, routing, cfg))(params, x_td)
    y_small, _, aux_small = jax.jit(lambda p, xx: run(p, xx, routing, cfg, buffer_factor=0.5))(
        params, x_td
    )
    assert float(aux_exact["ep_overflow_fraction"]) == 0.0
    over = float(aux_small["ep_overflow_fraction"])
    assert 0.0 < over < 1.0
    assert int(aux_small["ep_buffer_rows"]) < int(aux_exact["ep_buffer_rows"])
    # Rows that were dropped change the output; the fraction of changed tokens is consistent.
    changed = np.mean(np.abs(np.asarray(y_small - y_exact)).max(-1) > 1e-6)
    assert changed > 0


def test_errors():
    mesh = mesh_of(expert=8)
    x = jnp.ones((3, 5, 16))  # 15 tokens: not divisible by 8 shards
    model = MoE(**layer_kwargs(), expert_axis="expert", mesh=mesh)
    v = init_variables(MoE(**layer_kwargs()), x)
    with pytest.raises(ValueError, match="cannot be split"):
        model.apply(v, x)
    bad = MoE(**layer_kwargs(num_experts=4), expert_axis="expert", mesh=mesh)
    with pytest.raises(ValueError, match="divisible"):
        bad.init(jax.random.key(0), inputs())
    nomesh = MoE(**layer_kwargs(), expert_axis="expert")
    with pytest.raises(ValueError, match="needs a mesh"):
        nomesh.apply(v, inputs())
    wrong = MoE(**layer_kwargs(), expert_axis="experts", mesh=mesh)
    with pytest.raises(ValueError, match="not a mesh axis"):
        wrong.apply(v, inputs())


@pytest.mark.gpu
@pytest.mark.skipif(
    jax.default_backend() not in ("gpu", "tpu"), reason="XLA:CPU has no ragged-all-to-all"
)
def test_real_ragged_all_to_all_on_accelerators():
    from jmoe.sharding import MeshConfig, make_mesh

    n = jax.device_count()
    expert = max(p for p in (1, 2, 4, 8) if n % p == 0)
    mesh = make_mesh(MeshConfig(data=-1, expert=expert))
    x, v, (val0, y0, aux0, g0) = _reference("topk", "dropless")
    model = MoE(**layer_kwargs(), expert_axis="expert", mesh=mesh, ep_a2a="ragged")
    val1, y1, aux1, g1 = loss_and_grad(model, v, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize(
    "router,extra",
    [
        ("top_p", {}),
        ("moepp", dict(num_zero_experts=1, num_copy_experts=1, num_const_experts=1)),
        ("expert_choice", {}),
        ("hash", {}),
        ("stochastic", dict(stochastic_eval="topk")),
    ],
)
def test_other_routers_forward(router, extra, dispatch):
    mesh = mesh_of(data=2, expert=4)
    x = inputs()
    tok = jax.random.randint(jax.random.key(9), x.shape[:2], 0, 256)
    kw = layer_kwargs(router, dispatch, **extra)
    ref = MoE(**kw)
    v = init_variables(ref, x) if router != "hash" else None
    if v is None:
        import flax.linen as nn

        v = nn.unbox(ref.init(jax.random.key(1), x, token_ids=tok))
    run = lambda m: jax.jit(lambda vv, xx: m.apply(vv, xx, token_ids=tok))(v, x)
    y0, a0 = run(ref)
    y1, a1 = run(MoE(**kw, expert_axis="expert", mesh=mesh))
    _close(y1, y0, "output")
    for key in a0:
        _close(a1[key], a0[key], f"aux[{key}]")


@pytest.mark.slow
def test_capacity_batch_priority():
    """V-MoE batch-prioritised positions are global, so the same slots are dropped."""
    x = inputs()
    kw = layer_kwargs("topk", "capacity", batch_priority=True)
    ref = MoE(**kw)
    v = init_variables(ref, x)
    val0, y0, aux0, g0 = loss_and_grad(ref, v, x)
    val1, y1, aux1, g1 = loss_and_grad(
        MoE(**kw, expert_axis="expert", mesh=mesh_of(data=2, expert=4)), v, x
    )
    assert float(aux0["dropped_fraction"]) > 0
    _close(y1, y0, "output")
    _close(aux1["dropped_fraction"], aux0["dropped_fraction"], "dropped")
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        _close(b, a, "grad")
