"""jmoe.runtime.keep_freed_memory, in fresh processes (it must run before JAX starts)."""

import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, warnings

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    from jmoe import runtime
    applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else False
    import jax.numpy as jnp
    before = libc.mallinfo2().hblkhd  # bytes held in mmapped blocks
    big = jnp.ones((32 * 2**20,), jnp.float32) + 1.0  # 128 MiB, alive below
    mmapped = libc.mallinfo2().hblkhd - before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.keep_freed_memory()
    print(applied, mmapped >= 2**27, len(caught))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("mode, want", [("keep", "True False 1"), ("default", "False True 1")])
def test_big_buffers_leave_mmap_only_when_applied_before_jax(mode, want):
    """With the setting XLA's 128 MiB buffer comes from the heap, without it from mmap; a call
    after JAX started warns."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == want.split()
