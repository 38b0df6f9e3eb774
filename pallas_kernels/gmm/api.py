"""Public grouped-matmul API: implementation registry, argument checks and the custom VJP."""

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import cpu, reference, xla
from pallas_kernels.registry import Impl, Op, native_cpu

Implementation = Literal[
    "reference", "xla", "cpu_ffi", "ragged_dot", "triton", "mosaic_gpu", "mosaic_tpu"
]
_GPU = ("gpu", "cuda")
# One record per implementation; `gmm` and `tgmm` run the same one.
OP = Op(
    "gmm",
    (
        Impl("reference", reference),
        Impl("xla", xla),
        native_cpu(cpu, gathers_rows=True),
        Impl("ragged_dot", "pallas_kernels.gmm.ragged_dot"),
        Impl("triton", "pallas_kernels.gmm.gpu", (*_GPU, "rocm"), interpretable=True),
        # Runs its Hopper kernel where it applies and the Triton kernel elsewhere.
        Impl("mosaic_gpu", "pallas_kernels.gmm.mosaic_gpu", _GPU, interpretable=True),
        Impl("mosaic_tpu", "pallas_kernels.gmm.tpu", ("tpu",), interpretable=True),
    ),
    {
        "cpu": ("cpu_ffi", "xla"),
        "gpu": ("mosaic_gpu", "triton", "xla"),
        "cuda": ("mosaic_gpu", "triton", "xla"),
        "rocm": ("triton", "xla"),
        "tpu": ("mosaic_tpu", "xla"),
        "*": ("xla",),
    },
)
IMPLEMENTATIONS: tuple[str, ...] = OP.names


resolve_implementation = OP.resolve  # (implementation, *, interpret=False) -> name


def _check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, lhs_rows=None):
    _check_rows(lhs_rows)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [G, K, N], got shape {rhs.shape}")
    _check_group_sizes(group_sizes, rhs.shape[0])
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(
            f"rhs contraction dim {k_rhs} != lhs K={lhs.shape[1]} (transpose_rhs={transpose_rhs})"
        )


def _check_group_sizes(group_sizes, num_groups=None):
    if group_sizes.ndim != 1 or group_sizes.shape[0] != (num_groups or group_sizes.shape[0]):
        want = "[G]" if num_groups is None else f"[G] with G={num_groups}"
        raise ValueError(f"group_sizes must be {want}, got shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype}")


def _check_rows(rows, name="lhs_rows"):
    if rows is not None and (rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer)):
        raise ValueError(f"{name} must be an integer [M] array, got {rows.dtype}{list(rows.shape)}")


def gathers_rows(implementation=None, *, interpret: bool = False) -> bool:
    """Whether ``implementation`` (resolved as by ``gmm``) reads ``lhs_rows`` and
    ``dout_rows`` by index itself; the other implementations are handed gathered rows."""
    return OP.select(implementation, interpret=interpret).gathers_rows


def _rows_for(impl, operand, rows):
    """(operand, rows) as ``impl`` takes them. A row id outside [0, T) gives a NaN row here
    (the native kernel reports an error): never a silently clamped row."""
    if rows is None or OP[impl].gathers_rows:
        return operand, rows
    return jnp.take(operand, rows, axis=0, mode="fill", fill_value=jnp.nan), None


def _given(**operands):
    return {k: v for k, v in operands.items() if v is not None}


def _gmm_impl(lhs, rhs, group_sizes, lhs_rows, transpose_rhs, out_dtype, impl, interpret):
    lhs, lhs_rows = _rows_for(impl, lhs, lhs_rows)
    rec = OP[impl]  # Pallas kernels take `interpret`, the others the rows they gather.
    kw = {"interpret": interpret} if rec.interpretable else _given(lhs_rows=lhs_rows)
    return rec.load().gmm(
        lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, preferred_element_type=out_dtype, **kw
    )


def _tgmm_impl(lhs, dout, group_sizes, rows, num_groups, out_dtype, impl, interpret):
    """``rows``: (lhs_rows, dout_rows), each None or int [M]."""
    lhs, lhs_rows = _rows_for(impl, lhs, rows[0])
    dout, dout_rows = _rows_for(impl, dout, rows[1])
    rec = OP[impl]
    kw = (
        {"interpret": interpret}
        if rec.interpretable
        else _given(lhs_rows=lhs_rows, dout_rows=dout_rows)
    )
    return rec.load().tgmm(
        lhs, dout, group_sizes, num_groups=num_groups, preferred_element_type=out_dtype, **kw
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm_vjp(lhs, rhs, group_sizes, lhs_rows, transpose_rhs, out_dtype, impl, interpret):
    return _gmm_impl(lhs, rhs, group_sizes, lhs_rows, transpose_rhs, out_dtype, impl, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, lhs_rows, transpose_rhs, out_dtype, impl, interpret):
    out = _gmm_impl(lhs, rhs, group_sizes, lhs_rows, transpose_rhs, out_dtype, impl, interpret)
    return out, (lhs, rhs, group_sizes, lhs_rows)


def _gmm_bwd(transpose_rhs, out_dtype, impl, interpret, res, dout_MxN):
    lhs, rhs, group_sizes_G, lhs_rows_M = res
    del out_dtype
    dout_MxN = dout_MxN.astype(lhs.dtype)
    dlhs_MxK = _gmm_impl(
        dout_MxN, rhs, group_sizes_G, None, not transpose_rhs, lhs.dtype, impl, interpret
    )
    num_groups = rhs.shape[0]
    if transpose_rhs:  # rhs is [G, N, K]
        drhs = _tgmm_impl(
            dout_MxN, lhs, group_sizes_G, (None, lhs_rows_M), num_groups, rhs.dtype, impl, interpret
        )
    else:
        drhs = _tgmm_impl(
            lhs, dout_MxN, group_sizes_G, (lhs_rows_M, None), num_groups, rhs.dtype, impl, interpret
        )
    if lhs_rows_M is not None:  # each lhs row gets the rows it was gathered into
        dlhs_MxK = jax.ops.segment_sum(dlhs_MxK, lhs_rows_M, num_segments=lhs.shape[0])
    return dlhs_MxK, drhs, None, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    interpret: bool = False,
    lhs_rows: jax.Array | None = None,
) -> jax.Array:
    """Grouped matmul: ``out[m] = lhs[m] @ rhs[group(m)]``.

    Rows of ``lhs`` are sorted by group: the first ``group_sizes[0]`` rows use ``rhs[0]``, the
    next ``group_sizes[1]`` use ``rhs[1]`` and so on. Rows past ``sum(group_sizes)`` come out
    zero. Differentiable in ``lhs`` and ``rhs`` (custom VJP: ``d lhs = gmm(dy, rhs^T)``,
    ``d rhs = tgmm(lhs, dy)``); ``group_sizes`` is not differentiable.

    Args:
      lhs: ``[M, K]``.
      rhs: ``[G, K, N]`` (``[G, N, K]`` when ``transpose_rhs``).
      group_sizes: int32 ``[G]``, traced.
      transpose_rhs: contract ``lhs`` with the last axis of ``rhs``.
      preferred_element_type: output dtype (default ``lhs.dtype``); accumulation is f32.
      implementation: a name from ``IMPLEMENTATIONS``, a sequence of names (first that runs on
        the current backend wins), or None for the backend's best.
      interpret: run Pallas kernels in interpret mode (any backend).
      lhs_rows: optional int ``[M]``: row m of the product is ``lhs[lhs_rows[m]]`` of a
        ``[T, K]`` lhs, e.g. the token of each slot of a dispatch sorted by expert. Same result
        as ``gmm(lhs[lhs_rows], ...)``; ``cpu_ffi`` gathers the rows per work item instead of
        materialising them (the other implementations gather first). ``d lhs`` sums the rows
        each lhs row was gathered into. Ids must lie in ``[0, T)``.

    Returns:
      ``[M, N]``.
    """
    _check_gmm_args(lhs, rhs, group_sizes, transpose_rhs, lhs_rows)
    impl = OP.resolve(implementation, interpret=interpret)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    return _gmm_vjp(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        lhs_rows,
        transpose_rhs,
        out_dtype,
        impl,
        interpret,
    )


def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    interpret: bool = False,
    lhs_rows: jax.Array | None = None,
    dout_rows: jax.Array | None = None,
) -> jax.Array:
    """Transposed grouped matmul: ``out[g] = lhs[rows of g]^T @ dout[rows of g]``.

    Args:
      lhs: ``[M, K]``, rows sorted by group.
      dout: ``[M, N]``.
      group_sizes: int32 ``[G]``; empty groups give zeros, rows past the sum are ignored.
      num_groups: G of the output (default ``group_sizes.shape[0]``).
      preferred_element_type: output dtype (default ``lhs.dtype``).
      implementation: as for ``gmm``.
      interpret: run Pallas kernels in interpret mode.
      lhs_rows: optional int ``[M]``: row m of lhs is ``lhs[lhs_rows[m]]`` of a ``[T, K]``
        lhs (as for ``gmm``).
      dout_rows: optional int ``[M]``: row m of dout is ``dout[dout_rows[m]]`` of a ``[T, N]``
        dout (e.g. each slot's token gradient, for the weight gradient of a product whose
        rows are combined per token).

    Returns:
      ``[G, K, N]``.
    """
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    _check_rows(lhs_rows)
    _check_rows(dout_rows, "dout_rows")
    m = lhs.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    if dout.ndim != 2 or (dout_rows is None and dout.shape[0] != m):
        raise ValueError(f"dout must be [M={m}, N], got shape {dout.shape}")
    if dout_rows is not None and dout_rows.shape[0] != m:
        raise ValueError(f"dout_rows must have M={m} entries, got {dout_rows.shape[0]}")
    _check_group_sizes(group_sizes)
    num_groups = num_groups or group_sizes.shape[0]
    if num_groups > group_sizes.shape[0]:
        raise ValueError(f"num_groups={num_groups} > group_sizes length {group_sizes.shape[0]}")
    impl = OP.resolve(implementation, interpret=interpret)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    gs = group_sizes.astype(jnp.int32)
    rows = (lhs_rows, dout_rows)
    return _tgmm_impl(lhs, dout, gs, rows, num_groups, out_dtype, impl, interpret)
