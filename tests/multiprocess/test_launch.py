"""`python -m jmoe.launch`: environment, output, failure handling, Ctrl-C, and a real
cross-process all-to-all over gloo (2 processes x 2 CPU devices)."""

import os
import signal
import sys
import time

import pytest

from jmoe import distributed, launch
from tests.multiprocess.mp_helpers import (
    REPO,
    Launched,
    alive,
    child_pids,
    launch_cmd,
    run,
    wait_for,
)

PY = sys.executable


def test_children_get_coordinator_env_and_prefixed_output(capfd):
    code = (
        "import os; e = os.environ; print(e['JMOE_PROCESS_ID'], e['JMOE_NUM_PROCESSES'], "
        "e['JMOE_COORDINATOR_ADDRESS'], e['XLA_FLAGS'], e['JAX_PLATFORMS'])"
    )
    assert launch.main(["--processes=3", "--devices-per-process=2", "--", PY, "-c", code]) == 0
    out, err = capfd.readouterr()
    lines = sorted(line for line in out.splitlines() if line.startswith("[p"))
    assert len(lines) == 3, (out, err)
    addresses = set()
    for i, line in enumerate(lines):
        prefix, pid, num, address, xla_flags, platforms = line.split()
        assert (prefix, pid, num, platforms) == (f"[p{i}]", str(i), "3", "cpu")
        assert address.startswith("127.0.0.1:")
        # the test suite's own 8-device flag is replaced, not duplicated
        assert xla_flags == "--xla_force_host_platform_device_count=2"
        addresses.add(address)
    assert len(addresses) == 1


def test_progress_bars_are_prefixed_after_carriage_returns():
    assert launch._prefixed(b"\rtrain: 0%\rtrain: 50%\n", b"[p0] ") == (
        b"\r[p0] train: 0%\r[p0] train: 50%\n"
    )
    assert launch._prefixed(b"hello\n", b"[p1] ") == b"[p1] hello\n"


@pytest.mark.parametrize("how", ["exit 3", "SIGKILL"])
def test_a_failing_child_ends_the_others(how, capfd):
    die = "sys.exit(3)" if how == "exit 3" else "os.kill(os.getpid(), signal.SIGKILL)"
    code = (
        "import os, signal, sys, time\n"
        f"if os.environ['JMOE_PROCESS_ID'] == '1':\n    time.sleep(0.5); {die}\n"
        "time.sleep(300)\n"
    )
    t0 = time.monotonic()
    rc = launch.run([PY, "-c", code], processes=3, devices=0)
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    assert rc == (3 if how == "exit 3" else 128 + signal.SIGKILL), err
    assert "process 1 " in err and "ending the others" in err
    assert elapsed < 30, elapsed  # the sleepers (300 s) were ended, not waited for
    pids = child_pids(err)
    assert len(pids) == 3 and not any(alive(p) for p in pids.values())


def test_a_command_that_cannot_start_is_reported(capfd):
    assert launch.run(["/nonexistent/cmd"], processes=2, devices=0) == 127
    assert "cannot start COMMAND '/nonexistent/cmd'" in capfd.readouterr().err


def test_ctrl_c_ends_all_children_even_one_ignoring_sigint():
    code = (
        "import os, signal, time\n"
        "if os.environ['JMOE_PROCESS_ID'] == '0': signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    run_ = Launched(launch_cmd(2, 0, PY, "-c", code, grace=1.0))
    try:
        wait_for(lambda: run_.stdout.count("ready") == 2, 120, "both children")
        pids = child_pids(run_.stderr)
        run_.proc.send_signal(signal.SIGINT)
        assert run_.wait(60) == 128 + signal.SIGINT
        assert not any(alive(p) for p in pids.values())
    finally:
        run_.kill()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--processes", "0", "--", "true"], "--processes=0 must be >= 1"),
        (["--processes", "2", "--devices-per-process", "x", "--", "true"], "'x' is not an int"),
        (["--processes", "2"], "no COMMAND given"),
    ],
)
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        launch.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_env_settings_validation():
    assert distributed.env_settings({}) is None
    good = {
        "JMOE_COORDINATOR_ADDRESS": "127.0.0.1:1234",
        "JMOE_NUM_PROCESSES": "2",
        "JMOE_PROCESS_ID": "1",
    }
    assert distributed.env_settings(good) == {
        "coordinator_address": "127.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(ValueError, match="JMOE_PROCESS_ID missing"):
        distributed.env_settings({k: v for k, v in good.items() if k != "JMOE_PROCESS_ID"})
    with pytest.raises(ValueError, match=r"JMOE_PROCESS_ID=2 must be in \[0, 1\]"):
        distributed.env_settings({**good, "JMOE_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JMOE_NUM_PROCESSES='two' is not an integer"):
        distributed.env_settings({**good, "JMOE_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        distributed.env_settings({**good, "JMOE_COORDINATOR_ADDRESS": "localhost"})


def test_child_env_replaces_only_the_device_count_flag():
    base = {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"}
    env = launch.child_env(base, "127.0.0.1:1", 2, 1, 4)
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JMOE_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert launch.child_env(base, "127.0.0.1:1", 2, 1, 0)["XLA_FLAGS"] == base["XLA_FLAGS"]


def test_all_to_all_and_psum_cross_processes():
    """Two JAX processes, two CPU devices each, one mesh: gloo carries the exchange."""
    prog = os.path.join(REPO, "tests", "multiprocess", "collective_prog.py")
    proc = run(launch_cmd(2, 2, PY, prog), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    oks = sorted(line for line in proc.stdout.splitlines() if " OK " in line)
    assert oks == ["[p0] OK 0 2 4 120.0", "[p1] OK 1 2 4 120.0"], proc.stdout
