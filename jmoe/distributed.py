"""Multi-process JAX start-up from the environment `python -m jmoe.launch` (or you) sets.

`initialize_from_env()` reads `JMOE_COORDINATOR_ADDRESS`, `JMOE_NUM_PROCESSES` and
`JMOE_PROCESS_ID` and calls `jax.distributed.initialize` with them (CPU collectives over
gloo), so one program runs as N cooperating processes whose devices form one mesh. Without
the variables it does nothing (one process), or, with `auto=True`, calls
`jax.distributed.initialize()` with no arguments (TPU pods, SLURM, Open MPI detect
themselves). JAX is imported only inside the functions: `import jmoe` stays light.
"""

import os

ENV_ADDRESS = "JMOE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JMOE_NUM_PROCESSES"
ENV_PROCESS_ID = "JMOE_PROCESS_ID"
ENV_VARS = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


def _int_var(env, name: str, lo: int, hi: int | None = None) -> int:
    raw = env[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value} must be {allowed}")
    return value


def env_settings(env=None) -> dict | None:
    """`jax.distributed.initialize` keyword arguments from `env` (default `os.environ`).

    Returns None when none of the three variables is set; raises ValueError naming the
    variable when only some are set or a value is malformed.
    """
    env = os.environ if env is None else env
    present = [v for v in ENV_VARS if env.get(v)]
    if not present:
        return None
    missing = [v for v in ENV_VARS if not env.get(v)]
    if missing:
        raise ValueError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: set all three"
        )
    address = env[ENV_ADDRESS]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{ENV_ADDRESS}={address!r} must be HOST:PORT, e.g. 127.0.0.1:1234")
    n = _int_var(env, ENV_NUM_PROCESSES, 1)
    pid = _int_var(env, ENV_PROCESS_ID, 0, n - 1)
    return {"coordinator_address": address, "num_processes": n, "process_id": pid}


def initialize_from_env(auto: bool = False) -> bool:
    """Joins the multi-process run the environment describes, before any other JAX call.

    Args:
      auto: without the `JMOE_*` variables, call `jax.distributed.initialize()` with no
        arguments (cluster auto-detection) instead of staying a single process.

    Returns:
      True when `jax.distributed.initialize` was called.
    """
    settings = env_settings()
    if settings is None and not auto:
        return False
    import jax

    # Cross-process collectives of CPU devices (jax's default on 0.10; explicit here).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(settings or {}))
    return True


def is_primary() -> bool:
    """True in process 0: the one that prints, logs metrics and writes run files."""
    import jax

    return jax.process_index() == 0
