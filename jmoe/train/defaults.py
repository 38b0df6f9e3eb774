"""The base experiment config every file in `configs/` starts from.

Every field exists here with its type, so `--config.x=y` overrides are type-checked by
`ml_collections` and unknown fields fail fast; `jmoe.models.build` validates the model
and MoE fields again (naming the field).
"""

import dataclasses
import typing

import ml_collections

from jmoe.models.config import ModelConfig, MoEConfig


def _default(default, typ):
    """A None default of an optional str/int/float field becomes a typed placeholder, so the
    command line can set it (e.g. `--config.moe.expert_axis=expert`)."""
    if default is None:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and args[0] in (str, int, float):
            return ml_collections.config_dict.placeholder(args[0])
    return default


def _dataclass_dict(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _default(f.default, hints[f.name]) for f in dataclasses.fields(cls)}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _dataclass_dict(ModelConfig)
    c.model.input_shape = (8, 8)
    c.moe = _dataclass_dict(MoEConfig)
    c.data = dict(
        kind="text",  # text (LM on bytes) or digits (sklearn digits classification).
        path="",  # text: a file or directory of text files; "" = the Python stdlib sources.
        glob="*.py",  # files picked from `path` when it is a directory ("" with path: all files).
        max_bytes=0,  # cap on the training bytes read (0: no cap).
        heldout_percent=10,  # held-out split by file (text) or by example (digits).
        seq_len=128,
        batch_size=32,
        eval_batches=8,
        worker_count=0,
    )
    c.optim = dict(
        lr=3e-3,
        min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio.
        warmup_steps=50,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
    )
    # Device mesh over every device of every JAX process (jmoe.sharding.MeshConfig; one size
    # may be -1). Expert parallelism: --config.mesh.expert=N --config.moe.expert_axis=expert.
    c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    c.train = dict(
        steps=1000,
        log_every=50,
        eval_every=200,
        checkpoint_every=200,
        keep_checkpoints=3,
        stop_at_step=0,  # > 0: stop (after checkpointing) at this step; resume later.
        progress_bar=True,
        tensorboard=True,
    )
    c.lock()
    return c
