"""Typed, validated model configuration built from an `ml_collections.ConfigDict` (or dict).

`ModelConfig.from_dict` / `MoEConfig.from_dict` fail fast on unknown fields and wrong types,
naming the offending field.
"""

import dataclasses
import types
import typing
from typing import Any

from jmoe.layers.moe import MoE
from jmoe.models.schedules import SCHEDULES

# `jmoe.layers.MoE` fields a config may set; the model sets the rest (dtypes, the hash
# vocabulary, the mesh) and `MoEConfig` is generated from these, so the two never drift.
_NOT_FROM_CONFIG = ("parent", "name", "dtype", "param_dtype", "mesh", "hash_vocab_size")
_LAYER_FIELDS = tuple(f for f in dataclasses.fields(MoE) if f.name not in _NOT_FROM_CONFIG)
MOE_LAYER_FIELDS = tuple(f.name for f in _LAYER_FIELDS)


def _config_type(typ):
    """The type a config value must have: a Literal's value type (the layer checks values)."""
    if typing.get_origin(typ) is typing.Literal:
        return type(typing.get_args(typ)[0])
    return typ


def _check_type(cls_name: str, name: str, value, typ) -> Any:
    if typ is Any:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is tuple or typing.get_origin(typ) is tuple:
        if not isinstance(value, tuple | list):
            raise TypeError(f"{cls_name}.{name} must be a tuple, got {value!r}")
        return tuple(value)
    if isinstance(typ, types.UnionType):
        return value
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise TypeError(
            f"{cls_name}.{name} must be {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


class _FromDict:
    @classmethod
    def from_dict(cls, d) -> Any:
        d = dict(d) if d is not None else {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k in d:
            if k not in fields:
                raise ValueError(
                    f"unknown field {cls.__name__}.{k!r}; known fields: {sorted(fields)}"
                )
        hints = typing.get_type_hints(cls)
        kw = {k: _check_type(cls.__name__, k, v, hints[k]) for k, v in d.items()}
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class _MoEOptions(_FromDict):
    """Depth-wise and training options of the MoE FFNs (the layer fields are added below).

    `schedule` (DynaMoE, see `jmoe.models.schedules`) spreads `schedule_budget` experts
    (0: num_experts per MoE layer) over the MoE layers; `chain_iterations` > 1 turns every
    MoE layer into a Chain-of-Experts layer; the `*_weight` fields weight the aux losses and
    the router's fields (e.g. `bias_update_gamma`) come from `jmoe.routing.RouterConfig`
    through the layer.
    """

    schedule: str = "uniform"
    schedule_budget: int = 0
    schedule_min_experts: int = 1
    schedule_scale_top_k: bool = False
    schedule_cycles: int = 2
    chain_iterations: int = 1
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    entropy_loss_weight: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"MoEConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.chain_iterations < 1:
            raise ValueError(f"MoEConfig.chain_iterations={self.chain_iterations} must be >= 1")

    def layer(self, **overrides) -> MoE:
        """A `jmoe.layers.MoE` with these settings (validated now); `name`/`parent` allowed."""
        kw = {f: getattr(self, f) for f in MOE_LAYER_FIELDS}
        kw.update(overrides)
        return MoE(**kw)


MoEConfig = dataclasses.make_dataclass(
    "MoEConfig",
    [(f.name, _config_type(f.type), dataclasses.field(default=f.default)) for f in _LAYER_FIELDS],
    bases=(_MoEOptions,),
    frozen=True,
    namespace={
        "__doc__": "MoE FFN settings: every `jmoe.layers.MoE` field a config may set, "
        "plus the depth-wise options of `_MoEOptions`.",
        "__module__": __name__,
    },
)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_FromDict):
    """Transformer / classifier shape.

    kind: `lm` (decoder-only LM) or `classifier`. MoE FFNs sit at the layers l with
    `l >= moe_offset and (l - moe_offset) % moe_every == 0` (`moe_every=0`: all dense).
    Classifier: `arch` `mlp` (vectors) or `vit` (images of `input_shape` [H, W] cut into
    `patch_size` patches), `num_classes` outputs.
    """

    kind: str = "lm"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (MHA); fewer: grouped-query attention.
    head_dim: int = 0  # 0: d_model // num_heads.
    d_ff: int = 512  # dense FFN width.
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    tie_embeddings: bool = True
    moe_every: int = 1
    moe_offset: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    arch: str = "mlp"
    input_dim: int = 64
    input_shape: tuple = (8, 8)
    patch_size: int = 2
    num_classes: int = 10

    def __post_init__(self):
        if self.kind not in ("lm", "classifier"):
            raise ValueError(f"ModelConfig.kind={self.kind!r} is not one of ('lm', 'classifier')")
        if self.arch not in ("mlp", "vit"):
            raise ValueError(f"ModelConfig.arch={self.arch!r} is not one of ('mlp', 'vit')")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16"):
                raise ValueError(f"ModelConfig.{f}={getattr(self, f)!r} must be float32/bfloat16")
        if self.num_heads < 1 or (self.head_dim == 0 and self.d_model % self.num_heads):
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must divide d_model={self.d_model}"
            )
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.moe_every > 0
            and layer >= self.moe_offset
            and (layer - self.moe_offset) % self.moe_every == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]


def split(config) -> tuple[ModelConfig, MoEConfig]:
    """(ModelConfig, MoEConfig) from a config with `model` and `moe` fields (or `model.moe`)."""
    if isinstance(config, tuple) and len(config) == 2:
        return config
    get = lambda c, k: c.get(k, None)
    if get(config, "model") is not None:
        model_d, moe_d = dict(config["model"]), get(config, "moe")
    else:
        model_d, moe_d = dict(config), None
    if "moe" in model_d:
        moe_d = model_d.pop("moe")
    return ModelConfig.from_dict(model_d), MoEConfig.from_dict(moe_d)
