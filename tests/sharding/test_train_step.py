"""A sharded training step (jit with in/out shardings, donated state) on the 8-device mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe.layers import MoE
from jmoe.sharding import batch_sharding, global_bias_update, sharded_init
from tests.sharding._helpers import D, layer_kwargs, mesh_of


class Tiny(nn.Module):
    """Dense -> MoE (sigmoid router, bias updated from global loads) -> Dense regression."""

    moe: dict

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(
            D,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
        )(x)
        y, aux = MoE(**self.moe)(jax.nn.gelu(h))
        return nn.Dense(1)(h + y)[..., 0], aux


def _step_fn(model, opt):
    def step(state, batch):
        def loss_fn(params):
            pred, aux = model.apply(
                {"params": params, "router_state": state["router_state"]}, batch["x"]
            )
            mse = jnp.mean((pred - batch["y"]) ** 2)
            return mse + 0.01 * aux["load_balance_loss"], aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        bias = state["router_state"]["MoE_0"]["bias"]
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            # aux["expert_counts"] are global loads in the jit (global) view.
            "router_state": {
                "MoE_0": {"bias": global_bias_update(bias, aux["expert_counts"], 1e-2)}
            },
        }
        return new, loss

    return step


def _run(mesh, ep: bool, steps=3):
    kw = layer_kwargs(router="sigmoid")
    if ep:
        kw.update(expert_axis="expert", tensor_axis="tensor", mesh=mesh)
    model = Tiny(moe=kw)
    opt = optax.sgd(0.1, momentum=0.9)
    x = jax.random.normal(jax.random.key(0), (8, 8, D))
    y = jnp.sin(x.sum(-1))
    variables, shardings = sharded_init(model, mesh, jax.random.key(1), x)
    state = {
        "params": variables["params"],
        "opt_state": None,
        "router_state": variables["router_state"],
    }
    # Optimizer state: param-like leaves take their param's sharding, the rest is replicated.
    opt_sh = optax.tree_map_params(
        opt,
        lambda _, sh: sh,
        jax.eval_shape(opt.init, state["params"]),
        shardings["params"],
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    state["opt_state"] = jax.jit(opt.init, out_shardings=opt_sh)(state["params"])
    state_sh = {
        "params": shardings["params"],
        "opt_state": opt_sh,
        "router_state": shardings["router_state"],
    }
    bsh = batch_sharding(mesh, ("data", "fsdp", "expert"), 3)
    batch = {
        "x": jax.device_put(x, bsh),
        "y": jax.device_put(y, NamedSharding(mesh, P(bsh.spec[0], None))),
    }
    batch_sh = jax.tree.map(lambda a: a.sharding, batch)
    step = jax.jit(
        _step_fn(model, opt),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    losses = []
    for _ in range(steps):
        old = state["params"]["MoE_0"]["w_gate_in"]
        state, loss = step(state, batch)
        losses.append(float(loss))
    return state, losses, old


def test_sharded_train_step_matches_single_device():
    mesh = mesh_of(data=2, expert=2, tensor=2)
    state, losses, old = _run(mesh, ep=True)
    assert old.is_deleted()  # the state was donated
    w_in = state["params"]["MoE_0"]["w_gate_in"]
    assert w_in.sharding.spec == P("expert", "fsdp", "tensor", None)
    assert {s.data.shape for s in w_in.addressable_shards} == {(4, D, 16, 2)}
    assert losses[-1] < losses[0]
    single = mesh_of()  # one device, plain layer
    state1, losses1, _ = _run(single, ep=False)
    np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    bias = state["router_state"]["MoE_0"]["bias"]
    assert float(jnp.abs(bias).sum()) > 0  # moved by the aux-loss-free rule
