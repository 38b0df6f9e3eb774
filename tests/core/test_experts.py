"""The expert FFN bodies against products written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import experts

T, D, F, E = 12, 8, 6, 3


def _w(seed, *shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) / np.sqrt(shape[-2])


def test_swiglu_gate_and_up_are_the_interleaved_columns():
    x, w, w_out = _w(0, T, D), _w(1, D, F, 2), _w(2, F, D)
    want = (jax.nn.silu(x @ w[..., 0]) * (x @ w[..., 1])) @ w_out
    got = experts.dense_ffn({"w_gate_in": w, "w_out": w_out}, x, "swiglu")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_and_batched_swiglu_match_per_expert_products():
    x, w, w_out = _w(3, T, D), _w(4, E, D, F, 2), _w(5, E, F, D)
    sizes = jnp.asarray([5, 0, 7], jnp.int32)
    group = np.repeat(np.arange(E), np.asarray(sizes))
    want = jnp.stack(
        [
            (jax.nn.silu(x[i] @ w[g, ..., 0]) * (x[i] @ w[g, ..., 1])) @ w_out[g]
            for i, g in enumerate(group)
        ]
    )
    params = {"w_gate_in": w, "w_out": w_out}
    got = experts.grouped_ffn(params, x, sizes, "swiglu", implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    buf = jnp.zeros((E, 7, D)).at[0, :5].set(x[:5]).at[2].set(x[5:])
    out = experts.batched_ffn(params, buf, "swiglu")
    np.testing.assert_allclose(out[0, :5], want[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[2], want[5:], rtol=1e-5, atol=1e-5)


def test_gelu_uses_w_in():
    x, w_in, w_out = _w(6, T, D), _w(7, D, F), _w(8, F, D)
    got = experts.dense_ffn({"w_in": w_in, "w_out": w_out}, x, "gelu")
    np.testing.assert_allclose(got, jax.nn.gelu(x @ w_in) @ w_out, rtol=1e-5, atol=1e-5)
    assert experts.param_names("gelu") == ("w_in", "w_out")
    assert experts.param_names("swiglu") == ("w_gate_in", "w_out")
