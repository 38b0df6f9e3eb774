"""One-call GPU sweep of the Triton gmm / tgmm tile configs at the GPU benchmark shapes.

Usage (on a GPU machine):
  PYTHONUNBUFFERED=1 python3 benchmarks/gmm_gpu_sweep.py --out DIR [--budget SECONDS] [--quick]

Problems, per shape of ``benchmarks/gmm.py``'s GPU table (balanced routing, bf16):
  fwd   ``x[M,K] @ w[g]``                  (gpu.gmm)
  dx    ``dy[M,N] @ w[g]^T``               (gpu.gmm, transpose_rhs: the d lhs product)
  tgmm  ``x[rows of g]^T @ dy[rows of g]`` (gpu.tgmm: the d rhs product)
Phases: (1) tile / warps / stages grid for fwd and dx at group_m 8; (2) tgmm grid; (3) group_m
4 / 16 / 32 on the two best configs of phase 1. Each phase is compiled ahead of time in a
thread pool, then timed alone (median of 5 x 3 calls, wall clock after a warm-up). Sequential
timings drift by several percent over a run: confirm close calls with gmm_gpu_ab.py. Every
config is checked on rows that cross a group boundary and the last rows (tgmm: the first and
last group) against an f32 reference; configs over 2e-2 relative error are never picked.
Writes ``DIR/sweep.jsonl`` (one record per config) and ``DIR/sweep.md`` (best per problem).
"""

import argparse
import concurrent.futures as cf
import functools
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine_line, timeit  # noqa: E402
from benchmarks.gmm import GPU_SHAPES, group_sizes  # noqa: E402
from pallas_kernels.gmm import gpu  # noqa: E402

SMEM = 232_448  # H100 shared memory per block (bytes)
OLD_GMM = (128, 256, 64, 8, 8, 3)  # last session's default
OLD_TGMM = (64, 128, 128, 8, 3)


def _stages(per_stage: int) -> list[int]:
    """Stages 3-5 that fit in shared memory; 2 only when 3 does not fit."""
    fit = [s for s in (3, 4, 5) if per_stage * s <= SMEM]
    return fit or ([2] if 2 * per_stage <= SMEM else [])


def gmm_grid() -> list[tuple]:
    """(block_m, block_n, block_k, group_m, warps, stages), accumulator <= 128 regs/thread."""
    out = []
    for bm, bn in ((64, 128), (64, 256), (128, 128), (128, 256), (256, 128)):
        for bk in (64, 128):
            for warps in (4, 8):
                if bm * bn // (32 * warps) > 128:
                    continue
                for st in _stages((bm * bk + bk * bn) * 2):
                    out.append((bm, bn, bk, 8, warps, st))
    return out


def tgmm_grid() -> list[tuple]:
    """(block_m, block_k, block_n, warps, stages)."""
    out = []
    for bk, bn in ((128, 128), (128, 256), (256, 128)):
        for bm in (32, 64, 128):
            for warps in (4, 8):
                if bk * bn // (32 * warps) > 128:
                    continue
                for st in _stages((bm * bk + bm * bn) * 2)[:2]:
                    out.append((bm, bk, bn, warps, st))
    return out


class Problem:
    """One (shape, kind) with its inputs on device, f32 reference and jitted error check."""

    def __init__(self, name, kind, x, w, gs_np, dense_fn):
        self.name, self.kind, self.x, self.w = name, kind, x, w
        self.gs_np, self.gs = gs_np, jnp.asarray(gs_np)
        m, k = x.shape
        g = w.shape[0]
        n = w.shape[1] if kind == "dx" else w.shape[2]
        self.flops = 2 * m * k * n
        self.dense_fn = dense_fn
        cum = np.cumsum(gs_np)
        if kind == "tgmm":
            self.flops = 2 * m * w.shape[1] * w.shape[2]
            self.check_groups = [0, g - 1]
        else:
            mid = int(cum[g // 2 - 1]) if g > 1 else m // 2
            rows = np.r_[np.arange(max(mid - 128, 0), min(mid + 128, m)), np.arange(m - 128, m)]
            self.rows = jnp.asarray(rows)
            self.gid = np.searchsorted(cum, rows, side="right")
            self.ref = None  # computed on first use

    def _ref_rows(self, rows, gid):
        x32 = self.x[jnp.asarray(rows)].astype(jnp.float32)
        parts = []
        for g in np.unique(gid):
            sel = jnp.asarray(np.nonzero(gid == g)[0])
            wg = self.w[int(g)].astype(jnp.float32)
            parts.append(x32[sel] @ (wg.T if self.kind == "dx" else wg))
        return jnp.concatenate(parts)

    def err(self, out) -> float:
        if self.kind != "tgmm":
            if self.ref is None:
                self.ref = self._ref_rows(np.asarray(self.rows), self.gid)
            got = out[self.rows].astype(jnp.float32)
            return float(jnp.linalg.norm(got - self.ref) / jnp.linalg.norm(self.ref))
        errs = []
        cum = np.r_[0, np.cumsum(self.gs_np)]
        dy = self.w_dy
        for g in self.check_groups:
            a, b = int(cum[g]), int(cum[g + 1])
            if a == b:  # an empty group: its gradient must be zero
                errs.append(float(jnp.max(jnp.abs(out[g].astype(jnp.float32)))))
                continue
            want = self.x[a:b].astype(jnp.float32).T @ dy[a:b].astype(jnp.float32)
            got = out[g].astype(jnp.float32)
            errs.append(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
        return max(errs)

    def fn(self, cfg):
        if self.kind == "tgmm":
            return jax.jit(
                functools.partial(gpu.tgmm, **dict(zip(gpu.TGMM_KEYS, cfg, strict=True)))
            )
        blocks = dict(zip(gpu.GMM_KEYS, cfg, strict=True))
        return jax.jit(functools.partial(gpu.gmm, transpose_rhs=self.kind == "dx", **blocks))

    def args(self):
        return (self.x, self.w_dy if self.kind == "tgmm" else self.w, self.gs)


def make_problems(quick: bool, names=None, routing: str = "balanced") -> list[Problem]:
    """fwd, dx and tgmm problems of each GPU shape (those whose name starts with one of
    ``names``, if given), with ``routing``'s group sizes (``benchmarks.gmm.group_sizes``)."""
    probs = []
    key = jax.random.PRNGKey(0)
    for name, (m, k, n, g) in GPU_SHAPES.items():
        if names and not name.startswith(tuple(names)):
            continue
        if quick:
            m, k, n = m // 8, k // 2, n // 2
        k1, k2, k3, key = jax.random.split(key, 4)
        x = jax.random.normal(k1, (m, k), jnp.bfloat16)
        w = (jax.random.normal(k2, (g, k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
        dy = jax.random.normal(k3, (m, n), jnp.bfloat16)
        gs_np = group_sizes(m, g, routing)
        label = f"{name} ({m},{k},{n},{g})"
        probs.append(Problem(label, "fwd", x, w, gs_np, lambda x, w: jnp.dot(x, w[0])))
        dense_dx = lambda x, w: jnp.dot(x, w[0].T)
        probs.append(Problem(label, "dx", dy, w, gs_np, dense_dx))
        t = Problem(label, "tgmm", x, w, gs_np, None)
        t.w_dy = dy
        probs.append(t)
    return probs


def compile_all(jobs, workers=14):
    """jobs: list of (key, jitted fn, args) -> {key: compiled or exception}."""

    def one(job):
        key, f, args = job
        try:
            return key, f.lower(*args).compile()
        except Exception as e:  # noqa: BLE001
            return key, e

    with cf.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, jobs))


def interleaved_rounds(probs, cands, exes, rounds, after_problem=None):
    """Times every compiled candidate once per round (5 calls), in a shuffled order per
    problem; ``after_problem(p)`` runs after each problem's candidates. Returns
    ``{(id(p), i): [seconds per round]}`` (empty for candidates that failed to compile)."""
    times = {key: [] for key in exes}
    rng = random.Random(0)
    for r in range(rounds):
        for p in probs:
            order = list(range(len(cands[id(p)])))
            rng.shuffle(order)
            for i in order:
                exe = exes[(id(p), i)]
                if not isinstance(exe, Exception):
                    times[(id(p), i)].append(timeit(exe, *cands[id(p)][i][2], repeats=1, inner=5))
            if after_problem is not None:
                after_problem(p)
        print(f"round {r} done", flush=True)
    return times


def run_phase(title, jobs, log, deadline):
    """jobs: list of (problem, cfg). Compiles all, then times each; returns records."""
    t0 = time.time()
    compiled = compile_all([((i,), p.fn(c), p.args()) for i, (p, c) in enumerate(jobs)])
    print(f"[{title}] compiled {len(jobs)} in {time.time() - t0:.0f}s", flush=True)
    recs = []
    for i, (p, cfg) in enumerate(jobs):
        rec = dict(problem=p.name, kind=p.kind, cfg=cfg)
        exe = compiled[(i,)]
        if time.time() > deadline:
            rec["error"] = "skipped: budget"
        elif isinstance(exe, Exception):
            rec["error"] = f"compile: {type(exe).__name__}: {str(exe)[:200]}"
        else:
            try:
                rec["err"] = p.err(exe(*p.args()))
                t = timeit(exe, *p.args(), repeats=5, inner=3)
                rec["ms"], rec["tflops"] = t * 1e3, p.flops / t / 1e12
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"run: {type(e).__name__}: {str(e)[:200]}"
        recs.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    print(f"[{title}] done at {time.time() - t0:.0f}s", flush=True)
    return recs


def ok(r):
    return "tflops" in r and r["err"] < 2e-2


def best(recs, p, n=1):
    mine = [r for r in recs if r["problem"] == p.name and r["kind"] == p.kind and ok(r)]
    return sorted(mine, key=lambda r: -r["tflops"])[:n]


def side_timings(probs, log):
    """TFLOP/s of the dense dot of the same FLOPs, per (problem, kind)."""
    out = {}
    for p in probs:
        if p.kind == "tgmm":
            continue
        t = timeit(jax.jit(p.dense_fn), p.x, p.w, repeats=5, inner=3)
        out[(p.name, p.kind)] = p.flops / t / 1e12
        log.write(json.dumps(dict(problem=p.name, kind=p.kind, dense_tflops=out[p.name, p.kind])))
        log.write("\n")
    return out


def summary(probs, recs, dense) -> str:
    lines = [
        "| problem | kind | dense TFLOP/s | old default | best | best config | 2nd | 3rd |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in probs:
        old = OLD_TGMM if p.kind == "tgmm" else OLD_GMM
        olds = [r for r in recs if r["problem"] == p.name and r["kind"] == p.kind]
        olds = [r for r in olds if tuple(r["cfg"]) == old and ok(r)]
        top = best(recs, p, 3)
        cell = lambda r: f"{r['tflops']:.0f} {tuple(r['cfg'])}" if r else "-"
        d = dense.get((p.name, p.kind))
        num = lambda v: f"{v:.0f}" if v else "-"
        top += [None] * (3 - len(top))
        cols = [
            p.name,
            p.kind,
            num(d),
            num(olds[0]["tflops"] if olds else None),
            num(top[0]["tflops"] if top[0] else None),
            str(tuple(top[0]["cfg"])) if top[0] else "-",
            cell(top[1]),
            cell(top[2]),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before skipping")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    os.makedirs(args.out, exist_ok=True)
    print(machine_line(), flush=True)
    probs = make_problems(args.quick)
    mm = [p for p in probs if p.kind != "tgmm"]
    tg = [p for p in probs if p.kind == "tgmm"]
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as log:
        dense = side_timings(probs, log)
        start, span = time.time(), deadline - time.time()
        jobs = [(p, c) for p in mm for c in gmm_grid()]
        recs = run_phase("gmm grid", jobs, log, start + 0.55 * span)
        jobs = [(p, c) for p in tg for c in tgmm_grid()]
        recs += run_phase("tgmm grid", jobs, log, start + 0.8 * span)
        jobs = []
        for p in mm:
            for r in best(recs, p, 2):
                bm, bn, bk, _, nw, ns = r["cfg"]
                jobs += [(p, (bm, bn, bk, gm, nw, ns)) for gm in (4, 16, 32)]
        recs += run_phase("group_m", jobs, log, deadline)
    text = machine_line() + "\n\n" + summary(probs, recs, dense)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
