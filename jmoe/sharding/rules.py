"""Logical-axis rules and helpers turning Linen logical annotations into shardings."""

from collections.abc import Sequence

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical axis name -> mesh axis (or axes). The MoE layer uses `expert`, `embed`, `mlp`;
# the rest are for models built on it (activations and attention).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
)


class LogicallyPartitioned(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` that also turns into an NNX variable without a global flag.

    Through `flax.nnx.bridge`, a Linen box becomes an `nnx.Variable` whose `out_sharding`
    (the logical names) Flax applies eagerly, which needs a mesh and mesh-axis names.
    This box says how (`nnx_sharding_metadata`): the logical names map to mesh axes through
    its `rules` (default `DEFAULT_RULES`); without a mesh the variable is created unsharded.
    """

    def to_nnx_metadata(self) -> dict:
        """The NNX metadata of this box (Flax's own pops fields off the box itself)."""
        metadata = {k: v for k, v in vars(self).items() if k not in ("names", "rules")}
        return {**metadata, **nnx_sharding_metadata(self.names, self.mesh, self.rules)}


def nnx_sharding_metadata(names, mesh=None, rules=None) -> dict:
    """`nnx.Variable` metadata for a parameter with logical axis `names`.

    `out_sharding` holds the logical names and `sharding_rules` maps them to mesh axes
    (`rules`, else `DEFAULT_RULES` unless `nn.logical_axis_rules` are set), so
    `nnx.get_partition_spec` gives mesh specs. With a mesh (`mesh`, else the one set by
    `jax.set_mesh`) the rules drop axes it lacks and Flax places the value at creation; without
    one the variable is created unsharded (`eager_sharding=False`), with no global flag.
    """
    metadata = {"out_sharding": tuple(names)}
    if mesh is not None:
        metadata["mesh"] = mesh
    mesh = mesh if mesh is not None else meta.get_global_mesh()
    if rules is None and not nn.get_logical_axis_rules():
        rules = DEFAULT_RULES
    if mesh is None:
        metadata["eager_sharding"] = False
    elif rules is not None:
        rules = rules_for_mesh(rules, mesh)
    metadata["sharding_rules"] = None if rules is None else tuple(rules)
    return metadata


def with_logical_partitioning(init, names, mesh=None, rules=None):
    """`nn.with_logical_partitioning` boxing into `LogicallyPartitioned` (bridge-ready)."""
    return lambda *args, **kwargs: LogicallyPartitioned(init(*args, **kwargs), names, mesh, rules)


def rules_for_mesh(rules: Sequence, mesh) -> tuple:
    """Drops mesh axes the mesh does not have (a rule to a missing axis means replicated)."""
    names = set(mesh.axis_names)
    out = []
    for logical, phys in rules:
        if phys is None:
            out.append((logical, None))
        elif isinstance(phys, str):
            out.append((logical, phys if phys in names else None))
        else:
            kept = tuple(a for a in phys if a in names)
            out.append((logical, kept if kept else None))
    return tuple(out)


def logical_specs(tree):
    """PartitionSpecs of logical names for a tree of `nn.LogicallyPartitioned` boxes."""
    return nn.get_partition_spec(tree)


def mesh_specs(tree, mesh, rules: Sequence = DEFAULT_RULES):
    """Mesh PartitionSpecs for a (boxed) variable tree: logical names mapped through `rules`."""
    rules = rules_for_mesh(rules, mesh)
    return nn.logical_to_mesh(logical_specs(tree), rules)


def mesh_shardings(tree, mesh, rules: Sequence = DEFAULT_RULES):
    """NamedShardings for a (boxed) variable tree, for `jax.jit` in/out shardings.

    Leaves without logical annotations (e.g. the `router_state` bias) are replicated.
    """
    return nn.logical_to_mesh_sharding(logical_specs(tree), mesh, rules_for_mesh(rules, mesh))


def abstract_variables(model, *init_args, **init_kwargs):
    """Boxed abstract variables (ShapeDtypeStruct leaves) of `model.init(*init_args)`."""
    return jax.eval_shape(model.init, *init_args, **init_kwargs)


def sharded_init(model, mesh, *init_args, rules: Sequence = DEFAULT_RULES, **init_kwargs):
    """Initialises `model` directly into its shardings; returns (unboxed variables, shardings).

    Every array is created on its owning devices by `jax.jit(..., out_shardings=...)`, so the
    full weights never sit on one device.
    """
    boxed = abstract_variables(model, *init_args, **init_kwargs)
    shardings = mesh_shardings(boxed, mesh, rules)
    init = jax.jit(lambda *a: nn.unbox(model.init(*a, **init_kwargs)), out_shardings=shardings)
    return init(*init_args), shardings


def restore_targets(abstract_tree, shardings):
    """`jax.ShapeDtypeStruct` leaves carrying shardings: the target of a sharded checkpoint
    restore (e.g. orbax `StandardRestore(args)`), so each host reads only its shards."""
    abstract_tree = nn.unbox(abstract_tree)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def batch_sharding(mesh, batch_axes: Sequence[str], ndim: int = 2) -> NamedSharding:
    """Sharding of an input batch: leading axis split over `batch_axes`, the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))
