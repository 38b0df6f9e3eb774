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

_TARGETS = {
    "gmm": "jmoe_gmm_f32",
    "tgmm": "jmoe_tgmm_f32",
    "gmm_rows": "jmoe_gmm_rows_f32",
    "tgmm_rows": "jmoe_tgmm_rows_f32",
}
_LIBRARY = NativeLibrary(
    "gmm implementation 'cpu_ffi'",
    pathlib.Path(__file__).with_name("cpu_kernel.cc"),
    {
        _TARGETS["gmm"]: "JmoeGmmF32",
        _TARGETS["tgmm"]: "JmoeTgmmF32",
        _TARGETS["gmm_rows"]: "JmoeGmmRowsF32",
        _TARGETS["tgmm_rows"]: "JmoeTgmmRowsF32",
    },
)
available = _LIBRARY.available
why_unavailable = _LIBRARY.why_unavailable


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None, lhs_rows=None):
    """``out[m] = lhs[m] @ rhs[group(m)]``; see ``pallas_kernels.gmm.api.gmm``.

    With ``lhs_rows`` (int32 ``[M]``), row m is ``lhs[lhs_rows[m]]``, gathered per work item.
    """
    _LIBRARY.require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    m = lhs.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    args = (lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes.astype(jnp.int32))
    out_type = jax.ShapeDtypeStruct((m, n), jnp.float32)
    rows = () if lhs_rows is None else (lhs_rows.astype(jnp.int32),)
    target = _TARGETS["gmm" if lhs_rows is None else "gmm_rows"]
    call = jax.ffi.ffi_call(target, out_type, vmap_method="sequential")
    return call(*args, *rows, transpose_rhs=np.bool_(transpose_rhs)).astype(out_dtype)


def tgmm(
    lhs,
    dout,
    group_sizes,
    *,
    num_groups=None,
    preferred_element_type=None,
    lhs_rows=None,
    dout_rows=None,
):
    """``out[g] = lhs[rows of g]^T @ dout[rows of g]``; see ``pallas_kernels.gmm.api.tgmm``.

    With ``lhs_rows`` (int32 ``[M]``), row m of lhs is ``lhs[lhs_rows[m]]``; with
    ``dout_rows``, row m of dout is ``dout[dout_rows[m]]``; both gathered per work item.
    """
    _LIBRARY.require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    num_groups = num_groups or group_sizes.shape[0]
    out_type = jax.ShapeDtypeStruct((num_groups, lhs.shape[1], dout.shape[1]), jnp.float32)
    args = (lhs.astype(jnp.float32), dout.astype(jnp.float32), group_sizes.astype(jnp.int32))
    if any(r is not None and r.shape[0] == 0 for r in (lhs_rows, dout_rows)):
        # M = 0 (the kernel reads an empty id array as "not gathered"): nothing to sum.
        return jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), out_dtype)
    if lhs_rows is None and dout_rows is None:
        out = jax.ffi.ffi_call(_TARGETS["tgmm"], out_type, vmap_method="sequential")(*args)
    else:  # an empty id array: that operand is not gathered
        ids = [
            jnp.zeros((0,), jnp.int32) if r is None else r.astype(jnp.int32)
            for r in (lhs_rows, dout_rows)
        ]
        call = jax.ffi.ffi_call(_TARGETS["tgmm_rows"], out_type, vmap_method="sequential")
        out = call(*args, *ids)
    return out.astype(out_dtype)
