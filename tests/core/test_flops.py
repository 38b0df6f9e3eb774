"""jmoe.flops: expert FLOPs per token from a model's config and its logged metrics."""

import pytest

from jmoe import flops
from jmoe.train import configs


def test_ffn_flops():
    assert flops.ffn_flops(4, 8, "swiglu") == 2 * 3 * 4 * 8
    assert flops.ffn_flops(4, 8, "gelu") == 2 * 2 * 4 * 8
    with pytest.raises(ValueError, match="activation='relu'"):
        flops.ffn_flops(4, 8, "relu")


def test_measured_flops_follow_the_metrics():
    cfg = configs.load("digits_moe")  # 2 MoE layers, D=64, expert F=128, SwiGLU
    one = flops.ffn_flops(64, 128)
    metrics = {
        "moe/layer_0/experts_per_token_mean": 1.5,
        "moe/layer_1/experts_per_token_mean": 2.0,
        "moe/layer_1/dropped_fraction": 0.25,  # capacity mode: a quarter not computed
    }
    assert flops.expert_flops_per_token(cfg, metrics) == pytest.approx((1.5 + 1.5) * one)
    assert flops.static_expert_flops_per_token(cfg) == 2 * cfg.moe.top_k * one


def test_fine_grained_and_shared_experts():
    cfg = configs.load("digits_moe")
    cfg.moe.update(fine_grained=2, num_shared_experts=1, top_k=2)
    narrow = flops.ffn_flops(64, 64)  # each fine-grained expert is d_ff / 2 wide
    # 2 layers x (top_k * 2 fine-grained routed + 1 shared) experts of width 64.
    assert flops.static_expert_flops_per_token(cfg) == 2 * (4 + 1) * narrow
    metrics = {f"moe/layer_{i}/experts_per_token_mean": 3.0 for i in range(2)}
    assert flops.expert_flops_per_token(cfg, metrics) == 2 * (3 + 1) * narrow


def test_dynamoe_schedule_counts_each_layers_top_k():
    cfg = configs.load("lm_tiny")
    cfg.model.num_layers = 4
    cfg.moe.update(schedule="descending", schedule_budget=16, schedule_scale_top_k=True)
    from jmoe import models

    ks = [k for _, k in models.layer_specs(*models.split(cfg)).values()]
    one = flops.ffn_flops(cfg.model.d_model, cfg.moe.d_ff)
    assert flops.static_expert_flops_per_token(cfg) == sum(ks) * one


def test_missing_layer_metric_is_named():
    cfg = configs.load("digits_moe")
    with pytest.raises(KeyError, match="moe/layer_1/experts_per_token_mean"):
        flops.expert_flops_per_token(cfg, {"moe/layer_0/experts_per_token_mean": 2.0})
