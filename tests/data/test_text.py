"""The character-level text dataset: windows, the train/test cut per file, users per file."""

import pytest
import torch

from gossamer.data import load_dataset


def _corpus(tmp_path, texts):
    for name, body in texts.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    return str(tmp_path)


def test_windows_labels_and_one_user_per_file(tmp_path):
    a, b = "abcdefghij" * 3, "zyxwvutsrq" * 2
    root = _corpus(tmp_path, {"b.txt": b, "a.txt": a, "skip.md": "not read"})
    d = load_dataset("text", root=root, seq_len=4, stride=3, test_fraction=0.25)
    vocab = sorted(set(a + b))
    assert d.num_classes == len(vocab) and d.input_shape == (4,)
    decode = lambda row: "".join(vocab[i] for i in row.tolist())          # noqa: E731
    first = d.natural_partition[0]                                        # a.txt (sorted by name)
    assert decode(d.x_train[first[0]]) == "abcd" and vocab[int(d.y_train[first[0]])] == "e"
    assert decode(d.x_train[first[1]]) == "defg"                          # stride 3
    cut = int(len(a) * 0.75)                                              # 22: a's train text
    assert len(first) == len(range(0, cut - 4, 3))
    for row, label in zip(d.x_train[first], d.y_train[first], strict=True):   # all inside a[:cut]
        assert (decode(row) + vocab[int(label)]) in a[:cut]
    assert len(d.natural_partition) == 2 and d.natural_partition[1][0] == len(first)
    assert d.x_train.dtype == torch.int64 and len(d.y_test) > 0


def test_user_errors_are_one_line(tmp_path):
    root = _corpus(tmp_path, {"a.txt": "short"})
    with pytest.raises(ValueError, match="no training window"):
        load_dataset("text", root=root, seq_len=8)
    with pytest.raises(ValueError, match="no files match"):
        load_dataset("text", root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset("text", root=root, seq_len=0)
