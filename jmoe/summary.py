"""Prints total and active parameter counts of a config, from abstract shapes only.

python -m jmoe.summary --config configs/mixtral_8x7b.py [--config.moe.num_experts=16]
"""

from absl import app, flags
from ml_collections import config_flags

from jmoe import models


def summarize(config) -> dict[str, int]:
    return models.count_params(models.build(config), config)


def main(argv):
    del argv
    config = flags.FLAGS.config
    counts = summarize(config)
    m, moe = models.split(config)
    specs = models.layer_specs(m, moe)
    print(f"layers: {m.num_layers}  MoE layers: {len(specs)}  d_model: {m.d_model}")
    if specs:
        print("experts/top-k per MoE layer:", sorted(set(specs.values())))
    for k in ("total", "active", "expert", "embedding"):
        print(f"{k:>10}: {counts[k]:>16,d}  ({counts[k] / 1e9:.3f}B)")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module is side-effect free.
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
