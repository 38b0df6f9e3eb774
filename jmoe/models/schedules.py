"""DynaMoE layer-wise capacity schedules: how many experts each MoE layer gets.

DynaMoE (2026) varies expert capacity across depth. Here a schedule is a pure function
`(schedule, num_layers, budget) -> experts per layer` that keeps the total `budget` exactly.

Every shape is a list of positive weights `w_l`, l = 0..L-1 (layer 0 is nearest the input),
with `d_l = min(l, L-1-l)` (distance to the nearer end) and `D = max_l d_l`:

| schedule    | weight `w_l`                              | shape, e.g. L = 4             |
| ----------- | ----------------------------------------- | ----------------------------- |
| `uniform`   | 1                                         | 1 1 1 1                       |
| `descending`| L - l  (most experts at the input)        | 4 3 2 1                       |
| `ascending` | l + 1  (most experts at the output)       | 1 2 3 4                       |
| `pyramid`   | 1 + d_l  (most experts in the middle)     | 1 2 2 1                       |
| `hourglass` | 1 + D - d_l  (inverse pyramid: fewest in the middle) | 2 1 1 2            |
| `wave`      | 2 + cos(2 pi * cycles * l / L), cycles = 2 | 3 1 3 1 (L=8: 3 2 1 2 3 2 1 2) |

Allocation: every layer first gets `min_experts`; the remaining `budget - L * min_experts`
experts are split in proportion to `w_l` by the largest-remainder method (floor of each
share, then one more expert to the layers with the largest fractional parts, ties to the
earlier layer). The result sums to `budget` exactly and follows the weights' order.

Top-k per layer (`scale_top_k=True`): `k_l = clip(round(top_k * E_l / mean(E)), 1, E_l)`,
so layers with more experts also activate more of them; otherwise `k_l = min(top_k, E_l)`.
"""

import math
from typing import Literal, get_args

Schedule = Literal["uniform", "descending", "ascending", "pyramid", "hourglass", "wave"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def schedule_weights(schedule: str, num_layers: int, cycles: int = 2) -> list[float]:
    """The unnormalised per-layer weights `w_l` of a schedule (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    n = num_layers
    d = [min(i, n - 1 - i) for i in range(n)]
    if schedule == "uniform":
        return [1.0] * n
    if schedule == "descending":
        return [float(n - i) for i in range(n)]
    if schedule == "ascending":
        return [float(i + 1) for i in range(n)]
    if schedule == "pyramid":
        return [1.0 + di for di in d]
    if schedule == "hourglass":
        return [1.0 + max(d) - di for di in d]
    return [round(2.0 + math.cos(2.0 * math.pi * cycles * i / n), 12) for i in range(n)]


def experts_per_layer(
    schedule: str, num_layers: int, budget: int, *, min_experts: int = 1, cycles: int = 2
) -> list[int]:
    """Experts in each of `num_layers` MoE layers, summing to `budget`.

    Raises:
      ValueError: unknown schedule, or `budget < num_layers * min_experts`.
    """
    w = schedule_weights(schedule, num_layers, cycles)
    if min_experts < 1:
        raise ValueError(f"min_experts={min_experts} must be >= 1")
    spare = budget - num_layers * min_experts
    if spare < 0:
        raise ValueError(
            f"budget={budget} is smaller than num_layers * min_experts = "
            f"{num_layers} * {min_experts}"
        )
    total = sum(w)
    shares = [spare * wi / total for wi in w]
    alloc = [math.floor(s + 1e-9) for s in shares]
    left = spare - sum(alloc)
    order = sorted(range(num_layers), key=lambda i: (-(shares[i] - alloc[i]), i))
    for i in order[:left]:
        alloc[i] += 1
    return [min_experts + a for a in alloc]


def top_k_per_layer(experts: list[int], top_k: int, *, scale_top_k: bool = False) -> list[int]:
    """Experts per token in each layer (see the module docstring)."""
    if not scale_top_k:
        return [min(top_k, e) for e in experts]
    mean = sum(experts) / len(experts)
    return [max(1, min(e, int(math.floor(top_k * e / mean + 0.5)))) for e in experts]


def layer_plan(
    schedule: str,
    num_layers: int,
    budget: int,
    top_k: int,
    *,
    min_experts: int = 1,
    scale_top_k: bool = False,
    cycles: int = 2,
) -> list[tuple[int, int]]:
    """`[(num_experts_l, top_k_l)]` for each MoE layer."""
    e = experts_per_layer(schedule, num_layers, budget, min_experts=min_experts, cycles=cycles)
    return list(zip(e, top_k_per_layer(e, top_k, scale_top_k=scale_top_k), strict=True))
