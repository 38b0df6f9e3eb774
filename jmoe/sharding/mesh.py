"""Device meshes from a small config: axes `data`, `fsdp`, `expert`, `tensor`."""

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; at most one may be -1 (inferred from the device count).

    `data`: pure data parallelism (replicated weights); `fsdp`: data parallelism with weights
    sharded along `embed`; `expert`: expert parallelism (tokens are also split along it outside
    the experts); `tensor`: tensor parallelism of the FFN width (`mlp`).
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes with the -1 filled in; ValueError when they do not factor the devices."""
        sizes = self.sizes()
        bad = [s for s in sizes if s == 0 or s < -1]
        if bad:
            raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {_fmt(sizes)}")
        n_infer = sizes.count(-1)
        if n_infer > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {_fmt(sizes)}")
        known = math.prod(s for s in sizes if s != -1)
        if n_infer:
            if num_devices % known:
                raise ValueError(
                    f"{num_devices} devices do not factor into mesh {_fmt(sizes)}: "
                    f"the fixed axes need a multiple of {known}"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {_fmt(sizes)} has {math.prod(sizes)} devices, "
                f"but {num_devices} are available"
            )
        return sizes


def _fmt(sizes) -> str:
    return ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    """Builds a `Mesh` with axes (data, fsdp, expert, tensor), all of type Auto.

    Uses every device of every process by default (`jax.devices()`), so after
    `jax.distributed.initialize()` the mesh spans all hosts. The device order follows
    `jax.make_mesh` (ICI/NVLink-aware on TPU and GPU), with `tensor` innermost.
    """
    config = config or MeshConfig()
    devs = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devs))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devs, dtype=object).reshape(sizes), MESH_AXES, axis_types=axis_types)


def batch_axes(mesh, data_axes: Sequence[str] = ("data", "fsdp"), expert_axis: str | None = None):
    """Mesh axes the token (batch) dimension is split over: the data axes, then `expert_axis`."""
    names = tuple(mesh.axis_names)
    axes = tuple(a for a in data_axes if a in names)
    if expert_axis is not None and expert_axis in names and expert_axis not in axes:
        axes = (*axes, expert_axis)
    return axes


def axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    shape = dict(mesh.shape)
    return math.prod(shape[a] for a in axes)
