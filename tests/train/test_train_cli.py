"""End-to-end training runs through `python -m jmoe.train`, plus plot and sample."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.train.train_helpers import REPO, env, run_train


def _run_module(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _final(workdir):
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        return json.load(f)


def test_digits_moe_reaches_97_percent(tmp_path):
    workdir = str(tmp_path / "digits")
    t0 = time.time()
    run_train("digits_moe.py", workdir, "--config.train.progress_bar=False")
    m = _final(workdir)
    print(
        f"digits held-out accuracy {m['heldout_accuracy']:.4f} "
        f"({m['heldout_examples']} examples) in {time.time() - t0:.1f}s"
    )
    assert m["heldout_accuracy"] >= 0.97


@pytest.mark.slow
def test_lm_tiny_beats_unigram_by_25_percent_in_2_minutes(tmp_path):
    workdir = str(tmp_path / "tiny")
    t0 = time.time()
    run_train("lm_tiny.py", workdir, "--config.train.progress_bar=False")
    elapsed = time.time() - t0
    m = _final(workdir)
    ratio = m["heldout_loss"] / m["unigram_entropy"]
    print(
        f"lm_tiny: held-out loss {m['heldout_loss']:.4f} nats/byte, byte-unigram "
        f"held-out entropy {m['unigram_entropy']:.4f}, ratio {ratio:.3f}, "
        f"{m['tokens_per_s']:.0f} tokens/s, {elapsed:.1f}s wall"
    )
    assert ratio <= 0.75
    assert elapsed < 120
    # Metrics, TensorBoard events, plots and KV-cache sampling from the same run.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if r["split"] == "train"]
    for key in (
        "ce",
        "lr",
        "tokens_per_s",
        "moe/layer_0/expert_load",
        "moe/layer_0/dropped_fraction",
        "moe/layer_0/experts_per_token_mean",
        "moe/layer_0/router_entropy",
    ):
        assert key in train_rows[-1], key
    assert any(r["split"] == "heldout" for r in rows)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(f"{workdir}/tb"))
    out = _run_module("jmoe.plot", workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("loss.png", "expert_load.png", "experts_per_token.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", name)) > 1000
    out = _run_module(
        "jmoe.sample", f"--workdir={workdir}", "--prompt=def ", "--num_tokens=40", "--temperature=0"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    assert "def " in out.stdout and len(out.stdout.strip()) > 20
