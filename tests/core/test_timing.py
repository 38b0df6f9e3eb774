"""jmoe.timing: medians of jitted calls after a warm-up."""

import jax
import jax.numpy as jnp

from jmoe import timing


def test_timings_are_positive_and_keyed():
    x = jnp.ones((64, 64))
    f, g = jax.jit(lambda a: a @ a), jax.jit(lambda a: a + 1)
    medians = timing.interleaved_medians({"matmul": (f, (x,)), "add": (g, (x,))}, repeats=3)
    assert set(medians) == {"matmul", "add"} and all(t > 0 for t in medians.values())
    times = timing.interleaved_times({"add": (g, (x,))}, repeats=4)
    assert len(times["add"]) == 4
    assert timing.timeit(f, x, repeats=2, inner=2) > 0
