"""Lowering GPU kernels on a CPU-only machine: an abstract H100 for what asks for a device."""

import contextlib

import jax


@contextlib.contextmanager
def abstract_h100():
    """Lowering context naming an H100 as the target device.

    From jax 0.11 the Triton lowering asks for the target GPU's compute capability, which a
    CPU-only machine gives only through an abstract device; jax 0.10 lowers without one.
    """
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("device",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(f, *args):
    """``f`` jitted, traced on ``args`` (``jax.ShapeDtypeStruct``s) and lowered for CUDA."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
