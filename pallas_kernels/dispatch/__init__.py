"""Capacity-constrained, index-based dispatch/combine (no [T, E, C] one-hot)."""

from pallas_kernels.dispatch.api import (
    IMPLEMENTATIONS,
    Implementation,
    combine,
    dispatch,
    dropped_count,
    positions,
    resolve_implementation,
    stable_order,
)

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "combine",
    "dispatch",
    "dropped_count",
    "positions",
    "resolve_implementation",
    "stable_order",
]
