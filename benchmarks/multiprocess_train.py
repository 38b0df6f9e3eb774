"""`python -m jmoe.train` as 1, 2 and 4 JAX processes on this machine: step time per layout
and the all-to-all bytes of one training step (from the compiled program).

    python benchmarks/multiprocess_train.py [--steps 40] [--layouts 1x8,2x4,4x2]

Every layout trains `configs/lm_tiny.py` with 8 experts over an 8-way `expert` mesh axis
(8 CPU devices in all), so the compiled program is the same and only the process split
changes. Step time = global tokens per step / the logged tokens/s (median over log windows
after the first). The all-to-all bytes are read from the optimised HLO of the train step:
each `all-to-all` instruction's per-device result, times the 8 devices, and the share that
crosses a process boundary for each layout.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
OVERRIDES = {
    "moe.num_experts": 8,
    "moe.expert_axis": "expert",
    "mesh.expert": DEVICES,
    "train.log_every": 5,
    "train.eval_every": 10_000,
    "train.checkpoint_every": 10_000,
    "train.progress_bar": False,
    "train.tensorboard": False,
}
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


def _env(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_layout(processes: int, devices: int, steps: int) -> dict:
    """Trains `steps` steps as `processes` x `devices`; step times from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as wd:
        cfg = os.path.join(ROOT, "configs", "lm_tiny.py")
        flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
        cmd = [sys.executable, "-m", "jmoe.train", f"--config={cfg}", f"--workdir={wd}", *flags]
        cmd.append(f"--config.train.steps={steps}")
        if processes > 1:
            launch = [sys.executable, "-m", "jmoe.launch", f"--processes={processes}"]
            cmd = [*launch, f"--devices-per-process={devices}", "--", *cmd]
        proc = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{processes}x{devices} failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(wd, "config.json")) as f:
            data = json.load(f)["data"]
    tokens = data["batch_size"] * data["seq_len"]
    times = [tokens / r["tokens_per_s"] for r in rows if r["split"] == "train"][1:]
    return {"layout": f"{processes}x{devices}", "step_ms": 1e3 * statistics.median(times)}


def _hlo_a2a_bytes(hlo: str) -> list[int]:
    """Per-device result bytes of every all-to-all instruction in an HLO module's text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-to-all\(", line)
        if not m:
            continue
        total = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES[dtype]
        out.append(total)
    return out


def a2a_bytes() -> list[int]:
    """All-to-all result bytes per device of the compiled train step (8 local devices)."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    import jax

    from configs.lm_tiny import get_config
    from jmoe import models
    from jmoe.train import data, optim, parallel, step

    cfg = get_config()
    cfg.unlock()
    for k, v in OVERRIDES.items():
        section, field = k.split(".")
        cfg[section][field] = v
    mesh = parallel.build_mesh(cfg)
    with jax.set_mesh(mesh):
        ds, _, _ = data.make_data(cfg, cfg.seed)
        example = ds[0]
        model = models.build(cfg)
        tx, _ = optim.make_optimizer(cfg)
        sh = parallel.state_shardings(model, tx, example, cfg.seed, mesh)
        state = parallel.abstract_state(model, tx, example, cfg.seed, sh)
        batch = parallel.global_batch(mesh, example, cfg.data.batch_size)
        fn = parallel.jit_train_step(step.make_train_step(model, tx, cfg), sh, mesh)
        return _hlo_a2a_bytes(fn.lower(state, batch).compile().as_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--layouts", default="1x8,2x4,4x2")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    per_device = a2a_bytes()
    step_bytes = sum(per_device) * DEVICES
    print(f"all-to-alls per step: {len(per_device)}; per device {sum(per_device)} B;")
    print(f"  all devices {step_bytes} B per step")
    for layout in args.layouts.split(","):
        p, d = (int(x) for x in layout.split("x"))
        r = run_layout(p, d, args.steps)
        # A device keeps 1/8 of each all-to-all, sends (d - 1)/8 within its process and
        # (8 - d)/8 to other processes.
        cross = step_bytes * (DEVICES - d) // DEVICES
        print(f"{r['layout']}: step {r['step_ms']:.1f} ms (median), cross-process a2a {cross} B")


if __name__ == "__main__":
    main()
