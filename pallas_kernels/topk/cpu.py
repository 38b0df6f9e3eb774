"""Native CPU top-k: ``cpu_kernel.cc`` through the XLA FFI (f32 keys, one pass per row).

Built on first use (``pallas_kernels.native``). bf16 and f16 are upcast to f32, which keeps
their order exactly (the API keeps f64 on XLA's TopK).
"""

import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels.native import NativeLibrary

_TARGET = "jmoe_top_k_f32"
_LIBRARY = NativeLibrary(
    "top_k implementation 'cpu_ffi'",
    pathlib.Path(__file__).with_name("cpu_kernel.cc"),
    {_TARGET: "JmoeTopKF32"},
)
available = _LIBRARY.available
why_unavailable = _LIBRARY.why_unavailable


def top_k(operand, k: int):
    """See ``pallas_kernels.topk.reference.top_k``.

    The kernel picks the indices; the values are gathered from the operand, so they keep its
    dtype and the gradient flows to the selected entries, as through ``jax.lax.top_k``.
    """
    _LIBRARY.require()
    call = jax.ffi.ffi_call(
        _TARGET,
        jax.ShapeDtypeStruct((*operand.shape[:-1], k), jnp.int32),
        vmap_method="broadcast_all",
    )
    ids = call(jax.lax.stop_gradient(operand).astype(jnp.float32))
    return jnp.take_along_axis(operand, ids, axis=-1), ids
