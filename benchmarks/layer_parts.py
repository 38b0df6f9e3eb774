"""Breakdowns behind the MoE layer table: where the non-GEMM time goes, and gate|up fusion.

Usage: python benchmarks/layer_parts.py   (GPU: the OLMoE-1B-7B layer in bf16; CPU: the
three fp32 "mini" shapes of benchmarks/moe_layer.py)

1. The identity-expert layer (the `dispatch+combine share` column) against its parts, each
   fwd+bwd: router matmul + route + balance loss; dispatch + combine with fixed routing;
   sort_by_expert alone.
2. The whole dropless layer (fwd+bwd, random routing) with SwiGLU gate and up as two
   grouped GEMMs over separately stored weights (the layout before the fused one) against
   the layer's one grouped GEMM over `w_gate_in` [E, D, F, 2] seen as [E, D, 2F].
Medians of 9 calls after a warm-up, interleaved where two variants are compared.
"""

import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import moe_layer as B  # noqa: E402
from benchmarks.common import machine_line, set_malloc, timeit  # noqa: E402
from jmoe import dispatch as D  # noqa: E402
from jmoe import losses, ops, route  # noqa: E402
from jmoe.routing import RouterConfig  # noqa: E402


def ms(fn, *args, repeats=9):
    return timeit(fn, *args, repeats=repeats) * 1e3


def identity_layer_parts(shape, dtype):
    t, d, f, e, k = shape
    cfg = RouterConfig(num_experts=e, top_k=k, normalize_weights=True)
    x, params, offset = B.make_inputs(shape, "balanced", dtype=dtype)
    rp = {"router": params["router"]}
    grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1)))

    def whole(x, p, o):
        y, aux = B.moe_dropless(x, p, o, cfg=cfg, identity_experts=True)
        return jnp.sum(jnp.square(y)) + aux

    def routing_only(x, p, o):
        r = route(x @ p["router"] + o, cfg)
        return jnp.sum(r.weights) + losses.load_balance_loss(r)

    r0 = route(x @ params["router"] + offset, cfg)

    def dispatch_combine(x, w, ids):
        r = r0.replace(weights=w, expert_ids=ids)
        xs, plan = D.dropless_dispatch(x, r, e)
        return jnp.sum(jnp.square(D.dropless_combine(xs, plan, r, e)))

    sort = jax.jit(lambda ids, act: ops.sort_by_expert(ids, act, e))
    return {
        "identity-expert layer": ms(grad(whole), x, rp, offset),
        "router matmul + route + balance loss": ms(grad(routing_only), x, rp, offset),
        "dispatch + combine (given routing)": ms(
            grad(dispatch_combine), x, r0.weights, r0.expert_ids
        ),
        "sort_by_expert": ms(sort, r0.expert_ids, r0.active(e)),
    }


def _two_gemm_layer(x, params, offset, *, cfg):
    """`moe_layer.moe_dropless` with gate and up as two grouped GEMMs (separate weights)."""
    r = route(x @ params["router"] + offset, cfg)
    xs, plan = D.dropless_dispatch(x, r, cfg.num_experts)
    gs = plan.group_sizes_E
    h = ops.grouped_matmul(xs, params["w_gate"], gs)
    h = jax.nn.silu(h) * ops.grouped_matmul(xs, params["w_in"], gs)
    ys = ops.grouped_matmul(h, params["w_out"], gs)
    return D.dropless_combine(ys, plan, r, cfg.num_experts), losses.load_balance_loss(r)


def gate_up(shape, dtype):
    """Whole layer fwd+bwd: separate stored gate and up weights vs the fused `w_gate_in`."""
    t, d, f, e, k = shape
    cfg = RouterConfig(num_experts=e, top_k=k, normalize_weights=True)
    x, params, offset = B.make_inputs(shape, "random", dtype=dtype)
    w = params["w_gate_in"]
    fused = {key: params[key] for key in ("router", "w_gate_in", "w_out")}
    # Separate arrays (copies), as the layer stored them before the fused layout.
    two = {"router": params["router"], "w_gate": w[..., 0] + 0, "w_in": w[..., 1] + 0}
    two["w_out"] = params["w_out"]
    fns = {
        "two": (B.fwd_bwd(functools.partial(_two_gemm_layer, cfg=cfg)), (x, two, offset)),
        "one": (B.fwd_bwd(functools.partial(B.moe_dropless, cfg=cfg)), (x, fused, offset)),
    }
    times = {key: [] for key in fns}
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    for _ in range(9):
        for key, (fn, args) in fns.items():
            times[key].append(ms(fn, *args, repeats=1))
    return {key: statistics.median(v) for key, v in times.items()}


def main():
    note = set_malloc("keep")
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    shapes = {"OLMoE-1B-7B": B.GPU_SHAPES["OLMoE-1B-7B"]} if gpu else B.SHAPES
    print(machine_line(), note, "fwd+bwd ms, medians.")
    for name, shape in shapes.items():
        parts = identity_layer_parts(shape, dtype)
        print(f"{name} {shape}: " + "; ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        gu = gate_up(shape, dtype)
        print(
            f"{name} whole layer: gate and up as two grouped GEMMs {gu['two']:.2f}, "
            f"fused w_gate_in {gu['one']:.2f} (x{gu['two'] / gu['one']:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
