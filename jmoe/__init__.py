"""jmoe: Mixture-of-Experts for JAX. Import stays light: no data, plotting or checkpointing."""

from jmoe import dispatch, experts, layers, losses, ops, routing
from jmoe.layers import MoE
from jmoe.routing import RouterConfig, Routing, route

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "RouterConfig",
    "Routing",
    "dispatch",
    "experts",
    "layers",
    "losses",
    "ops",
    "route",
    "routing",
]
