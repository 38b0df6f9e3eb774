"""`jmoe.nnx.MoE` on 8 simulated devices: expert parallelism equals one device, and the Flax
guides' sharding flow (`nnx.get_partition_spec`, `jax.jit` with shardings) works."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmoe
from jmoe import nnx as jnnx
from tests.sharding._helpers import D, E, init_variables, inputs, layer_kwargs, mesh_of


def _loss(m, x):
    y, aux = m(x)
    return jnp.mean(y**2) + aux["load_balance_loss"] + aux["z_loss"], (y, aux)


@nnx.jit
def _value_and_grad(m, x):
    return nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True)(m, x)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize(
    "router,dispatch",
    [("topk", "dropless"), pytest.param("sigmoid", "capacity", marks=pytest.mark.slow)],
)
def test_expert_parallel_nnx_layer_matches_single_device(router, dispatch):
    mesh = mesh_of(data=2, expert=4)
    kw = layer_kwargs(router, dispatch)
    x = inputs()
    v = init_variables(jmoe.MoE(**kw), x, router)
    one = jnnx.load_linen_variables(jnnx.MoE(D, rngs=nnx.Rngs(0), **kw), v)
    ep = jnnx.MoE(D, rngs=nnx.Rngs(0), **kw, expert_axis="expert", tensor_axis="tensor", mesh=mesh)
    jnnx.load_linen_variables(ep, v)
    (l0, (y0, aux0)), (g0, dx0) = _value_and_grad(one, x)
    (l1, (y1, aux1)), (g1, dx1) = _value_and_grad(ep, x)
    _close(y1, y0, "y")
    _close(l1, l0, "loss")
    for k in aux0:
        _close(aux1[k], aux0[k], f"aux[{k}]")
    assert float(aux1["ep_overflow_fraction"]) == 0.0
    g0, g1 = nnx.to_pure_dict(g0), nnx.to_pure_dict(g1)
    for k in g0:
        _close(g1[k], g0[k], f"d {k}")
    _close(dx1, dx0, "d x")


def test_sharded_init_as_the_flax_guides_show():
    """Built under a mesh: partition specs from the logical axes, placed by `jax.jit`."""
    mesh = mesh_of(data=2, expert=4)
    kw = dict(layer_kwargs("sigmoid"), expert_axis="expert")

    @nnx.jit
    def create():
        model = jnnx.MoE(D, rngs=nnx.Rngs(0), **kw)
        state = nnx.state(model)
        nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
        return model

    with jax.set_mesh(mesh):
        model = create()
        specs = nnx.get_partition_spec(nnx.state(model))
        assert specs["w_gate_in"].get_value() == P("expert", "fsdp", "tensor", None)
        assert specs["router"].get_value() == P("fsdp", None)
        assert specs["bias"].get_value() == P()
        w = model.w_gate_in.get_value()
        assert w.sharding.is_equivalent_to(NamedSharding(mesh, P("expert")), w.ndim)
        graphdef, state = nnx.split(model)
        shardings = nnx.get_named_sharding(state, mesh)
        state = jax.jit(lambda s: s, out_shardings=shardings)(state)
        y, aux = nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, state), inputs())
    assert y.shape == inputs().shape and bool(jnp.all(jnp.isfinite(y)))
    # The bridge under the same mesh: Linen boxes become placed NNX variables.
    with jax.set_mesh(mesh):
        bridged = nnx.bridge.ToNNX(jmoe.MoE(**layer_kwargs()), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, inputs())
    w = bridged.w_out.get_value()
    assert w.sharding.is_equivalent_to(NamedSharding(mesh, P("expert")), w.ndim)
    assert meta.unbox(jnnx.linen_variables(bridged))["params"]["w_out"].shape == (E, 32, D)
