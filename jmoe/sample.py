"""Generates text from a run's latest checkpoint, decoding with the KV cache.

python -m jmoe.sample --workdir runs/tiny --prompt "def " [--num_tokens 200 --temperature 0.8]
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from jmoe import models


def _define_flags():
    flags.DEFINE_string("workdir", None, "Run directory with config.json and checkpoints.")
    flags.DEFINE_string("prompt", "def ", "Prompt text (encoded as UTF-8 bytes).")
    flags.DEFINE_integer("num_tokens", 200, "Bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load(workdir: str):
    """(config, model, state, step) of the latest checkpoint in `workdir`."""
    from jmoe.train import checkpoint, optim, step

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    # Sampling runs on one device: a model trained with expert parallelism runs unsharded.
    cfg.moe.expert_axis = cfg.moe.tensor_axis = None
    model = models.build(cfg)
    optimizer, _ = optim.make_optimizer(cfg)
    example = {"inputs": np.zeros((1, 8), np.int32)}
    abstract = jax.eval_shape(lambda: step.init_state(model, optimizer, example, cfg.seed))
    state, at = checkpoint.restore_params(workdir, abstract)
    return cfg, model, state, at


def generate(
    model, params, router_state, prompt: bytes, num_tokens: int, temperature: float, seed: int = 0
) -> bytes:
    """Prefills the cache with `prompt`, then samples `num_tokens` bytes one at a time."""
    max_len = model.model.max_len
    if not prompt:
        prompt = b"\n"
    prompt = prompt[-(max_len - 1) :]
    num_tokens = min(num_tokens, max_len - len(prompt))
    variables = {"params": params, **({"router_state": router_state} if router_state else {})}

    @jax.jit
    def run(cache, tokens, rng):
        (logits, _), upd = model.apply(
            {**variables, "cache": cache},
            tokens,
            decode=True,
            mutable=["cache"],
            rngs={"router": rng},
        )
        last = logits[:, -1]
        if temperature > 0:
            nxt = jax.random.categorical(rng, last / temperature)
        else:
            nxt = jnp.argmax(last, -1)
        return upd["cache"], nxt.astype(jnp.int32)

    rng = jax.random.PRNGKey(seed)
    cache = model.init_cache(1)
    tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None]
    out = []
    for i in range(num_tokens):
        cache, nxt = run(cache, tokens, jax.random.fold_in(rng, i))
        out.append(int(nxt[0]))
        tokens = nxt[:, None]
    return bytes(out)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    cfg, model, state, at = load(f.workdir)
    if cfg.model.kind != "lm":
        raise app.UsageError("jmoe.sample needs a language-model run (model.kind='lm')")
    prompt = f.prompt.encode()
    text = generate(
        model, state.params, state.router_state, prompt, f.num_tokens, f.temperature, f.seed
    )
    print(f"[step {at}]")
    print((prompt + text).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    _define_flags()  # only when run as a program: importing `load`/`generate` defines no flags.
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
