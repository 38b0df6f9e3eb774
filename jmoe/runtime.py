"""Process-level runtime settings for JAX on CPU.

XLA:CPU allocates each call's output and temporary buffers with ``malloc`` and frees them
when the call ends. glibc serves a block over 32 MiB with a fresh ``mmap`` (and hands blocks
from threads other than the main one to per-thread arenas of at most 64 MiB), so a large
buffer, such as the ``[E, D, F]`` weight gradient of a grouped matmul, comes back from the
kernel as untouched pages at every step and is page-faulted in again: on the 2-core benchmark
machine, writing a fresh 64 MiB buffer took 16-18 ms against 2-4 ms for a reused one
(BENCHMARKS.md, "gmm"). ``keep_freed_memory`` makes glibc keep freed memory for reuse.
PyTorch's CPU tuning guide makes the same point and suggests jemalloc or tcmalloc; this needs
no preloaded library.
"""

import ctypes
import ctypes.util
import sys
import warnings

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Makes glibc's malloc reuse freed memory instead of returning it to the OS.

    Sets one malloc arena, no ``mmap`` allocations and no trimming of the heap, with
    ``mallopt``: the same as ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. Call it before JAX starts its CPU
    backend (before the first array is created): threads that already have an arena keep it.
    The process's resident memory then stays at its peak.

    Returns:
      True if applied; False where the C library is not glibc (nothing is changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    if _jax_started():
        warnings.warn(
            "keep_freed_memory() called after JAX started its backend: buffers allocated by "
            "JAX's worker threads keep their per-thread arenas (no effect there)",
            stacklevel=2,
        )
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(mallopt(param, value) == 1 for param, value in settings)


def _jax_started() -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import xla_bridge  # no public query of this

    return xla_bridge.backends_are_initialized()
