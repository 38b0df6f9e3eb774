"""Shared helpers for the training tests: run `python -m jmoe.train` in a subprocess."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A very small LM so that subprocess runs are dominated by start-up, not training.
SMALL_LM = [
    "--config.model.d_model=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.d_ff=64",
    "--config.model.max_len=32",
    "--config.moe.num_experts=4",
    "--config.moe.d_ff=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.max_bytes=200000",
    "--config.data.eval_batches=2",
    "--config.train.progress_bar=False",
    "--config.train.tensorboard=False",
]


def env():
    """The subprocess environment: the repo on the path, CPU, and one CPU device (jmoe.train's
    mesh spans every device, so the suite's 8 simulated ones would make it 8-way parallel)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("JAX_PLATFORMS", "cpu")
    flags = e.get("XLA_FLAGS", "").split()
    e["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    return e


def train_cmd(config: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jmoe.train",
        f"--config={os.path.join(REPO, 'configs', config)}",
        f"--workdir={workdir}",
        *overrides,
    ]


def run_train(config: str, workdir: str, *overrides: str, timeout: float = 300):
    proc = subprocess.run(
        train_cmd(config, workdir, *overrides),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def load_state(workdir: str, config: str, *overrides: str):
    """The latest checkpoint's TrainState of a run (built from its saved config.json)."""
    from jmoe.sample import load

    return load(workdir)
