"""Runs one command as N cooperating JAX processes on this machine.

    python -m jmoe.launch --processes 2 --devices-per-process 4 -- \\
        python -m jmoe.train --config configs/lm_tiny.py --workdir runs/mp

Each child gets `JMOE_COORDINATOR_ADDRESS` (127.0.0.1 at a free port), `JMOE_NUM_PROCESSES`
and `JMOE_PROCESS_ID` (read by `jmoe.distributed.initialize_from_env`, which `jmoe.train`
calls) and, with `--devices-per-process D`, D simulated CPU devices (`XLA_FLAGS`,
`JAX_PLATFORMS=cpu`). Child output is prefixed `[pI]`. When a child exits non-zero or dies,
the others are ended (SIGTERM, then SIGKILL after `--grace` seconds) and the launcher exits
with that child's status (128 + signal for a killed child); Ctrl-C ends them all (exit 130).
Standard library only: this is also the launcher for users without a cluster manager.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jmoe.distributed import ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(base: dict, address: str, num: int, index: int, devices: int) -> dict:
    """`base` plus the coordinator variables and (devices > 0) `devices` CPU devices."""
    env = dict(base)
    env[ENV_ADDRESS], env[ENV_NUM_PROCESSES], env[ENV_PROCESS_ID] = address, str(num), str(index)
    if devices > 0:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _prefixed(line: bytes, prefix: bytes) -> bytes:
    """`line` with `prefix` before it and after each carriage return (progress bars)."""
    parts = line.split(b"\r")
    return b"\r".join(prefix + p if p.strip() else p for p in parts)


def _pump(stream, out, prefix: bytes, lock: threading.Lock) -> None:
    """Copies `stream` to `out` line by line, each line prefixed."""
    for line in iter(stream.readline, b""):
        with lock:
            out.write(_prefixed(line, prefix))
            out.flush()
    stream.close()


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class LaunchError(RuntimeError):
    """The command could not be started."""


class Group:
    """The child processes of one launch, each in its own session (its own process group)."""

    def __init__(self, command: list[str], processes: int, devices: int, port: int = 0):
        self.address = f"127.0.0.1:{port or free_port()}"
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        lock = threading.Lock()
        for i in range(processes):
            env = child_env(os.environ, self.address, processes, i, devices)
            try:
                p = subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as e:
                self.end(signal.SIGKILL, 0.0)
                raise LaunchError(f"cannot start COMMAND {command[0]!r}: {e}") from None
            self.procs.append(p)
            prefix = f"[p{i}] ".encode()
            for src, dst in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
                t = threading.Thread(target=_pump, args=(src, dst, prefix, lock), daemon=True)
                t.start()
                self._threads.append(t)
            _log(f"process {i} pid {p.pid} (coordinator {self.address})")

    def first_failure(self) -> tuple[int, int] | None:
        """(index, returncode) of a child that exited non-zero, else None."""
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc is not None and rc != 0:
                return i, rc
        return None

    def all_done(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def end(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Sends `sig` to every live child's process group; SIGKILL after `grace` seconds."""
        for p in self.procs:
            _signal_group(p, sig)
        deadline = time.monotonic() + grace
        while not self.all_done() and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)
            p.wait()

    def join_output(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    if p.poll() is not None and sig != signal.SIGKILL:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)  # the child's session: also its own subprocesses


def _log(msg: str) -> None:
    print(f"jmoe.launch: {msg}", file=sys.stderr, flush=True)


def run(command: list[str], processes: int, devices: int, grace: float = 5.0, port: int = 0):
    """Runs `command` as `processes` cooperating processes; returns the exit status."""
    interrupted: list[int] = []

    def on_signal(signum, _frame):
        interrupted.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    group = None
    try:
        group = Group(command, processes, devices, port)
        while not group.all_done():
            if interrupted:
                _log(f"{signal.Signals(interrupted[0]).name}: ending all processes")
                group.end(signal.SIGINT, grace)
                return 128 + interrupted[0]
            failed = group.first_failure()
            if failed is not None:
                i, rc = failed
                how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"
                _log(f"process {i} {how}: ending the others")
                group.end(signal.SIGTERM, grace)
                return _exit_status(rc)
            time.sleep(0.05)
        failed = group.first_failure()
        return 0 if failed is None else _exit_status(failed[1])
    except LaunchError as e:
        _log(str(e))
        return 127
    finally:
        if group is not None:
            group.join_output()
        for s, h in old.items():
            signal.signal(s, h)


def _positive(name: str, minimum: int):
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={raw!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name}={value} must be >= {minimum}")
        return value

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m jmoe.launch",
        description="Run COMMAND as N cooperating JAX processes on this machine.",
        usage="%(prog)s --processes N [--devices-per-process D] [--port P] -- COMMAND...",
    )
    ap.add_argument("--processes", type=_positive("--processes", 1), required=True)
    ap.add_argument(
        "--devices-per-process",
        type=_positive("--devices-per-process", 0),
        default=0,
        help="simulated CPU devices per process (0: leave the platform and XLA_FLAGS alone)",
    )
    ap.add_argument("--port", type=_positive("--port", 0), default=0, help="0: a free port")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        ap.error("no COMMAND given: put it after '--', e.g. -- python -m jmoe.train ...")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args.command, args.processes, args.devices_per_process, args.grace, args.port)


if __name__ == "__main__":
    sys.exit(main())
