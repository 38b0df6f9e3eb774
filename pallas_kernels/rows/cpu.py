"""Native CPU gradient of the dropless combine: ``cpu_kernel.cc`` through the XLA FFI (f32).

Built on first use (``pallas_kernels.native``).
"""

import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels.native import NativeLibrary

_TARGET = "jmoe_combine_grad_f32"
_LIBRARY = NativeLibrary(
    "combine_grad implementation 'cpu_ffi'",
    pathlib.Path(__file__).with_name("cpu_kernel.cc"),
    {_TARGET: "JmoeCombineGradF32"},
)
available = _LIBRARY.available
why_unavailable = _LIBRARY.why_unavailable


def combine_grad(ys_NxD, dy_TxD, token_N, weight_N):
    """See ``pallas_kernels.rows.reference.combine_grad``; f32 in, f32 out."""
    _LIBRARY.require()
    n, d = ys_NxD.shape
    call = jax.ffi.ffi_call(
        _TARGET,
        (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)),
        vmap_method="sequential",
    )
    return call(ys_NxD, dy_TxD, token_N.astype(jnp.int32), weight_N)
