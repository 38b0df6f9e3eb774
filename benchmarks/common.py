"""Shared helpers of the benchmark scripts: timing, compiled memory, machine line, output."""

import ctypes
import ctypes.util
import os
import platform
import re

import jax

from jmoe import runtime
from jmoe.timing import interleaved_medians, interleaved_times, timeit  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def temp_bytes(fn, *args) -> int:
    """Peak temporary bytes of the compiled function (`memory_analysis`), -1 if unknown."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def machine_line() -> str:
    """Machine, device, jax version and the load average (these machines are shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    dev = jax.devices()[0]
    return (
        f"Machine: {cpu}, {os.cpu_count()} CPUs, device {dev.platform}/{dev.device_kind}; "
        f"jax {jax.__version__}; load average at start {load}."
    )


GENERATED_BEGIN = "<!-- written by the benchmark script: begin -->"
GENERATED_END = "<!-- written by the benchmark script: end -->"


BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def write_section(title: str, body: str, path: str = BENCHMARKS_MD):
    """Writes ``body`` as the generated block of the ``## title`` section of BENCHMARKS.md.

    The block sits between ``GENERATED_BEGIN`` and ``GENERATED_END`` (HTML comments, not
    rendered). A rerun replaces only the block: notes written after it stay. A section without
    the markers is replaced whole; a missing section is appended.
    """
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    head = f"## {title}\n"
    block = f"{GENERATED_BEGIN}\n{body.strip()}\n{GENERATED_END}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    if match is None:
        text = text.rstrip() + "\n\n" + head + "\n" + block
    else:
        old = match.group(0)
        if GENERATED_BEGIN in old and GENERATED_END in old:
            start = old.index(GENERATED_BEGIN)
            end = old.index(GENERATED_END) + len(GENERATED_END) + 1
            new = old[:start] + block + old[end:]
        else:
            new = head + "\n" + block + "\n"
        text = text[: match.start()] + new + text[match.end() :]
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def set_malloc(mode: str) -> str:
    """Applies ``jmoe.runtime.keep_freed_memory()`` for ``mode="keep"`` (call before JAX starts).

    Returns:
      A sentence for the benchmark's header saying which allocator setting the run used.
    """
    if mode == "keep" and runtime.keep_freed_memory():
        return "Allocator: `jmoe.runtime.keep_freed_memory()` (glibc keeps freed buffers)."
    return "Allocator: glibc defaults (big buffers are mmapped and page-faulted at every call)."


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc ``malloc_trim(0)``); no-op elsewhere.

    With ``keep_freed_memory()`` glibc never trims, and multi-GiB temporaries (the dense
    ``ragged_dot`` rewrite at G = 256 needs 8 GiB) fragment the heap until the process runs
    out of memory; the benchmarks call this after such peers.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
