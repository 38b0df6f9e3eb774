"""Per-process data rows: the processes' slices put together are the one-process batches."""

import numpy as np
import pytest

from jmoe.train import data


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("kind", ["text", "digits"])
def test_process_rows_put_together_are_the_global_batch(kind, processes):
    b = 16
    if kind == "text":
        tokens = np.arange(5000, dtype=np.uint8)

        def make(rows):
            return data.text_dataset(tokens, 8, b, seed=3, rows=rows)
    else:
        x = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
        y = np.arange(37, dtype=np.int32)

        def make(rows):
            return data.array_dataset(x, y, b, seed=3, rows=rows)

    whole = make(None)
    n = b // processes
    parts = [make((p * n, (p + 1) * n)) for p in range(processes)]
    for s in (0, 1, 5):  # step 5 is past the digits' first epoch (37 examples)
        got = _concat([part[s] for part in parts])
        for k in whole[s]:
            np.testing.assert_array_equal(got[k], whole[s][k])
    # The iterator position (saved in checkpoints) is the step, whatever the process count.
    it = iter(parts[1].to_iter_dataset())
    next(it), next(it)
    assert it.get_state() == iter(whole.to_iter_dataset()).get_state() | {"next_index": 2}


def test_bad_rows_are_rejected():
    with pytest.raises(ValueError, match=r"rows=\(4, 2\) must satisfy 0 <= lo < hi"):
        data.text_dataset(np.zeros(100, np.uint8), 8, 4, seed=0, rows=(4, 2))


def test_process_rows_of_one_process_cover_the_batch():
    import jax

    from jmoe.sharding import MeshConfig, make_mesh
    from jmoe.train import parallel

    if jax.device_count() < 8:
        pytest.skip("needs the 8 CPU devices tests/conftest.py asks for")
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    assert parallel.process_rows(mesh, 16) == (0, 16)
    with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the 8 batch"):
        parallel.check_batch_size(mesh, 12)
