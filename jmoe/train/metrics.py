"""Metrics sinks: JSONL (`metrics.jsonl`) and TensorBoard event files in the workdir."""

import json
import os

import numpy as np


def to_python(v):
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()
    return a.tolist()


class MetricsWriter:
    """Writes one JSON object per `write` and the same values to TensorBoard.

    Vector values (per-expert load, histograms) go to TensorBoard as one scalar per entry
    (`name/e{i}`).
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is None:
            return
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, list):
                for i, x in enumerate(np.ravel(v)):
                    self._tb.add_scalar(f"{k}/e{i}", float(x), step)
            elif isinstance(v, int | float):
                self._tb.add_scalar(k, float(v), step)
        self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read(workdir: str) -> list[dict]:
    """Rows of `metrics.jsonl`; on a resumed run, a row for an already-logged step replaces
    the earlier one (the run re-logs the steps after its last checkpoint)."""
    rows: dict[tuple, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run.
                continue
            rows[(r["step"], r.get("split", "train"))] = r
    return [rows[k] for k in sorted(rows)]
