"""Interleaved A/B timing of a short list of Triton gmm / tgmm candidates (GPU).

Usage (on a GPU machine):
  PYTHONUNBUFFERED=1 python3 benchmarks/gmm_gpu_ab.py --out DIR [--rounds 7]
  PYTHONUNBUFFERED=1 python3 benchmarks/gmm_gpu_ab.py --out DIR --before old_gpu.py
  ncu -k regex:jmoe python3 benchmarks/gmm_gpu_ab.py --ncu   # one launch of each default

Sequential sweeps drift (clocks and power change over a minute of back-to-back GEMMs), so
here every round times every candidate once (5 calls after a warm-up, wall clock), in a
shuffled order, and the table reports the median, min and max over the rounds. Problems and
checks are those of ``gmm_gpu_sweep.py``. Candidates: a previous gpu.py with its own defaults
(``--before FILE``), the current defaults, the previous default config, extra configs
(``GMM_CFGS``, ``TGMM_CFGS``), and the dense dot of the same FLOPs.
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from benchmarks.common import machine_line  # noqa: E402
from benchmarks.gmm_gpu_sweep import (  # noqa: E402
    OLD_GMM,
    OLD_TGMM,
    compile_all,
    interleaved_rounds,
    make_problems,
)
from pallas_kernels.gmm import gpu  # noqa: E402

# Extra configs to compare with the defaults (edit to taste).
GMM_CFGS: list[tuple] = []
TGMM_CFGS: list[tuple] = [OLD_TGMM]
BEFORE = None  # the module given by --before (a previous gpu.py), if any


def candidates(p):
    """[(label, jitted fn, args)] for one problem; the first is the baseline of "vs first"."""
    out = []
    if BEFORE is not None:
        if p.kind == "tgmm":
            f = BEFORE.tgmm
        else:
            f = functools.partial(BEFORE.gmm, transpose_rhs=p.kind == "dx")
        out.append(("before (previous gpu.py, its defaults)", jax.jit(f), p.args()))
    m, k = p.x.shape
    g = p.w.shape[0]
    if p.kind == "tgmm":
        n = p.w_dy.shape[1]
        default = tuple(gpu.tgmm_config(m, k, n, g)[key] for key in gpu.TGMM_KEYS)
        for cfg in dict.fromkeys([default, *TGMM_CFGS]):
            label = f"{cfg} (default)" if cfg == default else str(cfg)
            out.append((label, p.fn(cfg), p.args()))
        return out
    n = p.w.shape[1] if p.kind == "dx" else p.w.shape[2]
    config = gpu.gmm_config(m, k, n, g, p.kind == "dx")
    default = tuple(config[key] for key in gpu.GMM_KEYS)
    for cfg in dict.fromkeys([default, OLD_GMM, *GMM_CFGS]):
        label = f"{cfg} (default)" if cfg == default else str(cfg)
        out.append((label, p.fn(cfg), p.args()))
    out.append(("dense", jax.jit(p.dense_fn), (p.x, p.w)))
    return out


def ab(probs, rounds, log):
    cands = {id(p): candidates(p) for p in probs}
    jobs = [((id(p), i), f, a) for p in probs for i, (_, f, a) in enumerate(cands[id(p)])]
    exes = compile_all(jobs)
    errs = {}
    for p in probs:
        for i, (label, _, args) in enumerate(cands[id(p)]):
            exe = exes[(id(p), i)]
            if isinstance(exe, Exception) or label == "dense":
                errs[(id(p), i)] = None if label == "dense" else f"compile: {str(exe)[:120]}"
                continue
            errs[(id(p), i)] = p.err(exe(*args))
    times = interleaved_rounds(probs, cands, exes, rounds)
    lines = []
    for p in probs:
        first = times[(id(p), 0)]
        base = statistics.median(first) if first else float("nan")
        lines += [
            f"\n{p.name} {p.kind}",
            "| candidate | TFLOP/s median | min | max | vs first | err |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for i, (label, _, _) in enumerate(cands[id(p)]):
            ts = times[(id(p), i)]
            if not ts:
                lines.append(f"| {label} | failed | | | | {errs[(id(p), i)]} |")
                continue
            tf = sorted(p.flops / t / 1e12 for t in ts)
            med = statistics.median(ts)
            e = errs[(id(p), i)]
            rec = dict(problem=p.name, kind=p.kind, label=label, tflops=tf, err=e)
            log.write(json.dumps(rec) + "\n")
            e_txt = f"{e:.1e}" if isinstance(e, float) else str(e)
            lines.append(
                f"| {label} | {p.flops / med / 1e12:.0f} | {tf[0]:.0f} | {tf[-1]:.0f} | "
                f"{base / med:.3f} | {e_txt} |"
            )
    return "\n".join(lines)


def ncu_targets(probs):
    """One launch of each default kernel (run under ``ncu -k regex:jmoe``)."""
    for p in probs:
        f, args = candidates(p)[0][1:]
        jax.block_until_ready(f(*args))
        print(f"launched {p.name} {p.kind}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before", default=None, help="a previous gpu.py to compare with")
    args = parser.parse_args()
    if args.before:
        global BEFORE
        spec = importlib.util.spec_from_file_location("gpu_before", args.before)
        BEFORE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(BEFORE)
    probs = make_problems(args.quick, ("DeepSeek", "OLMoE") if args.ncu else None)
    if args.ncu:
        ncu_targets(probs)
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab.jsonl"), "w") as log:
        text = machine_line() + "\n" + ab(probs, args.rounds, log)
    with open(os.path.join(args.out, "ab.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
