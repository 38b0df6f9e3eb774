"""Chain-of-Experts (Wang et al., 2025): C routed iterations over one set of experts.

Inside one layer, x^t = x^{t-1} + MoE_t(x^{t-1}) for t = 1..C; every iteration has its own
router (and, for the sigmoid router, its own selection bias), while the expert weights
(routed and shared experts, MoE++ constant experts) are shared across the iterations.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe.layers.moe import MoE, router_state_error

# Per-iteration parameters of the wrapped MoE layer; every other parameter is shared.
ROUTER_PARAMS = ("router", "gating_residual")


class ChainOfExperts(nn.Module):
    """`y, aux = ChainOfExperts(moe=MoE(...), iterations=C).apply(variables, x)`.

    Returns the chain's update `y = x^C - x^0` (so a block adds it as a residual like any
    FFN), and aux with the MoE layer's keys: losses summed over iterations, statistics
    averaged (`expert_counts` summed), `router_logits` and `experts_per_token_hist` of the
    last iteration, plus
    `iterations`: a list of each iteration's own aux.
    Variables: `params/experts/...` (shared), `params/iter_{t}/router` and
    `router_state/iter_{t}/bias` (sigmoid router).
    """

    moe: MoE
    iterations: int = 2

    def _init_all(self, rng, x, token_ids):
        variables = self.moe.init(
            {"params": rng, "router": rng}, x, deterministic=True, token_ids=token_ids
        )
        return variables

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, token_ids=None, prev_logits=None):
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1")
        moe = self.moe.clone(parent=None)
        shapes = jax.eval_shape(lambda: self._init_all(jax.random.PRNGKey(0), x, token_ids))

        def sub_init(keep):
            def init(rng):
                p = self._init_all(rng, x, token_ids)["params"]
                return {k: v for k, v in p.items() if keep(k)}

            return init

        shared = self.param("experts", sub_init(lambda k: k not in ROUTER_PARAMS))
        bias_shape = shapes.get("router_state", {}).get("bias")
        h = x
        auxes = []
        for t in range(self.iterations):
            own = self.param(f"iter_{t}", sub_init(lambda k: k in ROUTER_PARAMS))
            variables = {"params": {**shared, **own}}
            state = None if bias_shape is None else self._iteration_state(t, bias_shape.shape)
            if state is not None:
                variables["router_state"] = state.value
            rngs = {"router": self.make_rng("router")} if self.has_rng("router") else {}
            (y, aux), new = moe.apply(
                variables,
                h,
                deterministic=deterministic,
                token_ids=token_ids,
                prev_logits=prev_logits,
                rngs=rngs,
                mutable=["router_state"],
            )
            keep = self.is_mutable_collection("router_state") and not self.is_initializing()
            if state is not None and keep:
                state.value = new["router_state"]
            prev_logits = aux["router_logits"]
            h = h + y.astype(h.dtype)
            auxes.append(aux)
        return (h - x).astype(self.moe.dtype), merge_aux(auxes)

    def _iteration_state(self, t: int, shape):
        """Iteration t's own `router_state` (the selection bias of its router)."""
        missing = not self.has_variable("router_state", f"iter_{t}")
        if missing and not self.is_mutable_collection("router_state"):
            raise router_state_error(self.moe.router)
        return self.variable(
            "router_state", f"iter_{t}", lambda: {"bias": jnp.zeros(shape, jnp.float32)}
        )


def merge_aux(auxes: list[dict[str, Any]]) -> dict[str, Any]:
    """Combines the aux dicts of C iterations (see `ChainOfExperts`)."""
    out = {}
    for k in auxes[0]:
        vals = [a[k] for a in auxes]
        if k == "router_logits" or k.endswith("_hist"):
            out[k] = vals[-1]
        elif k.endswith("_loss") or k == "expert_counts":
            out[k] = sum(vals)
        elif k == "experts_per_token_min":
            out[k] = jnp.min(jnp.stack(vals))
        elif k == "experts_per_token_max":
            out[k] = jnp.max(jnp.stack(vals))
        else:
            out[k] = sum(vals) / len(vals)
    out["iterations"] = auxes
    return out
