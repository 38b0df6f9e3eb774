"""Native CPU grouped matmul: ``cpu_kernel.cc`` through the XLA FFI (f32, multi-threaded).

The C++ source is compiled on first use (``pallas_kernels.native``). Where no compiler is
found or the build fails, ``available()`` is False, ``why_unavailable()`` says why, and the
CPU default falls back to the XLA loop (``pallas_kernels.gmm.xla``).

Other dtypes run in f32 (inputs upcast, output cast back): accumulation is f32 either way.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.native import NativeLibrary

_TARGETS = {"gmm": "jmoe_gmm_f32", "tgmm": "jmoe_tgmm_f32"}
_LIBRARY = NativeLibrary(
    "gmm implementation 'cpu_ffi'",
    pathlib.Path(__file__).with_name("cpu_kernel.cc"),
    {_TARGETS["gmm"]: "JmoeGmmF32", _TARGETS["tgmm"]: "JmoeTgmmF32"},
)
available = _LIBRARY.available
why_unavailable = _LIBRARY.why_unavailable


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None):
    """``out[m] = lhs[m] @ rhs[group(m)]``; see ``pallas_kernels.gmm.api.gmm``."""
    _LIBRARY.require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    call = jax.ffi.ffi_call(
        _TARGETS["gmm"],
        jax.ShapeDtypeStruct((lhs.shape[0], n), jnp.float32),
        vmap_method="sequential",
    )
    out = call(
        lhs.astype(jnp.float32),
        rhs.astype(jnp.float32),
        group_sizes.astype(jnp.int32),
        transpose_rhs=np.bool_(transpose_rhs),
    )
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, num_groups=None, preferred_element_type=None):
    """``out[g] = lhs[rows of g]^T @ dout[rows of g]``; see ``pallas_kernels.gmm.api.tgmm``."""
    _LIBRARY.require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    num_groups = num_groups or group_sizes.shape[0]
    call = jax.ffi.ffi_call(
        _TARGETS["tgmm"],
        jax.ShapeDtypeStruct((num_groups, lhs.shape[1], dout.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    out = call(lhs.astype(jnp.float32), dout.astype(jnp.float32), group_sizes.astype(jnp.int32))
    return out.astype(out_dtype)
