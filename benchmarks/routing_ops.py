"""Benchmark: the routing-side ops of a dropless MoE layer (expert selection and expert sort).

* top-k of the router probabilities [T, E]: `jax.lax.top_k` (XLA's TopK) against
  `pallas_kernels.topk.top_k` with its default (the native kernel on CPU);
* the expert sort of the T*K slots: `jnp.argsort(stable=True)` (a (key, iota) pair sort)
  against `pallas_kernels.dispatch.stable_order` (one packed int32 key per slot).

Shapes: the router of each `benchmarks/moe_layer.py` CPU shape (T, E, K). Medians of
interleaved single calls after a warm-up; both sides jitted; the outputs are checked equal.

Run: `python benchmarks/routing_ops.py [--repeats N] [--write]`.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import interleaved_medians, machine_line, write_section  # noqa: E402
from jmoe import runtime  # noqa: E402
from pallas_kernels import dispatch as dsp  # noqa: E402
from pallas_kernels import topk  # noqa: E402

SHAPES = {"Mixtral-mini": (2048, 8, 2), "OLMoE-mini": (512, 64, 8), "DeepSeek-mini": (1024, 256, 8)}


def _row(name, t, e, k, repeats):
    rng = np.random.default_rng(0)
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, e)), jnp.float32), axis=-1)
    lax_topk = jax.jit(lambda p: jax.lax.top_k(p, k))
    ours_topk = jax.jit(lambda p: topk.top_k(p, k))
    np.testing.assert_array_equal(lax_topk(probs)[1], ours_topk(probs)[1])
    impl = topk.resolve_implementation(None, dtype=probs.dtype, k=k)
    top = interleaved_medians({"lax": (lax_topk, (probs,)), "ours": (ours_topk, (probs,))}, repeats)
    t_lax, t_ours = top["lax"] * 1e3, top["ours"] * 1e3

    ids = lax_topk(probs)[1].reshape(-1)
    argsort = jax.jit(lambda i: jnp.argsort(i, stable=True).astype(jnp.int32))
    packed = jax.jit(lambda i: dsp.stable_order(i, e + 1))
    np.testing.assert_array_equal(argsort(ids), packed(ids))
    srt = interleaved_medians({"arg": (argsort, (ids,)), "ours": (packed, (ids,))}, repeats)
    s_arg, s_ours = srt["arg"] * 1e3, srt["ours"] * 1e3
    return (
        f"| {name} ({t}, {e}, {k}) | {t_lax:.3f} | {t_ours:.3f} ({impl}) | {t_lax / t_ours:.1f}x "
        f"| {s_arg:.3f} | {s_ours:.3f} | {s_arg / s_ours:.1f}x |"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--write", action="store_true", help="replace the BENCHMARKS.md section")
    args = ap.parse_args()
    runtime.keep_freed_memory()
    lines = [
        machine_line(),
        "",
        "| router (T, E, K) | lax.top_k ms | topk.top_k ms | speed-up | argsort (stable) ms "
        "| stable_order ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (t, e, k) in SHAPES.items():
        lines.append(_row(name, t, e, k, args.repeats))
        print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if args.write:
        intro = (
            "`python benchmarks/routing_ops.py`: top-k of the router probabilities [T, E] "
            "(XLA's TopK against `pallas_kernels.topk.top_k`, whose CPU default is a native "
            "kernel) and the stable expert sort of the T*K slots (`jnp.argsort` against "
            "`pallas_kernels.dispatch.stable_order`), medians of interleaved calls, outputs "
            "checked equal.\n\n"
        )
        write_section("routing ops (CPU)", intro + body)


if __name__ == "__main__":
    main()
