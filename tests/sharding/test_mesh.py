"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jmoe.layers import MoE
from jmoe.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    make_mesh,
    mesh_shardings,
    mesh_specs,
    restore_targets,
    rules_for_mesh,
    sharded_init,
)
from jmoe.sharding.rules import abstract_variables
from tests.sharding._helpers import D, E, F, inputs, layer_kwargs, require_8_devices


def test_infer_axis_and_names():
    require_8_devices()
    mesh = make_mesh(MeshConfig(data=-1, expert=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 1, 2)
    assert make_mesh().shape["data"] == jax.device_count()


@pytest.mark.parametrize(
    "cfg,match",
    [
        (MeshConfig(data=-1, expert=3), "do not factor"),
        (MeshConfig(data=-1, expert=-1), "at most one"),
        (MeshConfig(data=2, expert=2), "has 4 devices"),
        (MeshConfig(data=0), ">= 1 or -1"),
    ],
)
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.resolve(8)


def test_rules_map_layer_axes():
    require_8_devices()
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    model = MoE(**layer_kwargs())
    boxed = abstract_variables(model, jax.random.key(0), inputs())
    specs = mesh_specs(boxed, mesh)["params"]
    assert specs["w_gate_in"] == P("expert", "fsdp", "tensor", None)
    assert specs["w_out"] == P("expert", "tensor", "fsdp")
    assert specs["router"] == P("fsdp", None)
    # Rules pointing at axes a mesh lacks become replication.
    small = jax.sharding.Mesh(jax.devices()[:2], ("expert",))
    assert dict(rules_for_mesh(DEFAULT_RULES, small))["embed"] is None


def test_sharded_init_and_restore_targets():
    require_8_devices()
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    model = MoE(**layer_kwargs(router="sigmoid"))
    x = inputs()
    variables, shardings = sharded_init(model, mesh, jax.random.key(0), x)
    w_in = variables["params"]["w_gate_in"]
    assert w_in.shape == (E, D, F, 2)
    assert {s.data.shape for s in w_in.addressable_shards} == {(E // 4, D, F, 2)}
    # Unannotated state (the sigmoid bias) is replicated.
    assert variables["router_state"]["bias"].sharding.is_fully_replicated
    targets = restore_targets(abstract_variables(model, jax.random.key(0), x), shardings)
    t = targets["params"]["w_out"]
    assert isinstance(t, jax.ShapeDtypeStruct) and t.sharding == shardings["params"]["w_out"]
    assert mesh_shardings(abstract_variables(model, jax.random.key(0), x), mesh) == shardings


def test_checkpoint_restore_into_other_mesh(tmp_path):
    """Save on a 2x4 mesh, restore straight into an 8x1 layout via `restore_targets`."""
    import numpy as np
    import orbax.checkpoint as ocp

    require_8_devices()
    model = MoE(**layer_kwargs())
    x = inputs()
    src = make_mesh(MeshConfig(data=2, expert=4))
    variables, _ = sharded_init(model, src, jax.random.key(0), x)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "v", variables)
        ckpt.wait_until_finished()
        dst = make_mesh(MeshConfig(data=1, expert=8))
        abstract = abstract_variables(model, jax.random.key(0), x)
        targets = restore_targets(abstract, mesh_shardings(abstract, dst))
        restored = ckpt.restore(tmp_path / "v", targets)
    w = restored["params"]["w_gate_in"]
    assert w.sharding.mesh.shape["expert"] == 8
    assert {s.data.shape for s in w.addressable_shards} == {(E // 8, D, F, 2)}
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
