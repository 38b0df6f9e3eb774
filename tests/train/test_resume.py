"""Resume exactness and crash safety of `python -m jmoe.train` (subprocesses)."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from tests.train.train_helpers import REPO, SMALL_LM, env, run_train, train_cmd


def _leaves(state):
    return jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]


def _load(workdir):
    from jmoe.sample import load

    cfg, model, state, step = load(workdir)
    return state, step


def test_resume_is_bitwise_exact(tmp_path):
    common = [
        *SMALL_LM,
        "--config.train.steps=20",
        "--config.train.log_every=5",
        "--config.train.eval_every=10",
        "--config.train.checkpoint_every=10",
    ]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train("lm_tiny.py", straight, *common)
    first = run_train("lm_tiny.py", resumed, *common, "--config.train.stop_at_step=10")
    assert "resumed" not in first.stdout + first.stderr
    second = run_train("lm_tiny.py", resumed, *common)
    assert "resumed from step 10" in second.stdout + second.stderr
    a, step_a = _load(straight)
    b, step_b = _load(resumed)
    assert step_a == step_b == 20
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    # The run really trained: params moved away from a fresh initialisation.
    assert int(a.step) == 20


def _spawn(workdir, *overrides):
    return subprocess.Popen(
        train_cmd("lm_tiny.py", workdir, *overrides),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _complete_steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _kill(tmp_path, overrides, wait_for, name):
    """Starts a run, waits for `wait_for`, SIGKILLs it; returns (workdir, names left)."""
    workdir = str(tmp_path / name)
    ckpt = os.path.join(workdir, "checkpoints")
    proc = _spawn(workdir, *overrides)
    try:
        wait_for(ckpt, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return workdir, sorted(os.listdir(ckpt))


def _resume(workdir, overrides):
    ckpt = os.path.join(workdir, "checkpoints")
    done = _complete_steps(ckpt)
    assert done, "no complete checkpoint before the kill"
    last = done[-1]
    state, step = _load(workdir)
    assert step == last and int(state.step) == last
    for _, x in _leaves(state.params):
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    out = run_train("lm_tiny.py", workdir, *overrides, f"--config.train.stop_at_step={last + 1}")
    assert f"resumed from step {last}" in out.stdout + out.stderr
    state2, step2 = _load(workdir)
    assert step2 == last + 1 and int(state2.step) == last + 1
    assert not any("tmp" in n for n in os.listdir(ckpt)), "partial checkpoint not cleaned up"


@pytest.mark.slow
def test_sigkill_during_training_resumes(tmp_path):
    overrides = [
        *SMALL_LM,
        "--config.train.steps=100000",
        "--config.train.checkpoint_every=5",
        "--config.train.eval_every=100000",
        "--config.train.log_every=5",
    ]

    def wait_for(ckpt, proc):
        deadline = time.time() + 240
        while time.time() < deadline:
            if len(_complete_steps(ckpt)) >= 2:
                time.sleep(0.3)  # kill somewhere in the middle of training steps.
                return True
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        raise AssertionError("no checkpoints written in time")

    workdir, _ = _kill(tmp_path, overrides, wait_for, "kill_train")
    _resume(workdir, overrides)


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_resumes(tmp_path):
    # A wider model makes each save take long enough to be caught half-written.
    overrides = [
        *SMALL_LM,
        "--config.model.d_model=256",
        "--config.moe.num_experts=8",
        "--config.moe.d_ff=1024",
        "--config.model.d_ff=1024",
        "--config.train.steps=100000",
        "--config.train.checkpoint_every=2",
        "--config.train.eval_every=100000",
        "--config.train.log_every=2",
        "--config.train.keep_checkpoints=2",
    ]

    def wait_for(ckpt, proc):
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.isdir(ckpt) and _complete_steps(ckpt):
                names = os.listdir(ckpt)
                if any("tmp" in n for n in names):
                    return True
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.001)
        raise AssertionError("never saw a checkpoint being written")

    # The save may finish between seeing its temporary directory and the kill: retry.
    for attempt in range(4):
        workdir, left = _kill(tmp_path, overrides, wait_for, f"kill_save_{attempt}")
        if any("tmp" in n for n in left):
            break
    else:
        pytest.fail("could not kill the run in the middle of a checkpoint save")
    print("checkpoint dir after the kill:", left)
    _resume(workdir, overrides)
