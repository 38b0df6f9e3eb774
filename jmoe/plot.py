"""Plots a run's metrics to PNGs in `<workdir>/plots/`.

python -m jmoe.plot runs/tiny

- `loss.png`: training cross-entropy and held-out loss against step.
- `expert_load.png`: one heatmap per MoE layer, expert (rows) x logged step (columns),
  colour = fraction of the layer's routed slots that went to the expert.
- `expert_load_final.png`: MoE layer x expert load at the last logged step.
- `experts_per_token.png`: histogram of FFN experts per token at the last held-out eval,
  one bar group per MoE layer (from the dynamic routers' recomputed routing).
"""

import os
import sys

import numpy as np


def _layers(rows, key):
    names = {k.split("/")[1] for r in rows for k in r if k.startswith("moe/") and k.endswith(key)}
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def plot(workdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jmoe.train.metrics import read

    rows = read(workdir)
    train = [r for r in rows if r.get("split") == "train"]
    held = [r for r in rows if r.get("split") == "heldout"]
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = [_plot_loss(plt, train, held, out_dir)]
    written += _plot_expert_load(plt, train, out_dir)
    written += _plot_experts_per_token(plt, held, out_dir)
    return written


def _plot_loss(plt, train, held, out_dir):
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
    if held:
        ax.plot(
            [r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.set_title("loss")
    return _save(fig, out_dir, "loss.png")


def _plot_expert_load(plt, train, out_dir):
    """`expert_load.png` and `expert_load_final.png` (none without MoE layers)."""
    layers = _layers(train, "/expert_load")
    if not layers:
        return []
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 2.2 * len(layers)), squeeze=False)
    for ax, name in zip(axes[:, 0], layers, strict=True):
        pts = [r for r in train if f"moe/{name}/expert_load" in r]
        load = np.array([r[f"moe/{name}/expert_load"] for r in pts]).T  # [S, steps]
        im = ax.imshow(
            load,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            extent=(pts[0]["step"], pts[-1]["step"], load.shape[0] - 0.5, -0.5),
        )
        ax.set_ylabel(f"{name}\nexpert")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load over time")
    written = [_save(fig, out_dir, "expert_load.png")]

    last = train[-1]
    loads = [np.asarray(last.get(f"moe/{n}/expert_load", [])) for n in layers]
    width = max(len(x) for x in loads)
    grid = np.full((len(layers), width), np.nan)
    for i, x in enumerate(loads):
        grid[i, : len(x)] = x
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * width + 2), 0.5 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_title(f"expert load at step {last['step']}")
    fig.colorbar(im, ax=ax)
    written.append(_save(fig, out_dir, "expert_load_final.png"))
    return written


def _plot_experts_per_token(plt, held, out_dir):
    """`experts_per_token.png` (none without the held-out histograms)."""
    hist_layers = _layers(held, "/experts_per_token_hist")
    if not hist_layers:
        return []
    last = [r for r in held if any(k.endswith("_hist") for k in r)][-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(hist_layers)
    for i, name in enumerate(hist_layers):
        h = np.asarray(last[f"moe/{name}/experts_per_token_hist"], float)
        x = np.arange(len(h)) + (i - (n - 1) / 2) * 0.8 / n
        ax.bar(x, h / max(h.sum(), 1), width=0.8 / n, label=name)
    ax.set_xlabel("FFN experts per token")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"experts per token (held-out, step {last['step']})")
    ax.legend()
    return [_save(fig, out_dir, "experts_per_token.png")]


def _save(fig, out_dir, name):
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m jmoe.plot WORKDIR")
    for p in plot(argv[0]):
        print(p)


if __name__ == "__main__":
    main()
