"""python -m jmoe.train --config configs/lm_tiny.py --workdir runs/tiny [--config.x=y]"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_memory", True, "glibc keeps freed buffers (jmoe.runtime): no page faults per step."
)
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed",
    False,
    "Without JMOE_COORDINATOR_ADDRESS etc. (set by jmoe.launch), call "
    "jax.distributed.initialize() to auto-detect a TPU pod, SLURM or Open MPI job.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _KEEP_FREED.value:
        from jmoe import runtime

        runtime.keep_freed_memory()  # before JAX starts its backend
    from jmoe import distributed

    distributed.initialize_from_env(auto=_JAX_DISTRIBUTED.value)  # before any other JAX call
    from jmoe import models
    from jmoe.train import loop

    cfg = _CONFIG.value
    models.build(cfg)  # validates the model and MoE fields before any data is read.
    final = loop.train_and_evaluate(cfg, _WORKDIR.value)
    keys = ("heldout_loss", "heldout_accuracy", "unigram_entropy", "tokens_per_s")
    if distributed.is_primary():
        print(" ".join(f"{k}={float(final[k]):.4f}" for k in keys if k in final))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
