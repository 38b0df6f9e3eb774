"""Train state and pure train / eval steps (no jit inside: callers jit with shardings)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a resumed run needs: step, params, optimizer state, router state, rng."""

    step: jax.Array
    params: Any
    opt_state: Any
    router_state: Any
    rng: jax.Array


def init_state(model: nn.Module, optimizer, batch, seed: int) -> TrainState:
    """Initial state (params unboxed), built under `jax.jit` (eager init is slow)."""
    inputs = jax.ShapeDtypeStruct(batch["inputs"][:1].shape, jnp.asarray(batch["inputs"]).dtype)

    def init():
        rng = jax.random.PRNGKey(seed)
        k_params, k_router, k_train = jax.random.split(rng, 3)
        x = jnp.zeros(inputs.shape, inputs.dtype)
        variables = nn.meta.unbox(model.init({"params": k_params, "router": k_router}, x))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            router_state=variables.get("router_state", {}),
            rng=k_train,
        )

    return jax.jit(init)()


def _losses(logits, targets):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.mean(ce), jnp.mean(acc)


def _layer_metrics(aux) -> dict[str, Any]:
    out = {}
    for name, stats in aux["layers"].items():
        for k, v in stats.items():
            if not k.endswith("_loss"):
                out[f"moe/{name}/{k}"] = v
    return out


def _variables(params, router_state) -> dict:
    return {"params": params, **({"router_state": router_state} if router_state else {})}


def make_train_step(model: nn.Module, optimizer, cfg):
    """`train_step(state, batch, rng) -> (state, metrics)`, a pure function of pytrees.

    Loss = cross-entropy + `moe.load_balance_weight` * balance loss + `moe.z_loss_weight`
    * z-loss + `moe.entropy_loss_weight` * router entropy loss (all summed over MoE layers).
    The model's layers update their own `router_state` (e.g. the sigmoid router's selection
    bias) in the forward pass, outside the gradient.
    """
    moe = cfg.moe

    def loss_fn(params, state, batch, rng):
        (logits, aux), new_vars = model.apply(
            _variables(params, state.router_state),
            batch["inputs"],
            deterministic=False,
            rngs={"router": rng},
            mutable=["router_state"],
        )
        ce, acc = _losses(logits, batch["targets"])
        loss = (
            ce
            + moe.load_balance_weight * aux["load_balance_loss"]
            + moe.z_loss_weight * aux["z_loss"]
            + moe.entropy_loss_weight * aux["entropy_loss"]
        )
        return loss, (ce, acc, aux, new_vars.get("router_state", {}))

    def train_step(state: TrainState, batch, rng):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, acc, aux, router_state)), grads = grad_fn(state.params, state, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "ce": ce,
            "accuracy": acc,
            "grad_norm": optax.tree.norm(grads),
            "load_balance_loss": aux["load_balance_loss"],
            "z_loss": aux["z_loss"],
            "entropy_loss": aux["entropy_loss"],
            **_layer_metrics(aux),
        }
        new = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, router_state=router_state
        )
        return new, metrics

    return train_step


def make_eval_step(model: nn.Module):
    """`eval_step(params, router_state, batch, rng) -> metrics` (deterministic routing),
    with every MoE layer's statistics (e.g. `moe/layer_l/experts_per_token_hist`)."""

    def eval_step(params, router_state, batch, rng):
        logits, aux = model.apply(
            _variables(params, router_state),
            batch["inputs"],
            deterministic=True,
            rngs={"router": rng},
        )
        ce, acc = _losses(logits, batch["targets"])
        return {"ce": ce, "accuracy": acc, **_layer_metrics(aux)}

    return eval_step
