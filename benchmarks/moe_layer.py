"""Whole MoE layer (route, dispatch, experts, combine), fwd+bwd, against its peers.

Usage: python benchmarks/moe_layer.py [--quick] [--repeats N] [--gpu] [--write [PATH]]

Peers, measured side by side in one run (CPU fp32 by default):
  dense    a dense SwiGLU FFN of width K*F on the T tokens: the same active FLOPs;
  ragged   the same jmoe layer with `jax.lax.ragged_dot` as the grouped GEMM;
  onehot   GShard one-hot einsum dispatch/combine ([T, E, C] tensors, capacity factor 1.25).
Routing distributions (the router's logits get a +20 offset on the chosen experts):
  balanced each expert gets T*K/E slots; random: K distinct uniform experts per token;
  skewed   every token uses expert 0 (1/K of all slots: 50% at K=2), the rest uniform;
  empty    a quarter of the experts get no tokens, the rest uniform.
"""

import argparse
import functools
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BENCHMARKS_MD,
    interleaved_times,
    machine_line,
    release_freed_memory,
    set_malloc,
    temp_bytes,
    timeit,
    write_section,
)
from jmoe import dispatch as D  # noqa: E402
from jmoe import experts, losses, route  # noqa: E402
from jmoe.routing import RouterConfig  # noqa: E402
from pallas_kernels.gmm import api as gmm_api  # noqa: E402

SHAPES = {  # name: (T, D, F, E, K)
    "Mixtral-mini": (2048, 512, 1024, 8, 2),
    "OLMoE-mini": (512, 512, 256, 64, 8),
    "DeepSeek-mini": (1024, 512, 128, 256, 8),
}
GPU_SHAPES = {  # one layer of the real models, bf16
    "Mixtral-8x7B": (4096, 4096, 14336, 8, 2),
    "OLMoE-1B-7B": (16384, 2048, 1024, 64, 8),
}
ROUTINGS = ("balanced", "random", "skewed", "empty")
ONEHOT_MAX_ELEMENTS = 2**31  # skip the one-hot peer when its [T, K, E, C] tensor is larger


def chosen_experts(t, e, k, routing, seed=0):
    """int[T, K] distinct experts per token following the named distribution."""
    rng = np.random.default_rng(seed)
    if routing == "balanced":
        return (np.arange(t)[:, None] * k + np.arange(k)[None, :]) % e
    pool = e - e // 4 if routing == "empty" else e
    scores = rng.random((t, pool))
    if routing == "skewed":
        scores[:, 0] = 2.0  # always first.
    return np.argsort(-scores, axis=1)[:, :k]


def make_inputs(shape, routing, seed=0, dtype=jnp.float32):
    t, d, f, e, k = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    ids = chosen_experts(t, e, k, routing, seed)
    offset = np.zeros((t, e), np.float32)
    np.put_along_axis(offset, ids, 20.0, axis=1)
    scale = lambda fan: 1.0 / math.sqrt(fan)
    params = {
        "router": jax.random.normal(keys[1], (d, e)) * 0.01,
        "w_gate_in": jax.random.normal(keys[2], (e, d, f, 2)) * scale(d),
        "w_out": jax.random.normal(keys[4], (e, f, d)) * scale(f),
    }
    cast = lambda a: a.astype(dtype)
    return cast(x), jax.tree.map(cast, params), jnp.asarray(offset)


def _routing(x, params, offset, cfg):
    return route(x @ params["router"] + offset, cfg)


def moe_dropless(x, params, offset, *, cfg, impl=None, identity_experts=False):
    routing = _routing(x, params, offset, cfg)
    if identity_experts:
        ys, plan = D.dropless_dispatch(x, routing, cfg.num_experts)
        return D.dropless_combine(ys, plan, routing, cfg.num_experts), losses.load_balance_loss(
            routing
        )
    # as the layer: the expert products read the token rows (and their gradients) by index
    plan = D.dropless_plan(routing, cfg.num_experts)
    inv = plan.inv_N.reshape(routing.expert_ids.shape)
    ex = {k: params[k] for k in ("w_gate_in", "w_out")}
    w = D.combine_weights(routing, cfg.num_experts)
    y = experts.dispatched_ffn(
        ex, x, plan.order_N, inv, plan.group_sizes_E, w, "swiglu", implementation=impl
    )
    return y.astype(x.dtype), losses.load_balance_loss(routing)


def moe_onehot(x, params, offset, *, cfg, cap):
    """GShard: dispatch/combine tensors [T, E, C] built from cumsum positions, two einsums."""
    routing = _routing(x, params, offset, cfg)
    e = cfg.num_experts
    onehot_TxKxE = jax.nn.one_hot(routing.expert_ids, e, dtype=jnp.float32)
    pos_TxKxE = (
        jnp.cumsum(onehot_TxKxE.reshape(-1, e), axis=0).reshape(onehot_TxKxE.shape) - 1.0
    ) * onehot_TxKxE
    keep = onehot_TxKxE * (pos_TxKxE < cap)
    disp_TxKxExC = keep[..., None] * jax.nn.one_hot(pos_TxKxE, cap, dtype=jnp.float32)
    dispatch_TxExC = disp_TxKxExC.sum(1)
    combine_TxExC = (disp_TxKxExC * routing.weights[:, :, None, None]).sum(1)
    buf = jnp.einsum("tec,td->ecd", dispatch_TxExC, x)
    ex = {k: params[k] for k in ("w_gate_in", "w_out")}
    out = experts.batched_ffn(ex, buf, "swiglu")
    return jnp.einsum("tec,ecd->td", combine_TxExC, out), losses.load_balance_loss(routing)


def dense_params(params, k):
    """Weights of a dense SwiGLU FFN of width K*F (the MoE's active FLOPs, router excluded).

    Separate arrays: differentiating slices of the [E, D, F] expert weights would also make
    the dense peer write [E, D, F] gradients.
    """
    _, d, f, _ = params["w_gate_in"].shape
    return {
        "w_gate_in": params["w_gate_in"][:k].transpose(1, 0, 2, 3).reshape(d, k * f, 2),
        "w_out": params["w_out"][:k].reshape(k * f, d),
    }


def dense_ffn(x, params, offset):
    del offset
    return experts.dense_ffn(params, x, "swiglu"), jnp.float32(0.0)


def fwd_bwd(f):
    def loss(x, params, offset):
        y, aux = f(x, params, offset)
        return jnp.sum(jnp.square(y)) + aux

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def measure(shape, routing, repeats, dtype=jnp.float32):
    t, d, f, e, k = shape
    cfg = RouterConfig(num_experts=e, top_k=k, normalize_weights=True)
    args = make_inputs(shape, routing, dtype=dtype)
    cap = D.capacity(t, k, e, 1.25)
    fns = {
        "jmoe": functools.partial(moe_dropless, cfg=cfg),
        "dispatch_only": functools.partial(moe_dropless, cfg=cfg, identity_experts=True),
        "ragged": functools.partial(moe_dropless, cfg=cfg, impl="ragged_dot"),
        "loop": functools.partial(moe_dropless, cfg=cfg, impl="xla"),
        "onehot": functools.partial(moe_onehot, cfg=cfg, cap=cap),
    }
    if t * k * e * cap > ONEHOT_MAX_ELEMENTS:
        del fns["onehot"]
    x, params, offset = args
    # Identity experts: only x and the router get gradients (no zero [E, D, F] gradients).
    routing_args = (x, {"router": params["router"]}, offset)
    res = {}
    for n, fn in fns.items():
        if n == "jmoe":
            continue  # timed below, side by side with the dense peer
        res[n] = timeit(
            fwd_bwd(fn), *(routing_args if n == "dispatch_only" else args), repeats=repeats
        )
        release_freed_memory()  # ragged_dot's multi-GiB temporaries fragment the heap
    # jmoe, its forward and the dense peer: calls interleaved, so drift hits them alike.
    side_by_side = {
        "jmoe": (fwd_bwd(fns["jmoe"]), args),
        "dense": (fwd_bwd(dense_ffn), (x, dense_params(params, k), offset)),
        "jmoe_fwd": (jax.jit(lambda *a: fns["jmoe"](*a)[0]), args),
    }
    times = interleaved_times(side_by_side, 2 * repeats + 1)
    res.update({n: statistics.median(v) for n, v in times.items()})
    res["dense_min_ratio"] = min(times["dense"]) / min(times["jmoe"])
    res["temp_jmoe"] = temp_bytes(fwd_bwd(fns["jmoe"]), *args)
    res["temp_onehot"] = temp_bytes(fwd_bwd(fns["onehot"]), *args) if "onehot" in fns else 0
    res["flops"] = 3 * 2 * t * k * 3 * d * f  # fwd+bwd = 3x the forward's 3 matmuls
    return res


def table(quick, repeats, gpu=False):
    shapes = GPU_SHAPES if gpu else SHAPES
    shapes = dict(list(shapes.items())[:1]) if quick else shapes
    dtype = jnp.bfloat16 if gpu else jnp.float32
    routings = ("balanced", "skewed") if quick else ROUTINGS
    rows = [
        f"| shape (T,D,F,E,K) | routing | jmoe ({gmm_api.resolve_implementation(None)}) ms "
        "| GFLOP/s (active) | vs dense | vs dense (min) | vs XLA loop | vs ragged_dot | vs one-hot "
        "| fwd+bwd / fwd | dispatch+combine share | jmoe temp MiB | one-hot temp MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, shape in shapes.items():
        for routing in routings:
            r = measure(shape, routing, repeats, dtype)
            onehot = r["onehot"] / r["jmoe"] if "onehot" in r else float("nan")
            mib = lambda b: f"{b / 2**20:.1f}"
            rows.append(
                f"| {name} {shape} | {routing} | {r['jmoe'] * 1e3:.1f} | "
                f"{r['flops'] / r['jmoe'] / 1e9:.1f} | {r['dense'] / r['jmoe']:.2f} | "
                f"{r['dense_min_ratio']:.2f} | "
                f"{r['loop'] / r['jmoe']:.2f} | "
                f"{r['ragged'] / r['jmoe']:.2f} | {onehot:.2f} | "
                f"{r['jmoe'] / r['jmoe_fwd']:.2f} | {r['dispatch_only'] / r['jmoe']:.2f} | "
                f"{mib(r['temp_jmoe'])} | {mib(r['temp_onehot'])} |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--write",
        nargs="?",
        const=BENCHMARKS_MD,
        default=None,
        metavar="PATH",
        help="replace the section in BENCHMARKS.md (or in the markdown file PATH)",
    )
    ap.add_argument("--gpu", action="store_true", help="bf16 shapes of real model layers")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep")
    args = ap.parse_args()
    malloc_note = set_malloc(args.malloc)
    body = "\n".join(
        [
            machine_line(),
            f"`benchmarks/moe_layer.py --repeats {args.repeats}{' --gpu' if args.gpu else ''} "
            f"--malloc {args.malloc}`. {malloc_note} "
            f"{'bf16' if args.gpu else 'fp32'}; fwd+bwd (grads wrt x and "
            "all parameters) of the whole layer: route, dispatch, experts (SwiGLU), combine, "
            "balance loss. Ratios are peer time / jmoe time (> 1: jmoe faster); medians; jmoe, "
            f"its forward and the dense peer interleaved ({2 * args.repeats + 1} rounds). "
            "`vs dense`: a dense SwiGLU of width K*F (same active FLOPs); `(min)`: the ratio "
            "of the two fastest calls. "
            "`dispatch+combine share`: "
            "the same layer with identity experts (route, sort, permute, combine, balance loss; "
            "gradients wrt x and the router) over the full layer.",
            "",
            table(args.quick, args.repeats, args.gpu),
        ]
    )
    print(body)
    if args.write:
        write_section("moe layer (GPU)" if args.gpu else "moe layer", body, args.write)


if __name__ == "__main__":
    main()
