"""The training run's mesh, shardings and per-process data (one or many JAX processes).

The mesh (`config.mesh`) spans every device of every process (`jax.devices()`). The train
state is sharded by the model's logical axis names (`jmoe.sharding.DEFAULT_RULES`), the
batch's leading axis over (`data`, `fsdp`, `expert`). Each process reads only the rows of
every global batch its own devices hold (`process_rows`) and the global batch is assembled
with `jax.make_array_from_process_local_data`, so the global batch at step s is the same
whatever the number of processes.
"""

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe.sharding import MeshConfig, batch_sharding, make_mesh, mesh_shardings
from jmoe.train import step as step_lib

BATCH_AXES = ("data", "fsdp", "expert")


def build_mesh(cfg) -> jax.sharding.Mesh:
    """The run's mesh from `cfg.mesh` over all devices; ValueError naming the sizes if they
    do not factor the device count (e.g. a resume with fewer devices)."""
    m = cfg.mesh
    mc = MeshConfig(data=m.data, fsdp=m.fsdp, expert=m.expert, tensor=m.tensor)
    try:
        return make_mesh(mc)
    except ValueError as e:
        raise ValueError(
            f"config.mesh (data={m.data}, fsdp={m.fsdp}, expert={m.expert}, tensor={m.tensor}) "
            f"does not fit the {jax.device_count()} devices of {jax.process_count()} "
            f"process(es): {e}. Set --config.mesh.* so the sizes multiply to the device count "
            "(one of them may be -1)."
        ) from None


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(mesh, batch_size: int) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch this process's devices hold."""
    sharding = batch_sharding(mesh, BATCH_AXES, 1)
    idx = sharding.addressable_devices_indices_map((batch_size,)).values()
    starts = sorted({s[0].indices(batch_size)[:2] for s in idx})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} holds batch rows {starts}, not one contiguous "
            "range; use a mesh whose batch axes (data, fsdp, expert) follow process order"
        )
    return lo, hi


def batch_shards(mesh) -> int:
    """How many ways the batch is split: data * fsdp * expert."""
    return int(np.prod([dict(mesh.shape)[a] for a in BATCH_AXES]))


def check_batch_size(mesh, batch_size: int) -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(
            f"config.data.batch_size={batch_size} must be a multiple of the {shards} batch "
            f"shards of mesh {dict(mesh.shape)} (data * fsdp * expert)"
        )


def state_shardings(model, optimizer, example, seed: int, mesh):
    """NamedShardings of the TrainState: params by their logical axes, optimizer moments like
    their params, everything else replicated."""
    rep = replicated(mesh)
    x = jax.ShapeDtypeStruct(np.shape(example["inputs"][:1]), np.asarray(example["inputs"]).dtype)
    keys = {"params": jax.random.key(0), "router": jax.random.key(1)}
    boxed = jax.eval_shape(model.init, keys, x)
    var_sh = mesh_shardings(boxed, mesh)
    params_sh = var_sh["params"]
    abstract = jax.eval_shape(lambda: step_lib.init_state(model, optimizer, example, seed))
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        abstract.opt_state,
        params_sh,
        transform_non_params=lambda _: rep,
    )
    router_sh = jax.tree.map(lambda _: rep, abstract.router_state)
    return abstract.replace(
        step=rep, params=params_sh, opt_state=opt_sh, router_state=router_sh, rng=rep
    )


def abstract_state(model, optimizer, example, seed: int, shardings):
    """ShapeDtypeStructs with shardings: the restore target (each process reads its shards)."""
    abstract = jax.eval_shape(lambda: step_lib.init_state(model, optimizer, example, seed))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def init_state(model, optimizer, example, seed: int, shardings):
    """The initial TrainState created directly in its shardings."""
    fn = jax.jit(
        lambda: step_lib.init_state(model, optimizer, example, seed), out_shardings=shardings
    )
    return fn()


def global_batch(mesh, local: dict, batch_size: int) -> dict:
    """The global batch from this process's rows (`local`, from `process_rows`)."""

    def put(a):
        a = np.asarray(a)
        sh = batch_sharding(mesh, BATCH_AXES, a.ndim)
        return jax.make_array_from_process_local_data(sh, a, (batch_size, *a.shape[1:]))

    return jax.tree.map(put, local)


def replicated_batch(mesh, batch: dict) -> dict:
    """A batch every process holds whole (held-out data), sharded over the batch axes (or
    replicated when its size does not divide into the batch shards)."""
    shards = batch_shards(mesh)

    def put(a):
        a = np.asarray(a)
        sh = batch_sharding(mesh, BATCH_AXES, a.ndim) if a.shape[0] % shards == 0 else None
        return jax.make_array_from_callback(a.shape, sh or replicated(mesh), lambda i: a[i])

    return jax.tree.map(put, batch)


def jit_train_step(train_step, shardings, mesh):
    """jit of `(state, batch) -> (state, metrics)`; the step's rng is folded from the state's
    step inside the jit, the metrics come back replicated (readable in every process)."""

    def fn(state, batch):
        return train_step(state, batch, jax.random.fold_in(state.rng, state.step))

    return jax.jit(fn, in_shardings=(shardings, None), out_shardings=(shardings, replicated(mesh)))


def jit_eval_step(eval_step, mesh):
    return jax.jit(eval_step, out_shardings=replicated(mesh))


class NullWriter:
    """The metrics writer of processes other than 0: writes nothing."""

    def write(self, step: int, metrics: dict) -> None:
        del step, metrics

    def close(self) -> None:
        pass
