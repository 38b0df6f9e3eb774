"""`jmoe.summary`: total / active parameter counts of the real-scale configs vs published."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jmoe.summary import summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published (total, active) in billions, given to 2-3 significant figures.
PUBLISHED = {
    "mixtral_8x7b": (46.7, 12.9),
    "olmoe_1b_7b": (6.9, 1.3),
    "qwen3_30b_a3b": (30.5, 3.3),
}


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _close(count: float, published: float) -> bool:
    """Within 1%, or equal to the published figure at its printed precision of 0.1B.

    The active counts are published with two significant figures: OLMoE's exact 1.282B is
    printed as 1.3B (rounded, -1.4%) and Qwen3's exact 3.353B as 3.3B (truncated, +1.6%).
    """
    at_precision = round(count, 1) == published or int(count * 10) / 10 == published
    return abs(count - published) <= 0.01 * published or at_precision


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_published(name):
    c = summarize(_config(name))
    total, active = c["total"] / 1e9, c["active"] / 1e9
    pub_total, pub_active = PUBLISHED[name]
    print(
        f"{name}: total {total:.3f}B (published {pub_total}B), "
        f"active {active:.3f}B (published {pub_active}B)"
    )
    assert abs(total - pub_total) <= 0.01 * pub_total
    assert _close(active, pub_active)


def test_mixtral_exact_and_cli():
    c = summarize(_config("mixtral_8x7b"))
    # 32 layers x (attention 4096*(4096+2*1024+4096) + 8 SwiGLU experts 3*4096*14336
    # + router 4096*8 + 2 norms 4096) + embed/unembed 2*32000*4096 + final norm 4096.
    layer = 4096 * 10240 + 8 * 3 * 4096 * 14336 + 4096 * 8 + 2 * 4096
    assert c["total"] == 32 * layer + 2 * 32000 * 4096 + 4096
    assert c["active"] == c["total"] - 32 * 6 * 3 * 4096 * 14336
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jmoe.summary",
            f"--config={REPO}/configs/mixtral_8x7b.py",
            "--config.moe.num_experts=16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "total" in out.stdout and "active" in out.stdout
    total16 = 32 * (layer + 8 * 3 * 4096 * 14336 + 4096 * 8) + 2 * 32000 * 4096 + 4096
    assert f"{total16:,d}" in out.stdout


def test_unknown_override_fails_fast():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jmoe.summary",
            f"--config={REPO}/configs/mixtral_8x7b.py",
            "--config.moe.num_expertz=16",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode != 0 and "num_expertz" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jmoe.summary",
            f"--config={REPO}/configs/mixtral_8x7b.py",
            "--config.moe.num_experts=many",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode != 0 and "num_experts" in out.stderr
