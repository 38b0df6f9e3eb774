"""Expert-parallel MoE FFN: tokens split over the batch axes, experts over `expert`.

Routing, capacity positions and losses stay in the global (GSPMD) view, so they are exactly
the single-device ones. Only the expert computation runs inside `jax.shard_map`:

dropless: each device sorts its token slots by expert, sends each destination device its rows
  over the expert axis, sorts the received rows by local expert, runs the grouped GEMM
  (`jmoe.ops.grouped_matmul`), and sends results back the same way. The exchange (`a2a`) is
  `jax.lax.ragged_all_to_all` on TPU/GPU (only active rows move); XLA:CPU has no
  `ragged-all-to-all` (jax 0.10.2: "not supported by XLA:CPU ThunkEmitter"), so there it is a
  padded all-to-all of [P, B, D] blocks. By default buffers are exact worst cases, so nothing
  can be lost; `buffer_factor=f` bounds them (about f x the balanced size) and rows past the
  bound are dropped *and counted* in `aux["ep_overflow_fraction"]`.
capacity: positions are computed globally (token order or batch priority), so the kept/dropped
  slots are the single-device ones; each device writes its kept slots into [E, B, D] buffers
  (B = min(C, T_local) by default, exact) and the buffers go through an all-to-all of the
  [E, B, D] -> [E_local, P * B, D] blocks, a batched FFN, and back.

Axis legend: P expert-axis size, E_l = E / P local experts, T_l local tokens, B rows per
(source, destination) block.
"""

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmoe import dispatch as dispatch_lib
from jmoe import experts as experts_lib
from jmoe import ops
from jmoe.routing.config import RouterConfig
from jmoe.routing.types import Routing
from jmoe.sharding.exchange import (
    all_to_all,
    capacity_buffer_rows,
    dropless_buffer_rows,
    masked_gather_rows,
    ragged_buffer_rows,
    ragged_exchange,
    resolve_a2a,
)
from jmoe.sharding.mesh import axis_size, batch_axes


def resolve_mesh(mesh=None):
    """The mesh to shard over: the one given, else the one set by `jax.set_mesh`."""
    if mesh is not None:
        return mesh
    m = jax.sharding.get_abstract_mesh()
    if m is None or m.empty:
        raise ValueError(
            "expert parallelism needs a mesh: pass `mesh=` to the layer or run under "
            "`jax.set_mesh(mesh)`"
        )
    return m


def route_sharded(
    logits_TxS,
    cfg,
    *,
    mesh=None,
    expert_axis: str = "expert",
    data_axes: Sequence[str] = ("data", "fsdp"),
    rng=None,
    bias=None,
    token_ids=None,
    deterministic: bool = True,
) -> Routing:
    """`jmoe.routing.route` run per token shard inside `shard_map` when that is exact.

    GSPMD does not partition XLA's TopK along the token axis (it all-gathers the [T, S]
    logits to every device first); a token-local router without randomness gives identical
    results shard by shard, so it runs inside `shard_map` with the tokens split over the batch
    axes. Routers that are not `token_local` (expert choice), random routing and token counts
    that do not split fall back to the global view.
    """
    from jmoe.routing import route

    call = dict(rng=rng, bias=bias, deterministic=deterministic)
    mesh = resolve_mesh(mesh)
    baxes = batch_axes(mesh, data_axes, expert_axis)
    n = axis_size(mesh, baxes)
    if not cfg.record.token_local or rng is not None or logits_TxS.shape[0] % n:
        return route(logits_TxS, cfg, token_ids=token_ids, **call)
    bspec = P(baxes, None)
    tspec = P(baxes)

    def body(lg, b, tok):
        return route(lg, cfg, bias=b, token_ids=tok, deterministic=deterministic)

    specs = Routing(bspec, bspec, bspec, bspec, bspec)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(bspec, None if bias is None else P(), None if token_ids is None else tspec),
        out_specs=specs,
        check_vma=False,
    )
    return fn(logits_TxS, bias, token_ids)


def _ragged_local(params, x, ids, act, w, *, e, p, r, axis, tensor_axis, activation, impl, emulate):
    """Dropless expert parallelism with ragged all-to-alls: only active rows move."""
    t_l, k = ids.shape
    e_l, n = e // p, t_l * k
    me = jax.lax.axis_index(axis)
    order, inv, sizes_e = ops.sort_by_expert(ids, act, e)
    sizes_pe = sizes_e.reshape(p, e_l)
    send = jnp.sum(sizes_pe, axis=1).astype(jnp.int32)
    starts = (jnp.cumsum(send) - send).astype(jnp.int32)
    # Receivers take sources in order until their R rows are full; the rest overflows.
    all_send = jax.lax.all_gather(send, axis)  # [P (source), P (dest)]
    before = jnp.cumsum(all_send, axis=0) - all_send  # rows of earlier sources per dest
    out_off = jnp.minimum(before[me], r).astype(jnp.int32)
    kept = jnp.clip(r - before[me], 0, send).astype(jnp.int32)
    recv_sizes = jnp.clip(r - before[:, me], 0, all_send[:, me]).astype(jnp.int32)
    recv_off = jnp.minimum(before[:, me], r).astype(jnp.int32)
    cum = jnp.cumsum(sizes_pe, axis=1)
    kept_pe = jnp.clip(jnp.minimum(cum, kept[:, None]) - (cum - sizes_pe), 0).astype(jnp.int32)
    recv_kept = all_to_all(kept_pe, axis).reshape(-1)  # (source, local expert) blocks

    xs = ops.dispatch_rows(x, order, inv.reshape(t_l, k))
    recv = ragged_exchange(xs, starts, kept, out_off, recv_off, recv_sizes, r, axis, emulate)
    rows = jnp.arange(r, dtype=jnp.int32)
    block = jnp.searchsorted(jnp.cumsum(recv_kept), rows, side="right")
    lid = jnp.where(block < p * e_l, block % e_l, e_l).astype(jnp.int32)[:, None]
    o2, i2, sizes_l = ops.sort_by_expert(lid, lid < e_l, e_l)
    ys = experts_lib.grouped_ffn(
        params, ops.permute_rows(recv, o2, i2), sizes_l, activation, implementation=impl
    )
    y_recv = ops.permute_rows(ys, i2, o2)
    back = ragged_exchange(
        y_recv, recv_off, recv_sizes, all_to_all(starts, axis), starts, kept, n, axis, emulate
    )
    dest = jnp.clip(ids.reshape(-1) // e_l, 0, p - 1)
    slot_kept = act.reshape(-1) & (inv - starts[dest] < kept[dest])
    wk = jnp.where(slot_kept.reshape(t_l, k), w, 0.0)
    y = ops.combine_rows(back, order, inv.reshape(t_l, k), wk)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    overflow = jnp.sum(act) - jnp.sum(slot_kept)
    return y.astype(ys.dtype), overflow.astype(jnp.int32)


def _dropless_local(params, x, ids, act, w, *, e, p, b, axis, tensor_axis, activation, impl):
    t_l, k = ids.shape
    d = x.shape[-1]
    e_l, n = e // p, t_l * k
    order, inv, sizes_e = ops.sort_by_expert(ids, act, e)  # sorted position -> slot
    sizes_pe = sizes_e.reshape(p, e_l)
    send = jnp.sum(sizes_pe, axis=1)
    starts = jnp.cumsum(send) - send
    cum = jnp.cumsum(sizes_pe, axis=1)
    kept_pe = jnp.clip(jnp.minimum(cum, b) - (cum - sizes_pe), 0).astype(jnp.int32)
    # buffer row (q, j) <- sorted position starts[q] + j; slot n -> buffer row.
    j = jnp.arange(b, dtype=jnp.int32)
    buf_idx = order[jnp.clip(starts[:, None] + j[None, :], 0, n - 1)].reshape(-1)
    buf_valid = (j[None, :] < jnp.minimum(send, b)[:, None]).reshape(-1)
    dest = jnp.clip(ids.reshape(-1) // e_l, 0, p - 1)
    slot_j = inv - starts[dest]
    slot_valid = act.reshape(-1) & (slot_j < b)
    slot_buf = dest * b + jnp.clip(slot_j, 0, b - 1)

    x_nd = jnp.broadcast_to(x[:, None, :], (t_l, k, d)).reshape(n, d)
    send_buf = masked_gather_rows(x_nd, buf_idx, buf_valid, slot_buf, slot_valid)
    recv = all_to_all(send_buf.reshape(p, b, d), axis)  # [P (source), B, D]
    recv_kept = all_to_all(kept_pe, axis)  # [P (source), E_l]
    ends = jnp.cumsum(recv_kept, axis=1)
    lid = jax.vmap(lambda en: jnp.searchsorted(en, j, side="right"))(ends).reshape(-1, 1)
    o2, i2, sizes_l = ops.sort_by_expert(lid.astype(jnp.int32), lid < e_l, e_l)
    xs = ops.permute_rows(recv.reshape(p * b, d), o2, i2)
    ys = experts_lib.grouped_ffn(params, xs, sizes_l, activation, implementation=impl)
    y_recv = ops.permute_rows(ys, i2, o2).reshape(p, b, d)
    back = all_to_all(y_recv, axis).reshape(p * b, d)
    y_nd = masked_gather_rows(back, slot_buf, slot_valid, buf_idx, buf_valid)
    wk = jnp.where(slot_valid.reshape(t_l, k), w, 0.0)
    y = dispatch_lib.weighted_sum_slots(y_nd.reshape(t_l, k, d), wk)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    overflow = jnp.sum(act) - jnp.sum(slot_valid)
    return y.astype(ys.dtype), overflow.astype(jnp.int32)


def _capacity_local(params, x, ids, keep, w, *, e, p, b, axis, tensor_axis, activation):
    t_l, k = ids.shape
    d = x.shape[-1]
    e_l = e // p
    pos = ops.capacity_positions(ids, keep, e)  # local rank among this device's kept slots
    ok = keep & (pos >= 0) & (pos < b)
    pos = jnp.where(ok, pos, -1)
    buf = ops.capacity_dispatch(x, ids, pos, e, b)  # [E, B, D]
    recv = all_to_all(buf.reshape(p, e_l, b, d), axis)  # [P (source), E_l, B, D]
    h = recv.transpose(1, 0, 2, 3).reshape(e_l, p * b, d)
    out = experts_lib.batched_ffn(params, h, activation)
    out = out.reshape(e_l, p, b, d).transpose(1, 0, 2, 3)
    back = all_to_all(out, axis).reshape(e, b, d)
    y = ops.capacity_combine(back, ids, pos, jnp.where(ok, w, 0.0))
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    overflow = jnp.sum(keep) - jnp.sum(ok)
    return y.astype(out.dtype), overflow.astype(jnp.int32)


def _param_specs(params, expert_axis, tensor_axis):
    """w_out [E, F, D]: F over the tensor axis; input weights [E, D, F, ...] likewise."""
    specs = {}
    for name, w in params.items():
        if name == "w_out":
            specs[name] = P(expert_axis, tensor_axis, None)
        else:
            specs[name] = P(expert_axis, None, tensor_axis, *(None,) * (w.ndim - 3))
    return specs


def _shard_geometry(mesh, params, routing, num_experts, expert_axis, tensor_axis, data_axes):
    """Validates the axes and sizes; returns (mesh, batch axes, batch shards, kwargs shared
    by the per-device bodies: `e`, `p`, `axis`, `tensor_axis`)."""
    mesh = resolve_mesh(mesh)
    names = tuple(mesh.axis_names)
    if expert_axis not in names:
        raise ValueError(f"expert_axis={expert_axis!r} is not a mesh axis {names}")
    if tensor_axis is not None and tensor_axis not in names:
        raise ValueError(f"tensor_axis={tensor_axis!r} is not a mesh axis {names}")
    p = axis_size(mesh, expert_axis)
    if num_experts % p:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the {expert_axis!r} axis size {p}"
        )
    width = params["w_out"].shape[1]
    if tensor_axis is not None and width % axis_size(mesh, tensor_axis):
        raise ValueError(
            f"expert width {width} must be divisible by the {tensor_axis!r} axis "
            f"size {axis_size(mesh, tensor_axis)}"
        )
    baxes = batch_axes(mesh, data_axes, expert_axis)
    n_shards = axis_size(mesh, baxes)
    t, _ = routing.expert_ids.shape
    if t % n_shards:
        raise ValueError(
            f"{t} tokens cannot be split over the batch axes {baxes} ({n_shards} shards)"
        )
    common = dict(e=num_experts, p=p, axis=expert_axis, tensor_axis=tensor_axis)
    return mesh, baxes, n_shards, common


def _capacity_mask(routing, active, e, cap, batch_priority):
    """The global (single-device) capacity decision: (kept-slot mask, dropped fraction)."""
    prio = None
    if batch_priority:
        top_w = jnp.max(jnp.where(active, routing.weights, -jnp.inf), axis=-1, keepdims=True)
        prio = jnp.broadcast_to(top_w, active.shape)
    pos = ops.capacity_positions(routing.expert_ids, active, e, priority_TxK=prio)
    mask = active & (pos >= 0) & (pos < cap)
    n_active = jnp.sum(active)
    dropped = (n_active - jnp.sum(mask)) / jnp.maximum(n_active, 1)
    return mask, dropped


def _dispatch_setup(dispatch, kind, routing, active, x, n_shards, common, rc, factor, impl):
    """Per dispatch mode: (per-device body, slot mask, dropped fraction, rows per block B,
    a2a bytes per device, None where they are data dependent)."""
    t, k = routing.expert_ids.shape
    t_l, d = t // n_shards, x.shape[-1]
    e, p = common["e"], common["p"]
    itemsize = jnp.dtype(x.dtype).itemsize
    if dispatch == "dropless" and kind != "padded":
        b = ragged_buffer_rows(t_l, k, e, p, factor)
        local = partial(_ragged_local, r=b, impl=impl, emulate=kind == "ragged_emulated", **common)
        return local, active, jnp.float32(0.0), b, None  # the active rows, out and back
    if dispatch == "dropless":
        b = dropless_buffer_rows(t_l, k, e, p, factor)
        local = partial(_dropless_local, b=b, impl=impl, **common)
        return local, active, jnp.float32(0.0), b, 2 * p * b * d * itemsize
    if dispatch == "capacity":
        cap = dispatch_lib.capacity(t, k, e, rc.capacity_factor, rc.min_capacity)
        mask, dropped = _capacity_mask(routing, active, e, cap, rc.batch_priority)
        b = capacity_buffer_rows(t_l, k, e, cap, factor)
        local = partial(_capacity_local, b=b, **common)
        return local, mask, dropped, b, 2 * e * b * d * itemsize
    raise ValueError(f"dispatch={dispatch!r} is not one of {dispatch_lib.DISPATCH_KINDS}")


def _run_local(local, mesh, baxes, pspecs, args):
    """`local` on every device under `shard_map`: (y, overflow psum'd over every mesh axis)."""
    names = tuple(mesh.axis_names)
    bspec = P(baxes, None)

    def body(prm, xx, ii, mm, ww):
        y, over = local(prm, xx, ii, mm, ww)
        return y, jax.lax.psum(over, names)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(pspecs, bspec, bspec, bspec, bspec),
        out_specs=(bspec, P()),
        check_vma=False,  # kernels (gmm loops, Pallas) are not varying-manual-axes aware
    )
    return fn(*args)


def _ep_aux(mesh, n_shards, x, mask, overflow, a2a_bytes, b):
    """`ep_overflow_fraction`, `ep_a2a_bytes` and `ep_buffer_rows`."""
    d, itemsize = x.shape[-1], jnp.dtype(x.dtype).itemsize
    # every overflow count is psum'd over all axes; replicas along non-batch axes repeat it.
    reps = math.prod(dict(mesh.shape)[a] for a in mesh.axis_names) // n_shards
    n_kept = jnp.maximum(jnp.sum(mask), 1)
    if a2a_bytes is None:  # ragged: every kept active row, out and back, from every device
        a2a_bytes = 2.0 * (jnp.sum(mask) - overflow / reps) * d * itemsize / n_shards
    return {
        "ep_overflow_fraction": (overflow / reps / n_kept).astype(jnp.float32),
        "ep_a2a_bytes": jnp.asarray(a2a_bytes, jnp.float32),
        "ep_buffer_rows": jnp.int32(b),
    }


def expert_parallel_ffn(
    params,
    x_TxD,
    routing: Routing,
    cfg: RouterConfig,
    *,
    mesh=None,
    expert_axis: str = "expert",
    data_axes: Sequence[str] = ("data", "fsdp"),
    tensor_axis: str | None = None,
    dispatch: str = "dropless",
    activation: str = "swiglu",
    buffer_factor: float | None = None,
    implementation=None,
    a2a: str = "auto",
):
    """Expert FFN with experts sharded over `expert_axis`; returns (y_TxD, dropped, aux).

    Args:
      params: global expert weights `w_gate_in` [E, D, F, 2] (or `w_in` [E, D, F]) and
        `w_out` [E, F, D].
      x_TxD: global tokens; T must be divisible by the product of the batch axes
        (`data_axes` present in the mesh, then `expert_axis`).
      routing: the global routing result.
      cfg: the router configuration: E = `cfg.num_experts` (divisible by the expert-axis
        size) and, for capacity dispatch, its capacity fields.
      mesh: a `Mesh`/`AbstractMesh`; default the one set by `jax.set_mesh`.
      tensor_axis: shard the FFN width F over this axis (outputs psum'd over it).
      dispatch: `dropless` or `capacity` (the same semantics as the single-device layer).
      buffer_factor: None for exact (lossless) all-to-all blocks; a float to bound them,
        overflow dropped and reported in `aux["ep_overflow_fraction"]`.

    Returns:
      y_TxD (dtype of the expert weights' product), the capacity-dropped fraction (0 for
      dropless) and aux with `ep_overflow_fraction` and `ep_a2a_bytes` (bytes each device sends
      through the all-to-alls per forward pass: rows in both directions).
    """
    num_experts = cfg.num_experts
    mesh, baxes, n_shards, common = _shard_geometry(
        mesh, params, routing, num_experts, expert_axis, tensor_axis, data_axes
    )
    active = routing.active(num_experts)
    w = jnp.where(active, routing.weights, 0.0)
    x = x_TxD.astype(params["w_out"].dtype)
    pspecs = _param_specs(params, expert_axis, tensor_axis)
    common["activation"] = activation
    mode = (cfg, buffer_factor, implementation)
    setup = _dispatch_setup(dispatch, resolve_a2a(a2a), routing, active, x, n_shards, common, *mode)
    local, mask, dropped, b, a2a_bytes = setup
    y, overflow = _run_local(local, mesh, baxes, pspecs, (params, x, routing.expert_ids, mask, w))
    aux = _ep_aux(mesh, n_shards, x, mask, overflow, a2a_bytes, b)
    return y, jnp.asarray(dropped, jnp.float32), aux
