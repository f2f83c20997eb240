"""FEMNIST and Shakespeare of LEAF, read from the JSON files LEAF's preprocessing writes.

Caldas, Duddu, Wu, et al., "LEAF: A Benchmark for Federated Settings", arXiv preprint 2018.
arXiv:1812.01097

`root` holds a `train/` and a `test/` folder of *.json files, each
`{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}`
(other keys, such as "hierarchies", are ignored). Files are read in sorted name order and
users in each file's order; `natural_partition[k]` lists user k's train rows. Test rows are
the kept users' test rows, concatenated in the same order. Every malformed input is a
one-line ValueError naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gossamer.data.datasets import DATASETS, Dataset, from_arrays

FEMNIST_CLASSES = 62
# The 80 characters of LEAF's Shakespeare model, in its order: ALL_LETTERS in
# models/utils/language_utils.py of github.com/TalwalkarLab/leaf; a character's id is its index.
SHAKESPEARE_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
SHAKESPEARE_SEQ_LEN = 80
_LETTER_IDS = np.full(128, -1, dtype=np.int64)
_LETTER_IDS[[ord(c) for c in SHAKESPEARE_LETTERS]] = np.arange(len(SHAKESPEARE_LETTERS))

# (x, y) of one user as read from JSON -> (features, labels) numpy arrays; `where` names the
# file and user for errors.
Parser = Callable[[list, list, str], tuple[np.ndarray, np.ndarray]]


@DATASETS.register("femnist")
def femnist(root: str, image: bool = False, max_users: int | None = None) -> Dataset:
    """FEMNIST: 28x28 handwritten digits and letters (62 classes), one user per writer.

    x: the 784 floats of LEAF's JSON as they are, shape (784,) or (1, 28, 28) with `image`.
    `max_users` keeps the first N train users (and their test rows).
    """
    train, test, users = _read_leaf("femnist", root, _femnist_user, max_users)
    shape = (1, 28, 28) if image else (784,)
    return from_arrays("femnist", train, test, FEMNIST_CLASSES, shape, users)


@DATASETS.register("shakespeare")
def shakespeare(root: str, max_users: int | None = None) -> Dataset:
    """Shakespeare: next-character prediction, one user per speaking role.

    x: int64 token ids [S, 80] of each 80-character string (ids = positions in LEAF's
    80-character alphabet, `SHAKESPEARE_LETTERS`); y: the next character's id, 80 classes.
    It needs a model over token ids, such as char_lstm; mlp/cnn take float features.
    """
    (x_tr, y_tr), (x_te, y_te), users = _read_leaf("shakespeare", root, _shakespeare_user, max_users)
    return Dataset(
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=len(SHAKESPEARE_LETTERS),
        input_shape=(SHAKESPEARE_SEQ_LEN,),
        name="shakespeare",
        natural_partition=users,
    )


def _read_leaf(
    name: str, root: str, parse: Parser, max_users: int | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[np.ndarray]]:
    """(train, test, natural partition) of LEAF's train/ and test/ folders under `root`."""
    if max_users is not None and (
        isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1
    ):
        raise ValueError(f"{name}: max_users must be a positive integer, got {max_users!r}")
    folder = Path(root).expanduser()
    train = read_leaf_split(name, folder / "train", parse, max_users)
    if not train:
        raise ValueError(f"{name}: no users in {folder / 'train'}")
    keep = {user for user, _, _ in train}
    test = [entry for entry in read_leaf_split(name, folder / "test", parse) if entry[0] in keep]
    sizes = [len(y) for _, _, y in train]
    offsets = np.cumsum([0, *sizes])
    users = [np.arange(offsets[k], offsets[k + 1], dtype=np.int64) for k in range(len(sizes))]
    return _stack(train), _stack(test, like=train[0]), users


def read_leaf_split(
    name: str, folder: Path, parse: Parser, max_users: int | None = None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(user, x, y) for the users of the *.json files in `folder` (sorted by file name, then
    each file's user order), stopping after `max_users`; a user seen twice is an error."""
    if not folder.is_dir():
        raise ValueError(f"{name}: missing directory {folder} (LEAF's train/ and test/ folders)")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ValueError(f"{name}: no *.json files in {folder}")
    out: list[tuple[str, np.ndarray, np.ndarray]] = []
    seen: dict[str, Path] = {}
    for path in files:
        for user, x, y in _read_leaf_file(path, parse):
            if user in seen:
                raise ValueError(f"{path}: user {user!r} also appears in {seen[user]}")
            seen[user] = path
            out.append((user, x, y))
            if max_users is not None and len(out) == max_users:
                return out
    return out


def _read_leaf_file(path: Path, parse: Parser) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        with path.open("rb") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= doc.keys():
        raise ValueError(f"{path}: not a LEAF file (needs keys users, num_samples, user_data)")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or not isinstance(data, dict):
        raise ValueError(f"{path}: users and num_samples must be lists and user_data an object")
    if len(users) != len(counts):
        raise ValueError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
    out = []
    for user, count in zip(users, counts, strict=True):
        where = f"{path}: user {user!r}"
        if not isinstance(user, str) or user not in data:
            raise ValueError(f"{where} has no entry in user_data")
        entry = data[user]
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) \
                or not isinstance(entry.get("y"), list):
            raise ValueError(f"{where}: user_data entry needs lists x and y")
        x, y = entry["x"], entry["y"]
        if len(x) != count or len(y) != count:
            raise ValueError(f"{where} has {len(x)} x and {len(y)} y but num_samples {count!r}")
        out.append((user, *parse(x, y, where)))
    return out


def _femnist_user(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        features = np.asarray(x, dtype=np.float32).reshape(len(x), -1) if x \
            else np.empty((0, 784), np.float32)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: x must be lists of 784 numbers") from None
    if features.shape[1] != 784:
        raise ValueError(f"{where}: x rows have {features.shape[1]} values, not 784")
    if not np.isfinite(features).all():
        raise ValueError(f"{where}: x holds NaN or infinite values")
    return features, _int_labels(y, FEMNIST_CLASSES, where)


def _int_labels(y: list, num_classes: int, where: str) -> np.ndarray:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in y):
        raise ValueError(f"{where}: y must be integers")
    labels = np.asarray(y, dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"{where}: label {bad[0]} outside 0..{num_classes - 1}")
    return labels


def _shakespeare_user(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(s, str) and len(s) == SHAKESPEARE_SEQ_LEN for s in x):
        raise ValueError(f"{where}: x must be strings of {SHAKESPEARE_SEQ_LEN} characters")
    if not all(isinstance(c, str) and len(c) == 1 for c in y):
        raise ValueError(f"{where}: y must be single characters")
    ids = _letter_ids("".join(x) + "".join(y), where)
    n = len(x)
    return ids[: n * SHAKESPEARE_SEQ_LEN].reshape(n, SHAKESPEARE_SEQ_LEN), ids[n * SHAKESPEARE_SEQ_LEN:]


def _letter_ids(text: str, where: str) -> np.ndarray:
    """Ids of `text`'s characters in LEAF's alphabet; a character outside it is an error."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    ids = _LETTER_IDS[np.minimum(codes, 127)]
    bad = np.flatnonzero((ids < 0) | (codes > 127))
    if bad.size:
        raise ValueError(f"{where}: character {text[bad[0]]!r} is not in LEAF's Shakespeare alphabet")
    return ids


def _stack(
    entries: list[tuple[str, np.ndarray, np.ndarray]],
    like: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    if not entries:
        assert like is not None
        _, x, y = like
        return np.empty((0, *x.shape[1:]), x.dtype), np.empty(0, y.dtype)
    return np.concatenate([x for _, x, _ in entries]), np.concatenate([y for _, _, y in entries])
