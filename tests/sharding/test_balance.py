"""Global- vs micro-batch balance loss and aux-loss-free bias updates over replicas."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jmoe import losses
from jmoe.layers import MoE
from jmoe.routing import RouterConfig, aux_free_bias_update, route
from jmoe.sharding import balance_loss, global_balance_loss, global_bias_update
from tests.sharding._helpers import D, E, K, init_variables, inputs, layer_kwargs, mesh_of


def test_layer_micro_batch_scope_is_mean_of_per_shard_losses():
    mesh = mesh_of(data=2, expert=4)  # 8 token shards of 8 tokens
    x = inputs()
    ref = MoE(**layer_kwargs())
    v = init_variables(ref, x)
    micro = MoE(**layer_kwargs(), expert_axis="expert", mesh=mesh, balance_loss_scope="micro_batch")
    _, aux_micro = jax.jit(micro.apply)(v, x)
    shard_loss = jax.jit(jax.vmap(lambda xs: ref.apply(v, xs)[1]["load_balance_loss"]))
    per_shard = np.asarray(shard_loss(x.reshape(8, 8, D)))
    np.testing.assert_allclose(float(aux_micro["load_balance_loss"]), np.mean(per_shard), rtol=1e-6)
    full = float(jax.jit(ref.apply)(v, x)[1]["load_balance_loss"])
    # (global_batch, the default, equals `full`: see test_expert_parallel.)
    assert abs(np.mean(per_shard) - full) > 1e-4  # the two scopes really differ here


def test_global_balance_loss_in_shard_map_equals_global_view():
    mesh = mesh_of(data=8)
    logits = jax.random.normal(jax.random.key(0), (64, E)) + jnp.linspace(0, 2, E)
    cfg = RouterConfig(num_experts=E, top_k=K)

    def global_view(lg):
        return losses.load_balance_loss(route(lg, cfg))

    def sharded(lg):
        fn = jax.shard_map(
            lambda l_: global_balance_loss(route(l_, cfg), "data"),
            mesh=mesh,
            in_specs=P("data", None),
            out_specs=P(),
        )
        return fn(lg)

    v0, g0 = jax.value_and_grad(global_view)(logits)
    v1, g1 = jax.jit(jax.value_and_grad(sharded))(logits)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)
    # The micro-batch loss of the same shards is different.
    assert abs(float(balance_loss(route(logits, cfg), "micro_batch", 8)) - float(v0)) > 1e-4


def test_bias_update_from_global_loads():
    mesh = mesh_of(data=8)
    logits = jax.random.normal(jax.random.key(1), (64, E)) + jnp.linspace(0, 3, E)
    cfg = RouterConfig(kind="sigmoid", num_experts=E, top_k=K)
    bias = jnp.zeros((E,))
    counts = route(logits, cfg, bias=bias).counts(E)
    expected = aux_free_bias_update(bias, counts, 1e-2)

    def local(lg, b):
        c = route(lg, cfg, bias=b).counts(E)
        return global_bias_update(b, c, 1e-2, axis_names="data")[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data", None), P()), out_specs=P("data"))
    per_replica = jax.jit(fn)(logits, bias)  # one row per replica: all must agree
    np.testing.assert_allclose(per_replica, jnp.broadcast_to(expected, per_replica.shape))
    # Local-only loads would give a different update on some replica.
    local_only = jax.shard_map(
        lambda lg, b: aux_free_bias_update(b, route(lg, cfg, bias=b).counts(E), 1e-2)[None],
        mesh=mesh,
        in_specs=(P("data", None), P()),
        out_specs=P("data"),
    )(logits, bias)
    assert not np.allclose(local_only, per_replica)
    # In the global view, the layer's expert_counts are the global loads.
    layer = MoE(**layer_kwargs(router="sigmoid"), expert_axis="expert", mesh=mesh_of(2, 4))
    x = inputs()
    v = init_variables(MoE(**layer_kwargs(router="sigmoid")), x, "sigmoid")
    _, aux = jax.jit(layer.apply)(v, x)
    assert float(jnp.sum(aux["expert_counts"])) == x.shape[0] * x.shape[1] * K
