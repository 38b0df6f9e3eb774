"""Orbax checkpoints of the train state plus the data iterator position.

Each save is written to a temporary directory and renamed when complete, so a run killed
mid-save leaves the previous checkpoints intact and the partial one is ignored (and
cleaned up) on restart.
"""

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoint manager. The writer (training) deletes temporary directories left
    by a save that a crash cut short; a `read_only` reader (sampling) touches nothing."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=options,
        item_names=("state", "data"),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=True,
    )
    mngr.wait_until_finished()


def _restore_target(leaf) -> jax.ShapeDtypeStruct:
    """A leaf's restore target; one without a sharding goes to the first local device (so a
    checkpoint written by many devices or processes restores in one, e.g. for sampling)."""
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(target, "sharding", None) is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=device)
    return target


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(state, data_state, step) from the latest complete checkpoint, or None. Leaves of
    `abstract_state` with a sharding are restored into it (each process reads its shards)."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(_restore_target, abstract_state)
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    return out["state"], out["data"], step


def restore_params(workdir: str, abstract_state):
    """The latest checkpoint's state (for sampling), or raises FileNotFoundError."""
    mngr = manager(workdir, keep=1000, read_only=True)
    got = restore_latest(mngr, abstract_state)
    if got is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    return got[0], got[2]
