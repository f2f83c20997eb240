"""LEAF (femnist, shakespeare), cifar100 and table datasets on tiny files in their real formats."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gossamer.config import ConfigError
from gossamer.data import load_dataset
from gossamer.data.leaf import SHAKESPEARE_LETTERS

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def leaf_users(root: Path, split: str) -> list[tuple[str, dict]]:
    """(user, {"x", "y"}) in file-name then file order, straight from the JSON."""
    out = []
    for path in sorted((root / split).glob("*.json")):
        doc = json.loads(path.read_text())
        assert [len(doc["user_data"][u]["y"]) for u in doc["users"]] == doc["num_samples"]
        out += [(u, doc["user_data"][u]) for u in doc["users"]]
    return out


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


# --- femnist ---------------------------------------------------------------------------------


def test_femnist_rows_shapes_and_natural_partition() -> None:
    root = FIXTURES / "femnist"
    ds = load_dataset("femnist", root=str(root))
    train, test = leaf_users(root, "train"), leaf_users(root, "test")
    assert ds.name == "femnist" and ds.num_classes == 62 and ds.input_shape == (784,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (sum(len(d["y"]) for _, d in train), 784)
    assert [len(p) for p in ds.natural_partition] == [len(d["y"]) for _, d in train]
    rows = np.concatenate(ds.natural_partition)
    assert rows.tolist() == list(range(len(ds.y_train)))
    second = ds.natural_partition[1]
    assert ds.y_train[second].tolist() == train[1][1]["y"]
    assert torch.equal(ds.x_train[second[0]], torch.tensor(train[1][1]["x"][0], dtype=torch.float32))
    assert ds.y_test.tolist() == [y for _, d in test for y in d["y"]]
    image = load_dataset("femnist", root=str(root), image=True)
    assert image.x_train.shape == (len(ds.y_train), 1, 28, 28) and image.input_shape == (1, 28, 28)


def test_femnist_max_users_keeps_the_first_users_and_their_test_rows() -> None:
    root = FIXTURES / "femnist"
    ds = load_dataset("femnist", root=str(root), max_users=2)
    train, test = leaf_users(root, "train")[:2], leaf_users(root, "test")
    kept = {u for u, _ in train}
    assert [len(p) for p in ds.natural_partition] == [len(d["y"]) for _, d in train]
    assert ds.y_test.tolist() == [y for u, d in test if u in kept for y in d["y"]]
    with pytest.raises(ValueError, match="max_users must be a positive integer"):
        load_dataset("femnist", root=str(root), max_users=0)


# --- shakespeare -----------------------------------------------------------------------------


def test_shakespeare_maps_characters_with_leafs_alphabet() -> None:
    assert len(SHAKESPEARE_LETTERS) == len(set(SHAKESPEARE_LETTERS)) == 80
    root = FIXTURES / "shakespeare"
    ds = load_dataset("shakespeare", root=str(root))
    train = leaf_users(root, "train")
    assert ds.x_train.dtype == torch.int64 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (80,) and ds.num_classes == 80
    assert ds.x_train.shape == (sum(len(d["y"]) for _, d in train), 80)
    assert [len(p) for p in ds.natural_partition] == [len(d["y"]) for _, d in train]
    decoded = ["".join(SHAKESPEARE_LETTERS[i] for i in row) for row in ds.x_train.tolist()]
    assert decoded == [x for _, d in train for x in d["x"]]
    assert [SHAKESPEARE_LETTERS[i] for i in ds.y_train.tolist()] == [y for _, d in train for y in d["y"]]
    # ALL_LETTERS of LEAF's models/utils/language_utils.py: ids are its positions
    assert SHAKESPEARE_LETTERS.index("\n") == 0 and SHAKESPEARE_LETTERS.index("a") == 53
    assert SHAKESPEARE_LETTERS.index("A") == 25 and SHAKESPEARE_LETTERS.index("}") == 79
    assert len(ds.y_test) == sum(len(d["y"]) for _, d in leaf_users(root, "test"))


# --- malformed LEAF files --------------------------------------------------------------------


def _first_train(root: Path) -> Path:
    return sorted((root / "train").glob("*.json"))[0]


def _set_first_x(value):
    def change(doc):
        doc["user_data"][doc["users"][0]]["x"][0] = value
    return change


def _set_first_y(value):
    def change(doc):
        doc["user_data"][doc["users"][0]]["y"][0] = value
    return change


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("femnist", lambda doc: doc["num_samples"].__setitem__(0, 99), "has 4 x and 4 y but num_samples 99"),
        ("femnist", lambda doc: doc["users"].append("ghost"), "2 users but 1 num_samples|3 users but 2 num_samples"),
        ("femnist", lambda doc: doc.pop("user_data"), "not a LEAF file"),
        ("femnist", _set_first_y(62), "label 62 outside 0..61"),
        ("femnist", _set_first_y(-1), "label -1 outside 0..61"),
        ("femnist", _set_first_y("a"), "y must be integers"),
        ("femnist", _set_first_x([0.5] * 783), "rows have 783 values, not 784|x must be lists of 784"),
        ("shakespeare", _set_first_x("é" * 80), "character 'é' is not in LEAF's Shakespeare alphabet"),
        ("shakespeare", _set_first_x("x" * 79), "x must be strings of 80 characters"),
        ("shakespeare", _set_first_y("ab"), "y must be single characters"),
        ("shakespeare", _set_first_y("~"), "character '~' is not in LEAF's"),
    ],
)
def test_malformed_leaf_files_are_one_line_errors_naming_the_file(
    tmp_path: Path, name: str, change, message: str
) -> None:
    root = copy_fixture(name, tmp_path)
    path = _first_train(root)
    edit_json(path, change)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(name, root=str(root))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_leaf_missing_folders_bad_json_and_duplicate_users(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"femnist: missing directory .*train"):
        load_dataset("femnist", root=str(tmp_path / "nowhere"))
    root = copy_fixture("femnist", tmp_path)
    shutil.rmtree(root / "test")
    with pytest.raises(ValueError, match=r"femnist: missing directory .*test"):
        load_dataset("femnist", root=str(root))
    (root / "test").mkdir()
    with pytest.raises(ValueError, match=r"femnist: no \*.json files in .*test"):
        load_dataset("femnist", root=str(root))
    bad = root / "test" / "broken.json"
    bad.write_text('{"users": [')
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": not valid JSON"):
        load_dataset("femnist", root=str(root))
    twice = root / "train" / "zz_copy.json"
    shutil.copy(_first_train(root), twice)
    with pytest.raises(ValueError, match=re.escape(str(twice)) + ": user 'f0000_14' also appears"):
        load_dataset("femnist", root=str(root))


# --- cifar100 --------------------------------------------------------------------------------


def cifar100_records(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, 3074)


@pytest.mark.parametrize(("label", "byte", "classes"), [("fine", 1, 100), ("coarse", 0, 20)])
def test_cifar100_fine_and_coarse_labels(label: str, byte: int, classes: int) -> None:
    root = FIXTURES / "cifar100"
    ds = load_dataset("cifar100", root=str(root), label=label)
    train = cifar100_records(root / "cifar-100-binary" / "train.bin")
    test = cifar100_records(root / "cifar-100-binary" / "test.bin")
    assert ds.num_classes == classes and ds.input_shape == (3, 32, 32)
    assert ds.x_train.shape == (len(train), 3, 32, 32) and ds.x_test.shape == (len(test), 3, 32, 32)
    assert ds.y_train.tolist() == train[:, byte].tolist() and ds.y_test.tolist() == test[:, byte].tolist()
    assert ds.x_train[1, 2, 31, 31] == np.float32(train[1, 3073] / 255.0)


def test_cifar100_errors_and_download(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label must be 'fine' or 'coarse'"):
        load_dataset("cifar100", root=str(FIXTURES / "cifar100"), label="medium")
    with pytest.raises(ValueError, match="cifar100: missing file .*train.bin"):
        load_dataset("cifar100", root=str(tmp_path))
    root = copy_fixture("cifar100", tmp_path)
    test_bin = root / "cifar-100-binary" / "test.bin"
    test_bin.write_bytes(test_bin.read_bytes()[:-1])
    with pytest.raises(ValueError, match="is not a positive multiple of 3074-byte records"):
        load_dataset("cifar100", root=str(root))
    record = bytearray(3074)
    record[1] = 100
    test_bin.write_bytes(bytes(record))
    with pytest.raises(ValueError, match="label 100 outside 0..99"):
        load_dataset("cifar100", root=str(root))
    archive = tmp_path / "cifar-100-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURES / "cifar100" / "cifar-100-binary", arcname="cifar-100-binary")
        evil = tarfile.TarInfo("../evil.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    fetched = load_dataset("cifar100", root=str(tmp_path / "dl"), download=True, url=archive.as_uri())
    assert fetched.x_train.shape == (4, 3, 32, 32) and not (tmp_path / "evil.txt").exists()


# --- table -----------------------------------------------------------------------------------


@pytest.fixture
def pa():
    return pytest.importorskip("pyarrow")


def rows_table(pa, n: int = 10, offset: int = 0):
    rng = np.random.RandomState(offset)
    return pa.table({
        "pixels": [rng.rand(6).round(3).tolist() for _ in range(n)],
        "a": rng.rand(n), "b": rng.randint(0, 5, n),
        "label": rng.randint(0, 3, n),
        "name": [["cat", "dog", "emu"][i % 3] for i in range(n)],
        "writer": [["w2", "w0", "w1"][i % 3] for i in range(n)],
    })


def save_to_disk_layout(pa, table, folder: Path) -> Path:
    """What datasets' save_to_disk writes: an Arrow IPC stream file and state.json."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4)
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
        "_fingerprint": "0", "_format_type": None, "_split": "train",
    }))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_table_from_parquet_with_a_list_column_and_a_test_file(pa, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    train, test = rows_table(pa, 10), rows_table(pa, 4, offset=1)
    pq.write_table(train, tmp_path / "train.parquet")
    pq.write_table(test, tmp_path / "test.parquet")
    ds = load_dataset("table", path=str(tmp_path / "train.parquet"), features="pixels",
                      label="label", test_path=str(tmp_path / "test.parquet"))
    assert ds.input_shape == (6,) and ds.x_train.dtype == torch.float32
    assert ds.x_train.shape == (10, 6) and ds.x_test.shape == (4, 6)
    assert torch.allclose(ds.x_train[3], torch.tensor(train.column("pixels")[3].as_py()))
    assert ds.y_test.tolist() == test.column("label").to_pylist()
    assert ds.num_classes == max(train.column("label").to_pylist() + test.column("label").to_pylist()) + 1
    assert ds.natural_partition is None


def test_table_numeric_columns_string_labels_and_partition_by(pa, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    t = rows_table(pa, 12)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(t.slice(0, 7), folder / "part-0.parquet")
    pq.write_table(t.slice(7), folder / "part-1.parquet")
    ds = load_dataset("table", path=str(folder), features=["a", "b"], label="name",
                      test_fraction=0.25, partition_by="writer", seed=3)
    assert ds.input_shape == (2,) and ds.num_classes == 3
    assert len(ds.y_train) == 9 and len(ds.y_test) == 3
    order = np.random.RandomState(3).permutation(12)
    names = np.array(t.column("name").to_pylist())
    assert ds.y_train.tolist() == [["cat", "dog", "emu"].index(v) for v in names[order[:9]]]
    assert torch.allclose(ds.x_train[:, 0], torch.tensor(t.column("a").to_numpy()[order[:9]], dtype=torch.float32))
    writers = np.array(t.column("writer").to_pylist())[order[:9]]
    assert len(ds.natural_partition) == 3                      # w0, w1, w2 in sorted order
    for value, rows in zip(["w0", "w1", "w2"], ds.natural_partition, strict=True):
        assert rows.tolist() == np.flatnonzero(writers == value).tolist()


def test_table_reads_a_save_to_disk_folder_without_the_datasets_package(pa, tmp_path: Path) -> None:
    t = rows_table(pa, 10)
    train = save_to_disk_layout(pa, t, tmp_path / "train")
    test = save_to_disk_layout(pa, rows_table(pa, 5, offset=2), tmp_path / "test")
    ds = load_dataset("table", path=str(train), features="pixels", label="label",
                      test_path=str(test), partition_by="b")
    assert ds.x_train.shape == (10, 6) and ds.x_test.shape == (5, 6)
    assert ds.y_train.tolist() == t.column("label").to_pylist()
    b = np.array(t.column("b").to_pylist())
    assert [len(p) for p in ds.natural_partition] == [int((b == v).sum()) for v in np.unique(b)]
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(ValueError, match="is a DatasetDict; point path at one split's folder"):
        load_dataset("table", path=str(tmp_path), features="pixels", label="label", test_fraction=0.5)


def test_table_nested_lists_become_the_input_shape(pa, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    images = [[[float(i + r + c) for c in range(3)] for r in range(2)] for i in range(4)]
    pq.write_table(pa.table({"img": images, "y": [0, 1, 0, 1]}), tmp_path / "t.parquet")
    ds = load_dataset("table", path=str(tmp_path / "t.parquet"), features="img", label="y",
                      test_fraction=0.25)
    assert ds.input_shape == (2, 3) and ds.x_train.shape == (3, 2, 3)


def test_table_errors_are_one_line(pa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(rows_table(pa, 6), path)
    base = {"path": str(path), "features": "pixels", "label": "label", "test_fraction": 0.5}

    def fails(message: str, **changes) -> None:
        with pytest.raises(ValueError, match=message) as info:
            load_dataset("table", **{**base, **changes})
        assert "\n" not in str(info.value)

    fails("no column 'nope'; columns: pixels, a, b", label="nope")
    fails("give exactly one of test_path and test_fraction", test_path=str(path))
    fails("test_fraction must be in", test_fraction=1.5)
    fails("missing file or folder", path=str(tmp_path / "absent.parquet"))
    fails("column 'name' .* is string; features must be numbers", features=["a", "name"])
    fails("label column 'a' is double", label="a")
    fails("num_classes must be an integer >= ", num_classes=1)
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"x": [[1.0, 2.0], [3.0]], "y": [0, 1]}), ragged)
    fails("holds lists of different lengths", path=str(ragged), features="x", label="y")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    fails(re.escape(str(corrupt)) + ": not a readable parquet file", path=str(corrupt))
    (tmp_path / "empty").mkdir()
    fails("holds no \\*.parquet files", path=str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    fails("needs pyarrow: pip install pyarrow")


# --- end to end ------------------------------------------------------------------------------


def femnist_config(num_nodes: int) -> dict:
    return {
        "name": "femnist-natural", "seed": 0,
        "data": {"dataset": "femnist", "params": {"root": str(FIXTURES / "femnist")}},
        "partition": {"name": "natural", "num_nodes": num_nodes},
        "model": {"name": "mlp", "params": {"hidden": [8]}},
        "algorithm": {"name": "fedavg"},
        "local": {"epochs": 1, "batch_size": 4, "lr": 0.1},
        "stop": {"rounds": 2},
        "output": {"progress": False, "checkpoint_every": 1},
    }


def test_femnist_natural_partition_runs_end_to_end(tmp_path: Path) -> None:
    import gossamer

    result = gossamer.run(femnist_config(3), out=tmp_path / "run")
    assert result.summary["rounds"] == 2
    assert list(result.metrics["round"]) == [0, 1, 2]
    with pytest.raises(ConfigError, match="3 users but 5 data-holding nodes; set partition.num_nodes to 3"):
        gossamer.run(femnist_config(5), out=tmp_path / "bad")


def test_shakespeare_token_ids_train_a_character_lstm(tmp_path: Path) -> None:
    import gossamer

    cfg = femnist_config(2)
    cfg["data"] = {"dataset": "shakespeare", "params": {"root": str(FIXTURES / "shakespeare")}}
    cfg["model"] = {"name": "char_lstm", "params": {"hidden": 16, "layers": 1}}
    result = gossamer.run(cfg, out=tmp_path / "run")
    assert result.summary["rounds"] == 2
