"""Wall-clock timing of jitted functions on a shared machine (benchmarks and notebooks).

Every time is taken after a warm-up call (compilation excluded) and with the outputs blocked
on. `interleaved_medians` calls each candidate once per round, so drift on a shared machine
(other processes, frequency changes) hits all candidates alike.
"""

import statistics
import time

import jax


def timeit(fn, *args, repeats: int = 5, inner: int = 1) -> float:
    """Median seconds per call after one warm-up call (outputs blocked on)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def interleaved_times(fns: dict, repeats: int) -> dict:
    """Seconds of each call of each ``name: (fn, args)``, one call of each per round after a
    warm-up, so drift on a shared machine hits them alike."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each ``name: (fn, args)`` (see ``interleaved_times``)."""
    return {name: statistics.median(v) for name, v in interleaved_times(fns, repeats).items()}


__all__ = ["interleaved_medians", "interleaved_times", "timeit"]
