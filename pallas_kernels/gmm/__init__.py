"""Grouped matmul (megablox-style): ``gmm`` and ``tgmm`` with per-backend implementations."""

from pallas_kernels.gmm.api import (
    IMPLEMENTATIONS,
    Implementation,
    gathers_rows,
    gmm,
    resolve_implementation,
    tgmm,
)

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "gathers_rows",
    "gmm",
    "resolve_implementation",
    "tgmm",
]
