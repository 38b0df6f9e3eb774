"""Interleaved A/B of the Mosaic-GPU (Hopper) gmm against the Triton kernel, dense and torch.

Usage (on a Hopper GPU): PYTHONUNBUFFERED=1 python3 benchmarks/gmm_mgpu_ab.py --out DIR
  [--rounds N] [--kinds fwd,dx,tgmm] [--routing balanced|random|skewed|empty]

For the forward and d lhs products of each GPU shape (``benchmarks.gmm.GPU_SHAPES``,
balanced routing unless ``--routing`` says otherwise), and the weight-gradient product:
every round times every candidate once (5 calls after a warm-up), in a
shuffled order; the table gives the median TFLOP/s over the rounds, the ratio to the Triton
kernel, and two checks: the relative error of sampled rows against an f32 reference, and the
relative difference of the whole output from the Triton kernel's. The weight-gradient
product (tgmm) compares the Triton ``tgmm``, our Hopper ``tgmm`` (``mosaic_gpu_tgmm``, its
configs in ``TGMM_CONFIGS``) and JAX's ``transposed_ragged_dot_mgpu``.
"""

import argparse
import dataclasses
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import machine_line  # noqa: E402
from benchmarks.gmm import ROUTINGS, _torch_grouped_mm  # noqa: E402
from benchmarks.gmm_gpu_sweep import compile_all, interleaved_rounds, make_problems  # noqa: E402
from pallas_kernels.gmm import gpu, mosaic_gpu, mosaic_gpu_tgmm  # noqa: E402

BASE = mosaic_gpu.Config()
# Candidate configs (edit to taste): label -> Config.
CONFIGS = {
    "mosaic default": BASE,
    "mosaic release 1 (races, see Config)": dataclasses.replace(BASE, delay_release=1),
    "mosaic width 4": dataclasses.replace(BASE, grid_tile_width=4),
    "mosaic width 2": dataclasses.replace(BASE, grid_tile_width=2),
}
# JAX's own Mosaic-GPU transposed ragged dot (the tgmm product): (block_m, block_n, block_k,
# max_concurrent_steps, grid_block_n); its M/N are our K/N, its ragged K our rows.
TGMM_MGPU = [(128, 128, 64, 4, 1), (128, 128, 64, 4, 4), (128, 256, 64, 3, 1)]
# Our Hopper tgmm (pallas_kernels/gmm/mosaic_gpu_tgmm.py): label -> TgmmConfig.
TGMM_BASE = mosaic_gpu_tgmm.TgmmConfig()
TGMM_CONFIGS = {
    "hopper tgmm default": TGMM_BASE,
    "hopper tgmm 4 stages": dataclasses.replace(TGMM_BASE, max_concurrent_steps=4),
    "hopper tgmm 2 stages": dataclasses.replace(TGMM_BASE, max_concurrent_steps=2),
    "hopper tgmm width 2": dataclasses.replace(TGMM_BASE, grid_tile_width=2),
    "hopper tgmm plain epilogue": dataclasses.replace(TGMM_BASE, swizzle_epilogue=False),
}


def _tgmm_mgpu(x, dy, gs, cfg):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd

    bm, bn, bk, steps, gbn = cfg
    return trd.transposed_ragged_dot(
        x,
        dy,
        group_sizes=gs,
        block_m=bm,
        block_n=bn,
        block_k=bk,
        max_concurrent_steps=steps,
        grid_block_n=gbn,
    )


def candidates(p):
    if p.kind == "tgmm":
        out = [("triton tgmm", jax.jit(gpu.tgmm), p.args())]
        for label, cfg in TGMM_CONFIGS.items():
            f = functools.partial(
                mosaic_gpu_tgmm.tgmm_kernel,
                num_groups=p.w.shape[0],
                out_dtype=None,
                cfg=cfg,
                num_sms=mosaic_gpu.num_sms(),
            )
            out.append((label, jax.jit(f), p.args()))
        for cfg in TGMM_MGPU:
            f = jax.jit(functools.partial(_tgmm_mgpu, cfg=cfg))
            out.append((f"jax transposed_ragged_dot_mgpu {cfg}", f, p.args()))
        return out
    dx = p.kind == "dx"
    out = [("triton", jax.jit(functools.partial(gpu.gmm, transpose_rhs=dx)), p.args())]
    for label, cfg in CONFIGS.items():
        f = functools.partial(
            mosaic_gpu.gmm_kernel,
            transpose_rhs=dx,
            out_dtype=None,
            cfg=cfg,
            num_sms=mosaic_gpu.num_sms(),
        )
        out.append((label, jax.jit(f), p.args()))
    out.append(("dense", jax.jit(p.dense_fn), (p.x, p.w)))
    return out


def _check_outputs(probs, cands, exes):
    """Runs every compiled candidate once: "row err / diff vs triton" per (problem, candidate)
    key, or why it failed; a candidate that fails to run has its executable replaced by the
    error in ``exes``."""
    checks = {}
    for p in probs:
        base_out = None
        for i, (label, _, a) in enumerate(cands[id(p)]):
            exe = exes[(id(p), i)]
            if isinstance(exe, Exception):
                print(f"{p.name} {p.kind} {label}: compile failed:\n{str(exe)[:3000]}", flush=True)
                checks[(id(p), i)] = "compile failed"
                continue
            if label == "dense":
                checks[(id(p), i)] = ""
                continue
            try:
                out = exe(*a)
                err = p.err(out)
                if base_out is None:
                    base_out, diff = out, 0.0
                else:
                    d = (out.astype(jnp.float32) - base_out.astype(jnp.float32)).ravel()
                    diff = float(jnp.linalg.norm(d) / jnp.linalg.norm(base_out.astype(jnp.float32)))
                checks[(id(p), i)] = f"{err:.1e} / {diff:.1e}"
            except Exception as e:  # noqa: BLE001
                print(f"{p.name} {p.kind} {label}: run failed:\n{str(e)[:3000]}", flush=True)
                exes[(id(p), i)] = e
                checks[(id(p), i)] = "run failed"
        print(f"checked {p.name} {p.kind}", flush=True)
    return checks


def _tables(probs, cands, times, torch_times, checks):
    """One markdown table per problem, under the machine line."""
    lines = [machine_line()]
    for p in probs:
        lines += [
            f"\n{p.name} {p.kind}",
            "| candidate | TFLOP/s median | min | max | vs triton | row err / diff vs triton |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        base = statistics.median(times[(id(p), 0)]) if times[(id(p), 0)] else float("nan")
        rows = [
            (label, times[(id(p), i)], checks[(id(p), i)])
            for i, (label, _, _) in enumerate(cands[id(p)])
        ]
        if torch_times[id(p)]:
            rows.append(("torch._grouped_mm", torch_times[id(p)], ""))
        for label, ts, chk in rows:
            if not ts:
                lines.append(f"| {label} | failed | | | | {chk} |")
                continue
            tf = sorted(p.flops / t / 1e12 for t in ts)
            med = statistics.median(ts)
            lines.append(
                f"| {label} | {p.flops / med / 1e12:.0f} | {tf[0]:.0f} | {tf[-1]:.0f} | "
                f"{base / med:.3f} | {chk} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--kinds", default="fwd,dx,tgmm", help="products to time (comma list of fwd, dx, tgmm)"
    )
    parser.add_argument("--routing", default="balanced", choices=ROUTINGS)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = set(kinds) - {"fwd", "dx", "tgmm"}
    if unknown:
        parser.error(f"--kinds: unknown {sorted(unknown)}; allowed fwd, dx, tgmm")
    probs = [p for p in make_problems(args.quick, routing=args.routing) if p.kind in kinds]
    cands = {id(p): candidates(p) for p in probs}
    jobs = [((id(p), i), f, a) for p in probs for i, (_, f, a) in enumerate(cands[id(p)])]
    exes = compile_all(jobs, workers=8)
    checks = _check_outputs(probs, cands, exes)
    torch_times = {id(p): [] for p in probs}

    def torch_round(p):
        if p.kind == "fwd":
            try:
                torch_times[id(p)].append(_torch_grouped_mm(p.x, p.w, p.gs_np, 1, 5))
            except Exception as e:  # noqa: BLE001
                print(f"torch failed: {e}", flush=True)

    times = interleaved_rounds(probs, cands, exes, args.rounds, torch_round)
    text = _tables(probs, cands, times, torch_times, checks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mgpu_ab.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
