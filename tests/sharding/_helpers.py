"""Shared setup of the sharding tests: a small MoE layer, its inputs and a loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jmoe.sharding import MeshConfig, make_mesh

D, E, K, F = 16, 8, 2, 32
BATCH, SEQ = 4, 16  # T = 64 tokens: divisible by 8 shards


def require_8_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")


def mesh_of(data=1, expert=1, tensor=1, fsdp=1):
    require_8_devices()
    n = data * expert * tensor * fsdp
    cfg = MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    return make_mesh(cfg, devices=jax.devices()[:n])


def layer_kwargs(router="topk", dispatch="dropless", **extra):
    kw = dict(
        num_experts=E,
        top_k=K,
        d_ff=F,
        router=router,
        dispatch=dispatch,
        capacity_factor=1.0,
        num_null_experts=2 if router == "null" else 0,
    )
    kw.update(extra)
    return kw


def inputs(seed=0):
    return jax.random.normal(jax.random.key(seed), (BATCH, SEQ, D), jnp.float32)


def init_variables(model, x, router="topk"):
    v = nn.unbox(model.init(jax.random.key(1), x))
    if router == "sigmoid":  # a non-zero selection bias, so it matters
        v = {**v, "router_state": {"bias": 0.1 * jax.random.normal(jax.random.key(3), (E,))}}
    return v


def loss_and_grad(model, variables, x):
    """jit(value_and_grad) of mean(y^2) + aux losses, with (y, aux) and d/dx."""

    def loss(params, xx):
        y, aux = model.apply({**variables, "params": params}, xx)
        total = jnp.mean(y.astype(jnp.float32) ** 2) + aux["load_balance_loss"] + aux["z_loss"]
        return total, (y, aux)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (val, (y, aux)), grads = fn(variables["params"], x)
    return val, y, aux, grads
