"""Run under `python -m jmoe.launch`: an all-to-all and a psum over devices of all processes.

Prints `OK <process> <processes> <devices> <psum>` when every shard this process holds is
right, so a test can check that each process took part.
"""

import jax
import numpy as np

from jmoe import distributed

distributed.initialize_from_env()

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

n = jax.device_count()
mesh = jax.make_mesh((n,), ("expert",))
x = np.arange(n * n, dtype=np.float32).reshape(n, n)  # row i lives on device i
arr = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("expert")), lambda i: x[i])


def exchange(block):  # block [1, n]: element j goes to device j (the EP dispatch pattern)
    out = jax.lax.all_to_all(block, "expert", split_axis=1, concat_axis=0, tiled=True)
    return out, jax.lax.psum(block.sum(), "expert")


fn = jax.shard_map(exchange, mesh=mesh, in_specs=P("expert"), out_specs=(P("expert"), P()))
out, total = jax.jit(fn)(arr)
want = x.T.reshape(n * n, 1)  # device j receives column j of every row
for shard in out.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
assert float(total) == x.sum(), (float(total), x.sum())
print("OK", jax.process_index(), jax.process_count(), n, float(total), flush=True)
