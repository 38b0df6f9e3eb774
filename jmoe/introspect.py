"""Looking inside a sharded program: what each device holds, and which collectives it runs.

- `sharding_rows(tree)`: one row per array leaf (path, global shape, `PartitionSpec`, the shape
  of the block each device holds, how many devices hold a copy of each block);
  `format_sharding(tree)` prints them as a table.
- `device_blocks(array)`: which slice of the global array each device holds.
- `collectives(hlo_text)`: every collective of a compiled module (`jit(f).lower(...).compile()
  .as_text()`) with its result bytes on one device; `collective_summary` counts them per op.
"""

import dataclasses
import math
import re

import jax
import numpy as np

COLLECTIVE_OPS = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
)
_OP = re.compile(r" (" + "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+)(\d*)\[([\d,]*)\]")
# Asynchronous starts of these return an (operand, result) tuple: only the result is moved.
_START_RETURNS_OPERAND = ("all-gather", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled HLO module.

    Attributes:
      op: the HLO opcode, one of `COLLECTIVE_OPS`.
      shapes: the shapes of its result (several for a tuple result).
      nbytes: bytes of its result on one device (what that device receives).
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int


def _itemsize(kind: str, bits: str) -> int:
    if kind == "pred":
        return 1
    return max(int(bits or 32) // 8, 1)


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of compiled HLO text, in program order (see `Collective`)."""
    out = []
    for line in hlo_text.splitlines():
        if " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1]
        m = _OP.search(rhs)
        if not m:
            continue
        found = _SHAPE.findall(rhs[: m.start()])
        if m.group(2) and m.group(1) in _START_RETURNS_OPERAND and len(found) > 1:
            found = found[len(found) // 2 :]
        shapes, nbytes = [], 0
        for kind, bits, dims in found:
            shape = tuple(int(s) for s in dims.split(",") if s)
            shapes.append(shape)
            nbytes += math.prod(shape) * _itemsize(kind, bits)
        out.append(Collective(m.group(1), tuple(shapes), nbytes))
    return out


def collective_summary(hlo_text: str) -> dict[str, dict[str, int]]:
    """`{op: {"count": n, "bytes": b}}` over the collectives of compiled HLO text (bytes per
    device, summed over the op's instructions); ops that do not occur are left out."""
    summary: dict[str, dict[str, int]] = {}
    for c in collectives(hlo_text):
        entry = summary.setdefault(c.op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.nbytes
    return summary


@dataclasses.dataclass(frozen=True)
class ShardingRow:
    """How one array of a pytree is laid out over the devices.

    Attributes:
      path: the leaf's key path, e.g. `params/w_out`.
      shape: the global shape.
      spec: the `PartitionSpec` as text (`-` for an array on one device).
      block: the shape of the block each device holds.
      copies: how many devices hold each block (1: fully sharded; the device count:
        replicated).
    """

    path: str
    shape: tuple[int, ...]
    spec: str
    block: tuple[int, ...]
    copies: int


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def sharding_rows(tree) -> list[ShardingRow]:
    """One `ShardingRow` per `jax.Array` leaf of `tree` (boxed Flax leaves are unboxed)."""
    import flax.linen as nn

    tree = nn.meta.unbox(tree)
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, jax.Array):
            continue
        sharding = leaf.sharding
        block = tuple(sharding.shard_shape(leaf.shape))
        blocks = math.prod(leaf.shape) // max(math.prod(block), 1) if leaf.size else 1
        spec = getattr(sharding, "spec", None)
        rows.append(
            ShardingRow(
                path="/".join(_key(k) for k in path),
                shape=tuple(leaf.shape),
                spec="-" if spec is None else str(tuple(spec)),
                block=block,
                copies=len(sharding.device_set) // max(blocks, 1),
            )
        )
    return rows


def format_sharding(tree) -> str:
    """`sharding_rows(tree)` as an aligned text table."""
    rows = sharding_rows(tree)
    head = ("array", "global shape", "PartitionSpec", "block per device", "copies")
    table = [head] + [(r.path, str(r.shape), r.spec, str(r.block), str(r.copies)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(line.rstrip() for line in lines)


def device_blocks(array: jax.Array) -> dict[int, tuple[slice, ...]]:
    """`{device id: the index (slices) of the global array that device holds}`."""
    index_map = array.sharding.devices_indices_map(array.shape)
    return {d.id: tuple(index_map[d]) for d in sorted(index_map, key=lambda d: d.id)}


def format_slices(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """`[0:2, :, :]`-style text of an index into an array of `shape`."""
    parts = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        parts.append(":" if (start, stop) == (0, n) else f"{start}:{stop}")
    return "[" + ", ".join(parts) + "]"


def device_grid(array: jax.Array, axis: int = 0) -> np.ndarray:
    """int `[devices, array.shape[axis]]`: 1 where a device holds that index along `axis`
    (e.g. which experts each device holds for an `[E, ...]` expert weight)."""
    blocks = device_blocks(array)
    grid = np.zeros((len(blocks), array.shape[axis]), np.int32)
    for row, index in enumerate(blocks.values()):
        start, stop, _ = index[axis].indices(array.shape[axis])
        grid[row, start:stop] = 1
    return grid


__all__ = [
    "COLLECTIVE_OPS",
    "Collective",
    "ShardingRow",
    "collective_summary",
    "collectives",
    "device_blocks",
    "device_grid",
    "format_sharding",
    "format_slices",
    "sharding_rows",
]
