"""Grouped-matmul benchmark: CPU fp32 table (default) and GPU bf16 table (``--gpu``).

Usage:
  python benchmarks/gmm.py [--quick] [--write BENCHMARKS.md]
  python benchmarks/gmm.py --gpu [--quick] [--out results.md]

All columns of a table are measured side by side in one run (medians over repeats).
"""

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    machine_line,
    release_freed_memory,
    set_malloc,
    temp_bytes,
    timeit,
)
from pallas_kernels.gmm import api  # noqa: E402

CPU_SHAPES = {  # name: (M = T*K, K = D, N = F, G = E)
    "Mixtral-mini": (4096, 512, 1024, 8),
    "OLMoE-mini": (4096, 512, 256, 64),
    "DeepSeek-mini": (8192, 512, 128, 256),
}
GPU_SHAPES = {
    "Mixtral-8x7B": (8192, 4096, 14336, 8),
    "DeepSeek-V3": (65536, 7168, 2048, 256),
    "OLMoE": (65536, 2048, 1024, 64),
    "Llama-4-16e": (8192, 5120, 8192, 16),
}
ROUTINGS = ("balanced", "random", "skewed", "empty")


def group_sizes(m: int, g: int, routing: str, seed: int = 0) -> np.ndarray:
    """Rows per group summing to ``m``.

    balanced: equal; random: multinomial over Dirichlet(1) probabilities; skewed: expert 0 gets
    50%, the rest uniform; empty: a quarter of the experts get nothing, the rest balanced.
    """
    rng = np.random.default_rng(seed)
    if routing == "balanced":
        p = np.ones(g) / g
    elif routing == "random":
        p = rng.dirichlet(np.ones(g))
    elif routing == "skewed":
        p = np.r_[0.5, np.full(g - 1, 0.5 / (g - 1))]
    elif routing == "empty":
        p = np.ones(g)
        p[rng.permutation(g)[: g // 4]] = 0
        p /= p.sum()
    else:
        raise ValueError(routing)
    if routing == "balanced":
        sizes = np.full(g, m // g)
        sizes[: m - sizes.sum()] += 1
        return sizes.astype(np.int32)
    return rng.multinomial(m, p).astype(np.int32)


def _fwd_bwd(f):
    """jit(grad) of sum(f(x, w)^2 * c): the forward output is needed, so it is not DCE'd."""

    def loss(x, w, c):
        return jnp.sum(jnp.square(f(x, w).astype(jnp.float32)) * c)

    return jax.jit(jax.grad(loss, (0, 1)))


def _interleaved_times(fns, repeats, g):
    """Seconds per call of every ``key: (fn, args)``, one call of each per round: interleaving
    the measurements makes drift on a shared machine hit all columns alike."""
    t = {key: [] for key in fns}
    for rep in range(repeats):
        for key, (fn, args) in fns.items():
            if key == "rd" and g >= 64 and rep >= 2:
                continue  # G x the FLOPs: seconds per call; two samples suffice
            t[key].append(timeit(fn, *args, repeats=1))
            if key == "rd":
                release_freed_memory()
    return t


def cpu_table(quick: bool) -> str:
    """fwd+bwd of the CPU default (the native FFI kernel when it builds) against its peers."""
    impl = api.resolve_implementation(None)
    repeats = 3 if quick else 5
    shapes = {"Mixtral-mini": CPU_SHAPES["Mixtral-mini"]} if quick else CPU_SHAPES
    routings = ("balanced", "skewed") if quick else ROUTINGS
    rows = [
        f"| shape (M,K,N,G) | routing | ours ({impl}) fwd+bwd ms | GFLOP/s (active) | vs dense | "
        "vs dense (min) | vs XLA loop | vs ragged_dot | fwd+bwd / fwd | ours temp MiB | "
        "ragged_dot temp MiB | dW write ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rng = np.random.default_rng(0)
    for name, (m, k, n, g) in shapes.items():
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32)
        c = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        # The dense peer gets its own [K, N] weight: differentiating x @ w[0] would also make it
        # write a [G, K, N] gradient.
        w_dense = w[0]
        dense = _fwd_bwd(jnp.dot)
        # Floor of any weight gradient: writing a fresh [G, K, N] f32 buffer once.
        fill = jax.jit(lambda w: w * 2.0)
        for routing in routings:
            gs = jnp.asarray(group_sizes(m, g, routing))
            ours_f = lambda x, w, gs=gs: api.gmm(x, w, gs, implementation=impl)
            loop_f = lambda x, w, gs=gs: api.gmm(x, w, gs, implementation="xla")
            rd_f = lambda x, w, gs=gs: jax.lax.ragged_dot(x, w, gs)
            ours, loop, rd = _fwd_bwd(ours_f), _fwd_bwd(loop_f), _fwd_bwd(rd_f)
            ours_fwd = jax.jit(ours_f)
            fns = {
                "ours": (ours, (x, w, c)),
                "dense": (dense, (x, w_dense, c)),
                "loop": (loop, (x, w, c)),
                "rd": (rd, (x, w, c)),
                "fwd": (ours_fwd, (x, w)),
                "fill": (fill, (w,)),
            }
            t = _interleaved_times(fns, repeats, g)
            med = {key: statistics.median(v) for key, v in t.items()}
            best = {key: min(v) for key, v in t.items()}
            flops = 3 * 2 * m * k * n
            mem_ours = temp_bytes(ours, x, w, c)
            mem_rd = temp_bytes(rd, x, w, c)
            rows.append(
                f"| {name} ({m},{k},{n},{g}) | {routing} | {med['ours'] * 1e3:.1f} | "
                f"{flops / med['ours'] / 1e9:.0f} | {med['dense'] / med['ours']:.2f}x | "
                f"{best['dense'] / best['ours']:.2f}x | {med['loop'] / med['ours']:.2f}x | "
                f"{med['rd'] / med['ours']:.1f}x | {med['ours'] / med['fwd']:.2f} | "
                f"{mem_ours / 2**20:.1f} | {mem_rd / 2**20:.1f} | {med['fill'] * 1e3:.1f} |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


# ----------------------------------------------------------------------------------- GPU


def _gpu_time(fn, *args, repeats=5, inner=5):
    return timeit(fn, *args, repeats=repeats, inner=inner)


def _to_torch(a):
    import torch

    try:
        return torch.from_dlpack(a)  # same device buffer, no copy
    except Exception:  # noqa: BLE001
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", torch.bfloat16)


def _torch_grouped_mm(x, w, sizes, repeats=5, inner=5):
    """torch._grouped_mm on the same bf16 inputs, timed with CUDA events (None if absent)."""
    import torch

    if not hasattr(torch, "_grouped_mm"):
        return None
    x, w = _to_torch(x), _to_torch(w)  # w: [G, K, N]
    w = w.transpose(-2, -1).contiguous().transpose(-2, -1)  # column-major per group
    offs = torch.from_numpy(np.cumsum(sizes).astype(np.int32)).to("cuda")
    fn = lambda: torch._grouped_mm(x, w, offs=offs, out_dtype=torch.bfloat16)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def _mgpu_time(x, w, gs, n):
    """JAX's Mosaic-GPU ragged_dot (block 128x128x64, 4 stages), or None."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception:  # noqa: BLE001
        return None
    for bn_grid in (8, 4, 2, 1):
        if n % (bn_grid * 128):
            continue
        try:
            f = functools.partial(
                ragged_dot_mgpu.ragged_dot,
                group_sizes=gs,
                block_m=128,
                block_n=128,
                block_k=64,
                max_concurrent_steps=4,
                grid_block_n=bn_grid,
            )
            return _gpu_time(jax.jit(f), x, w)
        except Exception as e:  # noqa: BLE001
            print(f"mgpu failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return None


def _ours_time(name, x, w, gs, sizes, impl):
    """Seconds of ``api.gmm(implementation=impl)`` if it passes a row-slice check, else None."""
    # Rows [a, b) of the last non-empty group (crosses no boundary) vs an f32 reference.
    last = int(np.nonzero(sizes)[0][-1])
    b_row = int(sizes[: last + 1].sum())
    a_row = max(int(sizes[:last].sum()), b_row - 256)
    want = jnp.dot(x[a_row:b_row].astype(jnp.float32), w[last].astype(jnp.float32))
    f = jax.jit(functools.partial(api.gmm, implementation=impl))
    try:
        got = f(x, w, gs)[a_row:b_row].astype(jnp.float32)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        t = _gpu_time(f, x, w, gs)
    except Exception as e:  # noqa: BLE001
        print(f"{name} {impl} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    print(f"{name} {impl}: {2 * x.size * w.shape[2] / t / 1e12:.0f} TFLOP/s err {err:.1e}")
    return t if err < 2e-2 else None


def _fwd_bwd_times(x, w, gs, c):
    """Seconds of jit(grad(sum(y^2 * c))) through our VJP, and through one dense GEMM whose
    weight is its own [K, N] array (so dense writes a [K, N] gradient, not [G, K, N])."""
    loss = lambda f: jax.jit(
        jax.grad(lambda x_, w_, c_: jnp.sum(jnp.square(f(x_, w_).astype(jnp.float32)) * c_), (0, 1))
    )
    try:
        fb = loss(lambda x_, w_, gs=gs: api.gmm(x_, w_, gs))
        t_fb = _gpu_time(fb, x, w, c, repeats=3, inner=2)
    except Exception as e:  # noqa: BLE001
        print(f"fwd+bwd failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        t_fb = None
    w_dense = w[0]  # a separate [K, N] buffer (the slice is a copy)
    t_dfb = _gpu_time(loss(jnp.dot), x, w_dense, c, repeats=3, inner=2)
    return t_fb, t_dfb


def gpu_table(quick: bool) -> str:
    shapes = GPU_SHAPES
    if quick:
        shapes = {k: (m // 8, kk // 2, n // 2, g) for k, (m, kk, n, g) in GPU_SHAPES.items()}
    routing = "balanced"
    default = api.resolve_implementation(None)
    rows = [
        f"| shape (M,K,N,G) | routing | ours fwd TFLOP/s ({default}) | triton | dense | "
        "ragged_dot | ragged_dot_mgpu | torch._grouped_mm | ours/dense | ours/torch | "
        "ours fwd+bwd TFLOP/s | dense fwd+bwd | fwd+bwd ours/dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rkey = jax.random.PRNGKey(0)
    for name, (m, k, n, g) in shapes.items():
        sizes = group_sizes(m, g, routing)
        k1, k2, k3, rkey = jax.random.split(rkey, 4)
        x = jax.random.normal(k1, (m, k), jnp.bfloat16)
        w = jax.random.normal(k2, (g, k, n), jnp.bfloat16) * jnp.bfloat16(1 / np.sqrt(k))
        c = jax.random.normal(k3, (m, n), jnp.bfloat16)
        gs = jnp.asarray(sizes)
        flops = 2 * m * k * n
        tf = lambda t, flops=flops: f"{flops / t / 1e12:.0f}" if t else "n/a"
        t_ours = _ours_time(name, x, w, gs, sizes, None)
        t_triton = _ours_time(name, x, w, gs, sizes, "triton")
        t_dense = _gpu_time(jax.jit(jnp.dot), x, w[0])
        try:
            if g * m * k * 2 > 40 * 2**30:  # XLA's dense rewrite needs a [G, M, K] operand
                raise MemoryError(f"dense rewrite needs {g * m * k * 2 / 2**30:.0f} GiB")
            rd = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs))
            t_rd = _gpu_time(rd, x, w, gs, repeats=3, inner=1)
        except Exception as e:  # noqa: BLE001
            print(f"ragged_dot failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            t_rd = None
        t_mgpu = _mgpu_time(x, w, gs, n)
        try:
            t_torch = _torch_grouped_mm(x, w, sizes)
        except Exception as e:  # noqa: BLE001
            print(f"torch failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            t_torch = None
        t_fb, t_dfb = _fwd_bwd_times(x, w, gs, c)
        tf3 = lambda t, flops=flops: f"{3 * flops / t / 1e12:.0f}" if t else "n/a"
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
        rows.append(
            f"| {name} ({m},{k},{n},{g}) | {routing} | {tf(t_ours)} | {tf(t_triton)} | "
            f"{tf(t_dense)} | "
            f"{tf(t_rd)} | {tf(t_mgpu)} | {tf(t_torch)} | {ratio(t_dense, t_ours)} | "
            f"{ratio(t_torch, t_ours)} | {tf3(t_fb)} | {tf3(t_dfb)} | {ratio(t_dfb, t_fb)} |"
        )
        print(rows[-1], flush=True)
        del x, w, c
    return "\n".join(rows)


def header(extra: str) -> str:
    return f"{machine_line()} {extra}\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default=None, help="write the table (markdown) to this file")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep")
    args = parser.parse_args()
    if args.gpu:
        table = gpu_table(args.quick)
        text = header("bf16 in, f32 accumulate, TFLOP/s of the forward gmm (2*M*K*N)") + table
    else:
        note = set_malloc(args.malloc)
        table = cpu_table(args.quick)
        text = header(f"fp32, fwd+bwd (3 * 2*M*K*N active FLOPs), medians. {note}") + table
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
