"""Every router and every DynaMoE schedule trains: the loss falls (in-process, real data)."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from jmoe import models
from jmoe.models.schedules import SCHEDULES
from jmoe.routing import ROUTER_KINDS
from jmoe.train import data, optim, step
from jmoe.train.defaults import base_config

ROUTER_EXTRAS = {
    "null": {"num_null_experts": 2},
    "moepp": {
        "num_zero_experts": 1,
        "num_copy_experts": 1,
        "num_const_experts": 1,
        "gating_residual": True,
    },
    "top_p": {"entropy_loss_weight": 0.01, "top_k": 3},
    "expert_choice": {"capacity_factor": 1.0},
}


def _train(cfg: ConfigDict, steps: int) -> list[float]:
    ds, _, _ = data.make_data(cfg, cfg.seed)
    model = models.build(cfg)
    tx, _ = optim.make_optimizer(cfg)
    state = step.init_state(model, tx, ds[0], cfg.seed)
    train_step = jax.jit(step.make_train_step(model, tx, cfg))
    losses = []
    for i in range(steps):
        state, m = train_step(state, ds[i], jax.random.fold_in(state.rng, i))
        losses.append(float(m["ce"]))
    assert np.all(np.isfinite(losses))
    return losses, state


def lm_config(router: str) -> ConfigDict:
    c = base_config()
    c.model.update(
        vocab_size=256, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32, moe_every=1
    )
    c.moe.update(num_experts=4, top_k=2, d_ff=32, router=router)
    c.moe.update(**ROUTER_EXTRAS.get(router, {}))
    c.data.update(seq_len=32, batch_size=16, max_bytes=300_000)
    c.optim.update(lr=1e-2, warmup_steps=5)
    c.train.steps = 40
    return c


@pytest.mark.parametrize("router", ROUTER_KINDS)
def test_lm_trains_with_every_router(router):
    cfg = lm_config(router)
    losses, state = _train(cfg, cfg.train.steps)
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(f"{router}: loss {first:.3f} -> {last:.3f}")
    assert last < first - 1.0, (router, first, last)
    if router == "sigmoid":  # the aux-loss-free biases moved.
        biases = jax.tree.leaves(state.router_state)
        assert biases and any(float(np.abs(b).sum()) > 0 for b in biases)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_classifier_trains_with_every_schedule(schedule):
    c = base_config()
    c.model.update(
        kind="classifier",
        arch="mlp",
        input_dim=64,
        d_model=32,
        num_layers=4,
        moe_every=1,
        num_classes=10,
    )
    c.moe.update(
        num_experts=4,
        top_k=1,
        d_ff=32,
        schedule=schedule,
        schedule_min_experts=1,
        schedule_scale_top_k=True,
    )
    c.data.update(kind="digits", batch_size=64, heldout_percent=20)
    c.optim.update(lr=1e-2, warmup_steps=5)
    c.train.steps = 60
    losses, state = _train(c, c.train.steps)
    e = [state.params["stack"][f"ffn_{i}"]["w_in"].shape[0] for i in range(4)]
    assert e == models.experts_per_layer(schedule, 4, 16)
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(f"{schedule}: experts {e} loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first, (schedule, first, last)
