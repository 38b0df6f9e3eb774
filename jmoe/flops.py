"""Expert FLOPs per token: what a model's FFN experts actually computed, from its metrics.

A dynamic router (`top_p`, `null`, `moepp`, `expert_choice`) sends each token to a varying
number of FFN experts, so the compute of a layer is a measurement, not a config value. The
training loop logs, per MoE layer, `moe/layer_l/experts_per_token_mean` (FFN experts per token;
null and zero-computation experts cost nothing) and `moe/layer_l/dropped_fraction` (capacity
mode: selected slots that found no room and were not computed). This module turns them into
forward FLOPs per token, counting 2 FLOPs per multiply-add of the expert matmuls only (router,
attention, the MoE++ copy/constant experts' elementwise work and the activation are left out).
"""

from jmoe import experts as experts_lib
from jmoe.models import layer_specs, split

# Matmuls of one FFN: SwiGLU has gate, up and down projections; GELU has in and out.
_MATMULS = {"swiglu": 3, "gelu": 2}
assert set(_MATMULS) == set(experts_lib.ACTIVATIONS)


def ffn_flops(d_model: int, d_ff: int, activation: str = "swiglu") -> int:
    """Forward FLOPs of one FFN (one expert) on one token: 2 * matmuls * D * F.

    Raises:
      ValueError: for an activation not in `jmoe.experts.ACTIVATIONS`.
    """
    if activation not in _MATMULS:
        raise ValueError(f"activation={activation!r} is not one of {experts_lib.ACTIVATIONS}")
    return 2 * _MATMULS[activation] * d_model * d_ff


def expert_flops_per_token(config, metrics: dict) -> float:
    """Measured forward FLOPs per token of all FFN experts of a model (all MoE layers).

    Per MoE layer l: `experts_per_token_mean_l * (1 - dropped_fraction_l) * ffn_flops(D, F/m)`
    for the routed experts (m = `fine_grained`), plus `num_shared_experts * ffn_flops(D, F/m)`
    for the shared experts that run on every token.

    Args:
      config: an experiment config (as for `jmoe.models.build`).
      metrics: a metrics row with `moe/layer_l/experts_per_token_mean` for every MoE layer
        (and optionally `moe/layer_l/dropped_fraction`), e.g. the dict `train_and_evaluate`
        returns (its last held-out evaluation) or a row of `jmoe.train.metrics.read`.

    Raises:
      KeyError: naming the missing metric when a MoE layer has no `experts_per_token_mean`.
    """
    model, moe = split(config)
    width = moe.d_ff // moe.fine_grained
    per_expert = ffn_flops(model.d_model, width, moe.activation)
    total = 0.0
    for layer in sorted(layer_specs(model, moe)):
        key = f"moe/layer_{layer}/experts_per_token_mean"
        if key not in metrics:
            raise KeyError(f"{key} is not in the metrics (keys: {sorted(metrics)[:8]}...)")
        kept = 1.0 - float(metrics.get(f"moe/layer_{layer}/dropped_fraction", 0.0))
        routed = float(metrics[key]) * kept
        total += (routed + moe.num_shared_experts) * per_expert
    return total


def static_expert_flops_per_token(config) -> float:
    """The config's nominal expert FLOPs per token: `top_k` (per layer, after any DynaMoE
    schedule) FFN experts on every token plus the shared experts, nothing dropped."""
    model, moe = split(config)
    specs = layer_specs(model, moe)
    rows = {
        f"moe/layer_{layer}/experts_per_token_mean": k * moe.fine_grained
        for layer, (_, k) in specs.items()
    }
    return expert_flops_per_token(config, rows)


__all__ = ["expert_flops_per_token", "ffn_flops", "static_expert_flops_per_token"]
