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
    init_params = state.params
    train_step = jax.jit(step.make_train_step(model, tx, cfg))
    losses = []
    for i in range(steps):
        state, m = train_step(state, ds[i], jax.random.fold_in(state.rng, i))
        losses.append(float(m["ce"]))
    assert np.all(np.isfinite(losses))
    # Every routed expert's weights were trained (each expert received tokens).
    for path, (w0, w1) in _expert_weights(init_params, state.params):
        moved = np.abs(np.asarray(w1) - np.asarray(w0)).reshape(w0.shape[0], -1).max(-1)
        assert np.all(moved > 0), (path, moved)
    return losses, state


def _expert_weights(p0, p1):
    flat0 = jax.tree_util.tree_flatten_with_path(p0)[0]
    flat1 = jax.tree.leaves(p1)
    return [
        (jax.tree_util.keystr(path), (a, b))
        for (path, a), b in zip(flat0, flat1, strict=True)
        if jax.tree_util.keystr(path).endswith("['w_gate_in']")
    ]


def lm_config(router: str) -> ConfigDict:
    c = base_config()
    c.model.update(
        vocab_size=256, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=32, moe_every=1
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


# Two schedules in the default run (compiling a 4-MoE-layer model costs ~5 s each); all six
# with `-m slow`. Every schedule's per-layer numbers are checked in test_schedules.py.
DEFAULT_SCHEDULES = ("descending", "wave")


@pytest.mark.parametrize(
    "schedule",
    [s if s in DEFAULT_SCHEDULES else pytest.param(s, marks=pytest.mark.slow) for s in SCHEDULES],
)
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
        dispatch="capacity",
        capacity_factor=2.0,
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
    e = [state.params["stack"][f"ffn_{i}"]["w_gate_in"].shape[0] for i in range(4)]
    assert e == models.experts_per_layer(schedule, 4, 16)
    first, last = losses[0], float(np.mean(losses[-5:]))
    print(f"{schedule}: experts {e} loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first, (schedule, first, last)
