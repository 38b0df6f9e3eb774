"""Data pipelines through grain: byte-level text windows, and sklearn digits.

Text: files are split into train / held-out by a hash of their path (deterministic), read
as bytes (vocab 256) and concatenated. Training example i is a window at a start drawn
from `np.random.default_rng([seed, i])`, so example i is the same in every run and the
pipeline position is one integer (grain's iterator state, saved in checkpoints).

With several JAX processes each process reads only its rows [lo, hi) of every global batch
(`rows`): its local example j is global example (j // n) * batch_size + lo + j % n, n = hi - lo.
The global batch at step s and the saved position are then the same for any process count.
"""

import glob as glob_lib
import os
import sysconfig
import zlib

import grain
import numpy as np


def text_files(path: str = "", pattern: str = "*.py") -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the text files: `path` or the Python stdlib sources."""
    if not path:
        root = sysconfig.get_paths()["stdlib"]
        files = glob_lib.glob(os.path.join(root, "**", "*.py"), recursive=True)
        files = [f for f in files if "site-packages" not in f and "dist-packages" not in f]
    elif os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    else:
        root = path
        files = glob_lib.glob(os.path.join(root, "**", pattern or "*"), recursive=True)
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"no text files found under {path or root!r}")
    return root, sorted(os.path.relpath(f, root) for f in files)


def is_heldout(relpath: str, heldout_percent: int) -> bool:
    return zlib.crc32(relpath.encode()) % 100 < heldout_percent


def load_text(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, held-out bytes) as uint8 arrays. A single file is split 90/10 by bytes."""
    root, files = text_files(cfg.path, cfg.glob)
    chunks = {False: [], True: []}
    sizes = {False: 0, True: 0}
    cap = cfg.max_bytes or None
    # A fixed pseudo-random file order, so a byte cap samples the whole tree.
    for rel in sorted(files, key=lambda r: (zlib.adler32(r.encode()), r)):
        held = is_heldout(rel, cfg.heldout_percent) and len(files) > 1
        limit = cap if not held else (cap * cfg.heldout_percent // 100 if cap else None)
        if limit and sizes[held] >= limit:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        chunks[held].append(np.frombuffer(data, np.uint8))
        sizes[held] += len(data)
    train = np.concatenate(chunks[False]) if chunks[False] else np.zeros(0, np.uint8)
    held = np.concatenate(chunks[True]) if chunks[True] else np.zeros(0, np.uint8)
    if len(files) == 1 or len(held) < 2 * (cfg.seq_len + 1):
        cut = int(len(train) * (1 - max(cfg.heldout_percent, 1) / 100))
        train, held = train[:cut], np.concatenate([held, train[cut:]])
    if len(train) <= cfg.seq_len + 1:
        raise ValueError(f"only {len(train)} training bytes; need more than seq_len + 1")
    return train, held


class _Window:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __call__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        start = int(rng.integers(0, len(self.tokens) - self.seq_len - 1))
        w = self.tokens[start : start + self.seq_len + 1].astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:]}


class _GlobalIndex:
    """Local example j of the process holding rows [lo, lo + n) -> its global example index."""

    def __init__(self, batch_size: int, lo: int, n: int):
        self.batch_size, self.lo, self.n = batch_size, lo, n

    def __call__(self, j):
        return (int(j) // self.n) * self.batch_size + self.lo + int(j) % self.n


def _check_rows(rows, batch_size: int) -> tuple[int, int]:
    lo, hi = (0, batch_size) if rows is None else rows
    if not 0 <= lo < hi <= batch_size:
        raise ValueError(f"rows={rows!r} must satisfy 0 <= lo < hi <= batch_size={batch_size}")
    return lo, hi


def process_batches(examples: grain.MapDataset, batch_size: int, rows=None):
    """Batches of this process's `rows` (lo, hi) of every global batch of `examples`."""
    lo, hi = _check_rows(rows, batch_size)
    if (lo, hi) == (0, batch_size):
        return examples.batch(batch_size, drop_remainder=True)
    n = hi - lo
    idx = grain.MapDataset.range(0, 2**40 // batch_size * n).map(_GlobalIndex(batch_size, lo, n))
    return idx.map(examples.__getitem__).batch(n, drop_remainder=True)


def text_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rows=None):
    """An endless grain dataset of batches {'inputs', 'targets'}: int32 [B, seq_len] (with
    `rows` (lo, hi): this process's rows of each global batch of B)."""
    ds = grain.MapDataset.range(0, 2**40).map(_Window(tokens, seq_len, seed))
    return process_batches(ds, batch_size, rows)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n: int, seed: int = 1234):
    ds = text_dataset(tokens, seq_len, batch_size, seed)
    return [ds[i] for i in range(n)]


def unigram_entropy(train: np.ndarray, heldout: np.ndarray) -> float:
    """Held-out cross-entropy (nats/byte) of a byte-unigram model fitted on `train` (add-1)."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-np.mean(logp[heldout]))


def load_digits(heldout_percent: int, seed: int = 0):
    """((x_train, y_train), (x_test, y_test)) of sklearn's 8x8 digits, x scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) * heldout_percent // 100
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def array_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, rows=None):
    """Endless shuffled grain batches {'inputs', 'targets'} of (x, y): one reshuffle per epoch
    (with `rows`: this process's rows of each global batch)."""
    ds = grain.MapDataset.range(0, len(x)).shuffle(seed=seed).repeat()
    ds = ds.map(lambda i: {"inputs": x[i], "targets": y[i]})
    return process_batches(ds, batch_size, rows)


def make_data(cfg, seed: int, rows=None):
    """(train grain MapDataset, list of held-out batches, info dict) for `cfg.data`; with
    `rows` (lo, hi) the train batches hold only those rows of each global batch."""
    d = cfg.data
    if d.kind == "text":
        train, held = load_text(d)
        info = {
            "train_bytes": int(len(train)),
            "heldout_bytes": int(len(held)),
            "unigram_entropy": unigram_entropy(train, held),
        }
        ds = text_dataset(train, d.seq_len, d.batch_size, seed, rows)
        return ds, eval_batches(held, d.seq_len, d.batch_size, d.eval_batches), info
    if d.kind == "digits":
        (xt, yt), (xe, ye) = load_digits(d.heldout_percent, seed)
        if cfg.model.arch == "vit":
            xt, xe = xt.reshape(-1, 8, 8), xe.reshape(-1, 8, 8)
        info = {"train_examples": int(len(xt)), "heldout_examples": int(len(xe))}
        return (
            array_dataset(xt, yt, d.batch_size, seed, rows),
            [{"inputs": xe, "targets": ye}],
            info,
        )
    raise ValueError(f"data.kind={d.kind!r} is not one of ('text', 'digits')")
