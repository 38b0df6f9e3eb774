"""jmoe for Flax NNX: the MoE layer as an `nnx.Module`, Linen <-> NNX conversion, the bridge.

Imported on demand (`import jmoe.nnx`); `import jmoe` does not load it.

- `MoE`: the MoE layer (same fields, result and numbers as `jmoe.layers.MoE`, one core).
- `RouterState`: the NNX variable type of the router's selection bias.
- `linen_variables` / `load_linen_variables`: parameters between the two forms.
- `bridge`: a Linen model (the LM of `jmoe.models`) as an initialised NNX module.
"""

from jmoe.nnx.convert import bridge, linen_variables, load_linen_variables
from jmoe.nnx.moe import FIELD_NAMES, LAYER_FIELDS, MoE, MoESettings, RouterState, settings

__all__ = [
    "FIELD_NAMES",
    "LAYER_FIELDS",
    "MoE",
    "MoESettings",
    "RouterState",
    "bridge",
    "linen_variables",
    "load_linen_variables",
    "settings",
]
