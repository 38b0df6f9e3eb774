"""DynaMoE layer-wise schedules: documented per-layer numbers and budget preservation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jmoe.models import schedules
from jmoe.models.schedules import SCHEDULES, experts_per_layer, layer_plan, schedule_weights

# The shapes documented in jmoe/models/schedules.py (L = 4) and worked allocations.
WEIGHTS_L4 = {
    "uniform": [1, 1, 1, 1],
    "descending": [4, 3, 2, 1],
    "ascending": [1, 2, 3, 4],
    "pyramid": [1, 2, 2, 1],
    "hourglass": [2, 1, 1, 2],
    "wave": [3, 1, 3, 1],
}
EXPERTS_L4_B32_MIN2 = {
    "uniform": [8, 8, 8, 8],
    "descending": [12, 9, 7, 4],
    "ascending": [4, 7, 9, 12],
    "pyramid": [6, 10, 10, 6],
    "hourglass": [10, 6, 6, 10],
    "wave": [11, 5, 11, 5],
}
EXPERTS_L8_B64 = {
    "uniform": [8] * 8,
    "descending": [13, 12, 10, 9, 7, 6, 4, 3],
    "ascending": [3, 4, 6, 7, 9, 10, 12, 13],
    "pyramid": [4, 7, 9, 12, 12, 9, 7, 4],
    "hourglass": [12, 9, 7, 4, 4, 7, 9, 12],
    "wave": [12, 8, 5, 8, 11, 8, 4, 8],  # .5 ties go to the earlier layers.
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_documented_weights(name):
    assert schedule_weights(name, 4) == WEIGHTS_L4[name]
    assert f"`{name}`" in schedules.__doc__


@pytest.mark.parametrize("name", SCHEDULES)
def test_documented_allocations(name):
    assert experts_per_layer(name, 4, 32, min_experts=2) == EXPERTS_L4_B32_MIN2[name]
    assert experts_per_layer(name, 8, 64) == EXPERTS_L8_B64[name]


def test_wave_l8_weights_and_uneven_uniform():
    assert schedule_weights("wave", 8) == [3, 2, 1, 2, 3, 2, 1, 2]
    assert experts_per_layer("uniform", 3, 10) == [4, 3, 3]  # remainder to the earlier layer.


def test_top_k_per_layer():
    plan = layer_plan("descending", 4, 32, 2, min_experts=2, scale_top_k=True)
    assert plan == [(12, 3), (9, 2), (7, 2), (4, 1)]
    assert layer_plan("descending", 4, 32, 2, min_experts=2) == [(12, 2), (9, 2), (7, 2), (4, 2)]


def test_errors():
    with pytest.raises(ValueError, match="schedule"):
        experts_per_layer("zigzag", 4, 32)
    with pytest.raises(ValueError, match="budget"):
        experts_per_layer("uniform", 4, 7, min_experts=2)


@given(
    name=st.sampled_from(SCHEDULES),
    layers=st.integers(1, 24),
    extra=st.integers(0, 300),
    min_e=st.integers(1, 4),
)
def test_budget_is_kept_and_shape_followed(name, layers, extra, min_e):
    budget = layers * min_e + extra
    e = experts_per_layer(name, layers, budget, min_experts=min_e)
    assert sum(e) == budget and min(e) >= min_e and len(e) == layers
    w = schedule_weights(name, layers)
    for i in range(layers):
        for j in range(layers):
            if w[i] > w[j]:
                assert e[i] >= e[j]
