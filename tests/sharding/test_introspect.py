"""jmoe.introspect: collectives read from compiled HLO, and what each device holds."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe import introspect
from tests.sharding._helpers import require_8_devices

HLO = """
ENTRY %main {
  %p = f32[8,4]{1,0} parameter(0)
  %all-to-all.1 = f32[8,4]{1,0} all-to-all(f32[8,4]{1,0} %p), channel_id=1, dimensions={0}
  %ags = (bf16[2,3]{1,0}, bf16[16,3]{1,0}) all-gather-start(bf16[2,3]{1,0} %q), dimensions={0}
  %ar = (f32[5]{0}, s32[]) all-reduce(f32[5]{0} %a, s32[] %b), to_apply=%add
  %add.3 = f32[8,4]{1,0} add(f32[8,4]{1,0} %p, f32[8,4]{1,0} %p)
  %cp = pred[7]{0} collective-permute(pred[7]{0} %m), source_target_pairs={{0,1}}
}
"""


def test_collectives_from_hlo_text():
    found = introspect.collectives(HLO)
    assert [c.op for c in found] == ["all-to-all", "all-gather", "all-reduce", "collective-permute"]
    a2a, gather, reduce, permute = found
    assert a2a.shapes == ((8, 4),) and a2a.nbytes == 8 * 4 * 4
    assert gather.shapes == ((16, 3),) and gather.nbytes == 16 * 3 * 2  # result, not operand
    assert reduce.shapes == ((5,), ()) and reduce.nbytes == 5 * 4 + 4
    assert permute.nbytes == 7
    summary = introspect.collective_summary(HLO)
    assert summary["all-to-all"] == {"count": 1, "bytes": 128}
    assert "reduce-scatter" not in summary


def _mesh():
    require_8_devices()
    return jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])


def test_collectives_of_a_compiled_all_to_all():
    mesh = _mesh()
    f = jax.jit(
        jax.shard_map(
            lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True),
            mesh=mesh,
            in_specs=P("x"),
            out_specs=P("x"),
        )
    )
    x = jax.device_put(
        jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4), NamedSharding(mesh, P("x"))
    )
    summary = introspect.collective_summary(f.lower(x).compile().as_text())
    assert summary["all-to-all"]["bytes"] == 8 * 4 * 4  # one device's [8, 4] block
    assert set(summary) == {"all-to-all"}


def test_sharding_rows_and_device_blocks():
    mesh = _mesh()
    sharded = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("x", None)))
    replicated = jax.device_put(jnp.zeros((3,)), NamedSharding(mesh, P()))
    rows = {r.path: r for r in introspect.sharding_rows({"w": sharded, "b": [replicated]})}
    assert rows["w"].shape == (8, 4) and rows["w"].block == (1, 4) and rows["w"].copies == 1
    assert "'x'" in rows["w"].spec
    assert rows["b/0"].block == (3,) and rows["b/0"].copies == 8
    table = introspect.format_sharding({"w": sharded})
    assert table.splitlines()[0].startswith("array") and "(1, 4)" in table

    blocks = introspect.device_blocks(sharded)
    assert len(blocks) == 8
    assert sorted(introspect.format_slices(i, (8, 4)) for i in blocks.values()) == [
        f"[{k}:{k + 1}, :]" for k in range(8)
    ]
    grid = introspect.device_grid(sharded, axis=0)
    assert grid.shape == (8, 8) and (grid.sum(0) == 1).all() and (grid.sum(1) == 1).all()
    np.testing.assert_array_equal(introspect.device_grid(replicated), np.ones((8, 3), np.int32))
