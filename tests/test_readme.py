"""The README's commands and code example stay true."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    m = re.search(r"loss ([\d.]+) -> ([\d.]+)", out.stdout)
    assert m, out.stdout
    assert float(m.group(2)) < 0.8 * float(m.group(1)), out.stdout


def test_ci_runs_the_readme_test_command():
    bash = re.findall(r"```bash\n(.*?)```", README, re.S)[0]
    test_cmd = [ln for ln in bash.splitlines() if "pytest" in ln][0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("python ", 1)[1] in ci
