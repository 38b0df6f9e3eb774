"""Native CPU kernels: C++ sources called through the XLA FFI, compiled on first use.

A source is compiled with the system C++ compiler (``$CXX``, else ``c++`` or ``g++``) for this
machine (``-O3 -march=native``) against the FFI headers shipped with jaxlib, and cached under
``$JMOE_CACHE_DIR`` (default ``~/.cache/jmoe``) keyed by the source, the flags, the compiler,
the jaxlib version and the CPU. Where no compiler is found or the build fails, ``available()``
is False and ``why_unavailable()`` says why; callers then fall back to an XLA formulation.
"""

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC")


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


# Headers the sources share (e.g. parallel_for.h); on the include path and in the cache key.
INCLUDE_DIR = pathlib.Path(__file__).parent


def _build(source: pathlib.Path, cxx: str) -> pathlib.Path:
    key = hashlib.sha256()
    headers = sorted(INCLUDE_DIR.glob("*.h"))
    for part in (source.read_bytes(), *(h.read_bytes() for h in headers)):
        key.update(part)
    key.update(" ".join(FLAGS).encode() + cxx.encode())
    key.update(importlib.metadata.version("jaxlib").encode() + _cpu_signature().encode())
    out = _cache_dir() / f"{source.parent.name}_{source.stem}_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent builders (test workers) never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    includes = [f"-I{INCLUDE_DIR}", f"-I{jax.ffi.include_dir()}"]
    cmd = [*shlex.split(cxx), *FLAGS, *includes, str(source), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class NativeLibrary:
    """One C++ source whose FFI handlers are registered as XLA:CPU custom-call targets.

    Args:
      name: what error messages call it (e.g. ``"gmm implementation 'cpu_ffi'"``).
      source: the ``.cc`` file.
      targets: custom-call target name -> the handler symbol the source exports.
    """

    def __init__(self, name: str, source: pathlib.Path, targets: dict[str, str]):
        self.name = name
        self.source = source
        self.targets = dict(targets)
        self._lock = threading.Lock()
        self._outcome: list[str | None] = []  # [reason] once tried

    def _load(self) -> str | None:
        """Builds and registers once; None on success, else the reason (also cached)."""
        with self._lock:
            if not self._outcome:
                self._outcome.append(self._build_and_register())
            return self._outcome[0]

    def _build_and_register(self) -> str | None:
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not cxx:
            return "no C++ compiler found ($CXX, c++ or g++)"
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build(self.source, cxx)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return f"building {self.source.name} failed: {e}"
        for target, symbol in self.targets.items():
            fn = getattr(lib, symbol)
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
        return None

    def available(self) -> bool:
        """Whether the library is built and registered (builds it on the first call)."""
        return self._load() is None

    def why_unavailable(self) -> str | None:
        """The build or load failure, or None when ``available()``."""
        return self._load()

    def require(self):
        """Raises RuntimeError naming the library and the reason when it is unavailable."""
        reason = self._load()
        if reason is not None:
            raise RuntimeError(f"{self.name} is unavailable: {reason}")
