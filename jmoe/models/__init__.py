"""Models: decoder-only MoE LM and MoE classifiers, built from a config.

`model = jmoe.models.build(config)`; `logits, aux = model.apply({'params': p}, inputs)`.
"""

import flax.linen as nn

from jmoe.models import schedules
from jmoe.models.blocks import layer_specs
from jmoe.models.classifier import Classifier
from jmoe.models.config import ModelConfig, MoEConfig, split
from jmoe.models.count import count_params
from jmoe.models.lm import TransformerLM
from jmoe.models.schedules import SCHEDULES, experts_per_layer, layer_plan


def build(config) -> nn.Module:
    """The model described by `config` (a ConfigDict/dict with `model` and `moe` fields, a
    `model` ConfigDict holding `moe`, or a `(ModelConfig, MoEConfig)` pair).

    Raises:
      ValueError / TypeError naming the field, for unknown fields or wrong types.
    """
    model, moe = split(config)
    if model.kind == "lm":
        return TransformerLM(model, moe)
    return Classifier(model, moe)


__all__ = [
    "SCHEDULES",
    "Classifier",
    "ModelConfig",
    "MoEConfig",
    "TransformerLM",
    "build",
    "count_params",
    "experts_per_layer",
    "layer_plan",
    "layer_specs",
    "schedules",
    "split",
]
