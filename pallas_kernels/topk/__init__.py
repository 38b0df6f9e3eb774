"""Top-k along the last axis (routers' expert selection) with per-backend implementations."""

from pallas_kernels.topk.api import (
    CPU_FFI_MAX_K,
    IMPLEMENTATIONS,
    Implementation,
    resolve_implementation,
    top_k,
)

__all__ = [
    "CPU_FFI_MAX_K",
    "IMPLEMENTATIONS",
    "Implementation",
    "resolve_implementation",
    "top_k",
]
