"""Kernels behind the dropless row movers of ``jmoe.ops`` (the combine gradient)."""

from pallas_kernels.rows.api import (
    IMPLEMENTATIONS,
    Implementation,
    combine_grad,
    resolve_implementation,
)

__all__ = ["IMPLEMENTATIONS", "Implementation", "combine_grad", "resolve_implementation"]
