"""The README's NNX example runs and its loss falls."""

import contextlib
import io
import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_nnx_example_runs():
    section = README.split("## The MoE layer in Flax NNX", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md (NNX)", "exec"), {"__name__": "readme_nnx"})
    m = re.search(r"loss ([\d.]+) -> ([\d.]+)", out.getvalue())
    assert m, out.getvalue()
    assert float(m.group(2)) < 0.8 * float(m.group(1)), out.getvalue()
