"""The training loop: data -> jitted train step -> metrics, eval and checkpoints."""

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from jmoe import models
from jmoe.train import checkpoint, data, metrics, optim, step


def _mean_metrics(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        vals = np.stack([np.asarray(r[k]) for r in rows])
        out[k] = vals.sum(0) if k.endswith("_hist") else vals.mean(0)
    return out


def evaluate(eval_fn, state, batches) -> dict:
    rows = [
        jax.device_get(eval_fn(state.params, state.router_state, b, state.rng)) for b in batches
    ]
    m = _mean_metrics(rows)
    out = {"split": "heldout", "heldout_loss": m.pop("ce"), "heldout_accuracy": m.pop("accuracy")}
    return {**out, **m}


def _restore(cfg, workdir, model, optimizer, ds, example):
    """The checkpoint manager, the data iterator and the state to start from with its step:
    the latest checkpoint's (data position included), else a fresh state at step 0."""
    abstract = jax.eval_shape(lambda: step.init_state(model, optimizer, example, cfg.seed))
    mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
    restored = checkpoint.restore_latest(mngr, abstract)
    it = iter(ds.to_iter_dataset())
    if restored is None:
        state, start = step.init_state(model, optimizer, example, cfg.seed), 0
    else:
        state, data_state, start = restored
        it.set_state(data_state)
        print(f"resumed from step {start}")
    return mngr, it, state, start


def _train_row(window, schedule, s, tokens_per_batch, timed, t0) -> dict:
    """The logged training row: the window's mean metrics, the learning rate and tokens/s."""
    rows = jax.device_get(window)
    dt = time.perf_counter() - t0
    return {
        "split": "train",
        **_mean_metrics(rows),
        "lr": float(schedule(s)),
        "tokens_per_s": tokens_per_batch * timed / dt if timed else float("nan"),
    }


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))
    ds, eval_batches, info = data.make_data(cfg, cfg.seed)
    with open(os.path.join(workdir, "data_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    model = models.build(cfg)
    optimizer, schedule = optim.make_optimizer(cfg)
    example = ds[0]
    mngr, it, state, start = _restore(cfg, workdir, model, optimizer, ds, example)
    train_step = jax.jit(step.make_train_step(model, optimizer, cfg))
    eval_step = jax.jit(step.make_eval_step(model, cfg))
    writer = metrics.MetricsWriter(workdir, cfg.train.tensorboard)
    t = cfg.train
    tokens_per_batch = int(np.prod(example["targets"].shape))
    window, t0, timed, final = [], time.perf_counter(), 0, {}
    bar = tqdm(total=t.steps, initial=start, disable=not t.progress_bar, desc="train")
    for s in range(start, t.steps):
        batch = next(it)
        state, m = train_step(state, batch, jax.random.fold_in(state.rng, s))
        window.append(m)
        done = s + 1
        if s == start:  # keep compilation out of tokens/s.
            jax.block_until_ready(state)
            t0, timed = time.perf_counter(), 0
        else:
            timed += 1
        if done % t.log_every == 0 or done == t.steps:
            row = _train_row(window, schedule, s, tokens_per_batch, timed, t0)
            writer.write(done, row)
            bar.set_postfix(loss=f"{row['ce']:.3f}")
            final.update(row)
            window, t0, timed = [], time.perf_counter(), 0
        if done % t.eval_every == 0 or done == t.steps:
            ev = evaluate(eval_step, state, eval_batches)
            writer.write(done, ev)
            final.update(ev)
            tqdm.write(f"step {done}: heldout_loss {ev['heldout_loss']:.4f}")
            t0, timed = time.perf_counter(), 0
        stop = done == t.stop_at_step
        if done % t.checkpoint_every == 0 or done == t.steps or stop:
            checkpoint.save(mngr, done, state, it.get_state())
            t0, timed = time.perf_counter(), 0
        bar.update(1)
        if stop:
            break
    bar.close()
    writer.close()
    mngr.close()
    final.update({"step": int(state.step), **info})
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({k: metrics.to_python(v) for k, v in final.items()}, f, indent=2)
    return final


def held_out_loss(cfg, state, eval_batches) -> float:
    model = models.build(cfg)
    fn = jax.jit(step.make_eval_step(model, cfg))
    return float(evaluate(fn, state, eval_batches)["heldout_loss"])


__all__ = ["evaluate", "held_out_loss", "train_and_evaluate"]
