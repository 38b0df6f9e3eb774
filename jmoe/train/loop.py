"""The training loop: data -> jitted train step -> metrics, eval and checkpoints."""

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from jmoe import models
from jmoe.train import checkpoint, data, metrics, optim, parallel, step


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


def _restore(cfg, workdir, model, optimizer, ds, example, shardings):
    """The checkpoint manager, the data iterator and the state to start from with its step:
    the latest checkpoint's (data position included), else a fresh state at step 0. The
    state is created or restored straight into `shardings` (each process reads its shards)."""
    abstract = parallel.abstract_state(model, optimizer, example, cfg.seed, shardings)
    mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
    restored = checkpoint.restore_latest(mngr, abstract)
    it = iter(ds.to_iter_dataset())
    if restored is None:
        state, start = parallel.init_state(model, optimizer, example, cfg.seed, shardings), 0
    else:
        state, data_state, start = restored
        it.set_state(data_state)
        if jax.process_index() == 0:
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


def _write_json(workdir: str, name: str, text: str) -> None:
    if jax.process_index() == 0:  # run files come from process 0 only
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)


def train_and_evaluate(cfg, workdir: str) -> dict:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns final metrics.

    Runs over a mesh of every device of every JAX process (`config.mesh`); with several
    processes each reads its own rows of the data, and process 0 writes metrics and files.
    """
    mesh = parallel.build_mesh(cfg)
    parallel.check_batch_size(mesh, cfg.data.batch_size)
    with jax.set_mesh(mesh):
        return _train(cfg, workdir, mesh)


def _train(cfg, workdir: str, mesh) -> dict:
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    _write_json(workdir, "config.json", cfg.to_json(indent=2))
    rows = parallel.process_rows(mesh, cfg.data.batch_size)
    ds, eval_batches, info = data.make_data(cfg, cfg.seed, rows)
    eval_batches = [parallel.replicated_batch(mesh, b) for b in eval_batches]
    _write_json(workdir, "data_info.json", json.dumps(info, indent=2))
    model = models.build(cfg)
    optimizer, schedule = optim.make_optimizer(cfg)
    example = ds[0]
    shardings = parallel.state_shardings(model, optimizer, example, cfg.seed, mesh)
    mngr, it, state, start = _restore(cfg, workdir, model, optimizer, ds, example, shardings)
    train_step = parallel.jit_train_step(
        step.make_train_step(model, optimizer, cfg), shardings, mesh
    )
    eval_step = parallel.jit_eval_step(step.make_eval_step(model), mesh)
    t = cfg.train
    writer = metrics.MetricsWriter(workdir, t.tensorboard) if primary else parallel.NullWriter()
    tokens_per_batch = cfg.data.batch_size * int(np.prod(example["targets"].shape[1:]))
    window, t0, timed, final = [], time.perf_counter(), 0, {}
    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress_bar and primary), desc="train")
    for s in range(start, t.steps):
        batch = parallel.global_batch(mesh, next(it), cfg.data.batch_size)
        state, m = train_step(state, batch)
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
            if primary:
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
    out = {k: metrics.to_python(v) for k, v in final.items()}
    _write_json(workdir, "final_metrics.json", json.dumps(out, indent=2))
    return final


__all__ = ["evaluate", "train_and_evaluate"]
