"""`python -m jmoe.train` as several JAX processes (jmoe.launch, gloo on CPU): the same loss
curve as one process, checkpoints that restore under other process counts, and a killed
process that ends the run and a rerun that resumes. Each run takes 0.5-1.5 min on 2 cores."""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest

from tests.multiprocess.mp_helpers import (
    REPO,
    Launched,
    alive,
    child_pids,
    launch_cmd,
    run,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 20
# A 1-layer byte LM with 8 experts over an 8-way `expert` axis: the all-to-all crosses
# processes in every multi-process layout.
ARGS = [
    "--config.model.d_model=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.d_ff=64",
    "--config.model.max_len=32",
    "--config.moe.num_experts=8",
    "--config.moe.d_ff=32",
    "--config.moe.expert_axis=expert",
    "--config.mesh.expert=8",
    "--config.data.seq_len=32",
    "--config.data.batch_size=16",
    "--config.data.max_bytes=200000",
    "--config.data.eval_batches=2",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    f"--config.train.eval_every={STEPS}",
    "--config.train.checkpoint_every=10",
    "--config.train.keep_checkpoints=5",
    "--config.train.progress_bar=False",
    "--config.train.tensorboard=False",
]


def train_cmd(workdir, *extra) -> list[str]:
    config = os.path.join(REPO, "configs", "lm_tiny.py")
    cmd = [sys.executable, "-m", "jmoe.train", f"--config={config}", f"--workdir={workdir}"]
    return [*cmd, *ARGS, *extra]


def ok(proc):
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def curve(workdir) -> dict[int, float]:
    """{step: training cross-entropy} from metrics.jsonl (later rows replace earlier ones)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                out[row["step"]] = row["ce"]
    return out


def assert_same_curve(a: dict, b: dict, steps):
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
    """1 process x 8 CPU devices (the suite's XLA_FLAGS), no jax.distributed."""
    wd = tmp_path_factory.mktemp("one_by_eight")
    ok(run(train_cmd(wd)))
    return wd


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory):
    wd = tmp_path_factory.mktemp("two_by_four")
    proc = ok(run(launch_cmd(2, 4, *train_cmd(wd, "--config.train.progress_bar=True"))))
    return wd, proc


def test_two_processes_give_the_one_process_loss_curve(one_by_eight, two_by_four):
    wd, proc = two_by_four
    single, multi = curve(one_by_eight), curve(wd)
    assert sorted(multi) == list(range(1, STEPS + 1))
    assert_same_curve(single, multi, range(1, STEPS + 1))
    # Metrics, files and the progress bar come from process 0 only.
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert sum('"split": "train"' in line for line in f) == STEPS
    assert "[p0] heldout_loss=" in proc.stdout and "[p1] heldout_loss" not in proc.stdout
    assert "[p0] train:" in proc.stderr and "[p1] train:" not in proc.stderr
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]


def test_sampling_restores_a_two_process_checkpoint_on_one_device(two_by_four):
    cmd = [sys.executable, "-m", "jmoe.sample", f"--workdir={two_by_four[0]}", "--num_tokens=8"]
    proc = ok(run([*cmd, "--temperature=0"]))
    assert "[step 20]" in proc.stdout


@pytest.mark.parametrize("processes,devices", [(1, 8), (4, 2)])
def test_checkpoint_of_two_processes_resumes_in_other_process_counts(
    one_by_eight, two_by_four, tmp_path, processes, devices
):
    """Resume from the step-10 checkpoint the 2 x 4 run wrote, in 1 x 8 and in 4 x 2."""
    wd = tmp_path / "run"
    shutil.copytree(two_by_four[0], wd)
    shutil.rmtree(wd / "checkpoints" / "20")
    os.remove(wd / "metrics.jsonl")
    cmd = train_cmd(wd)
    proc = ok(run(cmd if processes == 1 else launch_cmd(processes, devices, *cmd)))
    assert "resumed from step 10" in proc.stdout
    assert sorted(curve(wd)) == list(range(11, STEPS + 1))
    assert_same_curve(curve(one_by_eight), curve(wd), range(11, STEPS + 1))


def test_resume_with_a_mesh_that_does_not_fit_fails_clearly(two_by_four, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(two_by_four[0], wd)
    proc = run(launch_cmd(2, 2, *train_cmd(wd, f"--config.train.steps={STEPS + 5}")))
    assert proc.returncode != 0
    assert "config.mesh (data=-1, fsdp=1, expert=8, tensor=1) does not fit the 4 devices" in (
        proc.stderr
    )


def test_killed_process_ends_the_run_and_the_rerun_resumes(two_by_four, tmp_path):
    wd = tmp_path / "run"
    cmd = launch_cmd(2, 4, *train_cmd(wd, "--config.train.checkpoint_every=5"))
    first = Launched(cmd)
    try:
        ckpt = wd / "checkpoints" / "10"
        wait_for(ckpt.exists, 600, "the step-10 checkpoint", poll=0.05)
        pids = child_pids(first.stderr)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        rc = first.wait(120)
        ended_after = time.monotonic() - t0
    finally:
        first.kill()
    assert rc == 128 + signal.SIGKILL, first.stderr[-3000:]
    assert "process 1 was killed by SIGKILL: ending the others" in first.stderr
    assert not alive(pids[0])
    print(f"launcher exited {ended_after:.2f} s after process 1 was killed")
    assert ended_after < 30
    done = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
    last = max(done)
    assert 10 <= last < STEPS
    second = ok(run(cmd))
    assert f"resumed from step {last}" in second.stdout
    assert_same_curve(curve(two_by_four[0]), curve(wd), range(last + 1, STEPS + 1))
