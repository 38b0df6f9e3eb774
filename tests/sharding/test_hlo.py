"""The compiled expert-parallel layer moves tokens (all-to-all), never the expert weights."""

import re

import jax
import jax.numpy as jnp

from jmoe.layers import MoE
from jmoe.sharding import batch_sharding, sharded_init
from tests.sharding._helpers import D, E, F, layer_kwargs, mesh_of

_OP = re.compile(
    r" (all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)(-start)?\("
)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _parse(text):
    """(op, result shape) for every collective in HLO text (tuple results give several)."""
    out = []
    for line in text.splitlines():
        m = _OP.search(line)
        if m and " = " in line:
            lhs = line.split(" = ", 1)[1][: m.start()]
            for dims in _SHAPE.findall(lhs):
                out.append((m.group(1), tuple(int(s) for s in dims.split(",") if s)))
    return out


def _collectives(model, mesh, x):
    variables, shardings = sharded_init(model, mesh, jax.random.key(1), x)
    xs = jax.device_put(x, batch_sharding(mesh, ("data", "fsdp", "expert"), x.ndim))

    def loss(v, xx):
        y, aux = model.apply(v, xx)
        return jnp.sum(y**2) + aux["load_balance_loss"]

    step = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, xs.sharding))
    text = step.lower(variables, xs).compile().as_text()
    return _parse(text)


def _gathers_expert_weights(collectives):
    full = {(E, D, F), (E, F, D)}
    return [shape for op, shape in collectives if op == "all-gather" and shape in full]


def test_no_all_gather_of_expert_weights():
    mesh = mesh_of(data=1, expert=8)
    x = jax.random.normal(jax.random.key(0), (8, 8, D))
    ep = _collectives(MoE(**layer_kwargs(), expert_axis="expert", mesh=mesh), mesh, x)
    assert any(op == "all-to-all" for op, _ in ep), "tokens must move by all-to-all"
    assert _gathers_expert_weights(ep) == []
    # Nothing is all-gathered at all: routing runs per token shard (no [T, S] logits gather).
    assert [s for op, s in ep if op == "all-gather"] == []
    # No collective of any kind carries a full [E, D, F] weight (gradients included).
    assert not [s for _, s in ep if len(s) == 3 and s[0] == E and set(s[1:]) == {D, F}]
    # Control: the same sharded weights under plain GSPMD (no expert_axis) are all-gathered,
    # so the check above can fail.
    plain = _collectives(MoE(**layer_kwargs()), mesh, x)
    assert _gathers_expert_weights(plain)
