"""Native CPU grouped matmul: ``cpu_kernel.cc`` through the XLA FFI (f32, multi-threaded).

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``)
for this machine (``-O3 -march=native``) against the FFI headers shipped with jaxlib, and
cached under ``$JMOE_CACHE_DIR`` (default ``~/.cache/jmoe``) keyed by the source, the flags,
the jaxlib version and the CPU. Where no compiler is found or the build fails, ``available()``
is False, ``why_unavailable()`` says why, and the CPU default falls back to the XLA loop
(``pallas_kernels.gmm.xla``).

Other dtypes run in f32 (inputs upcast, output cast back): accumulation is f32 either way.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("cpu_kernel.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC")
_TARGETS = {"gmm": "jmoe_gmm_f32", "tgmm": "jmoe_tgmm_f32"}
_SYMBOLS = {"gmm": "JmoeGmmF32", "tgmm": "JmoeTgmmF32"}


def _cpu_signature() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "jmoe"
    return pathlib.Path(os.environ.get("JMOE_CACHE_DIR") or default)


def _build(cxx: str) -> pathlib.Path:
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), cxx.encode()):
        key.update(part)
    key.update(importlib.metadata.version("jaxlib").encode() + _cpu_signature().encode())
    out = _cache_dir() / f"gmm_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent builders (test workers) never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*shlex.split(cxx), *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the FFI targets; returns None on success, else the reason."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return "no C++ compiler found ($CXX, c++ or g++)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"building the CPU gmm kernel failed: {e}"
    for op, target in _TARGETS.items():
        fn = getattr(lib, _SYMBOLS[op])
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
    return None


def available() -> bool:
    """Whether the native kernel is built and registered (builds it on the first call)."""
    return _load() is None


def why_unavailable() -> str | None:
    """The build or load failure, or None when ``available()``."""
    return _load()


def _require():
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"gmm implementation 'cpu_ffi' is unavailable: {reason}")


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None):
    """``out[m] = lhs[m] @ rhs[group(m)]``; see ``pallas_kernels.gmm.api.gmm``."""
    _require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    call = jax.ffi.ffi_call(
        _TARGETS["gmm"],
        jax.ShapeDtypeStruct((lhs.shape[0], n), jnp.float32),
        vmap_method="sequential",
    )
    out = call(
        lhs.astype(jnp.float32),
        rhs.astype(jnp.float32),
        group_sizes.astype(jnp.int32),
        transpose_rhs=np.bool_(transpose_rhs),
    )
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, num_groups=None, preferred_element_type=None):
    """``out[g] = lhs[rows of g]^T @ dout[rows of g]``; see ``pallas_kernels.gmm.api.tgmm``."""
    _require()
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    num_groups = num_groups or group_sizes.shape[0]
    call = jax.ffi.ffi_call(
        _TARGETS["tgmm"],
        jax.ShapeDtypeStruct((num_groups, lhs.shape[1], dout.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    out = call(lhs.astype(jnp.float32), dout.astype(jnp.float32), group_sizes.astype(jnp.int32))
    return out.astype(out_dtype)
