"""MNIST-style IDX and CIFAR-10 binary loaders on tiny files written here; downloads via file://."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gossamer.data import load_dataset
from gossamer.data.vision import IDX_FILES, parse_idx, read_idx

RNG = np.random.RandomState(0)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_mnist(
    folder: Path, gz: bool = False, train: int = 6, test: int = 4
) -> dict[str, np.ndarray]:
    arrays = {
        "train_x": RNG.randint(0, 256, (train, 28, 28)),
        "train_y": RNG.randint(0, 10, train),
        "test_x": RNG.randint(0, 256, (test, 28, 28)),
        "test_y": RNG.randint(0, 10, test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        path = folder / (stem + ".gz" if gz else stem)
        path.write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader_reads_plain_and_gzipped_files(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_dataset(name, root=str(tmp_path))
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784) and ds.name == name
    expected = torch.tensor(arrays["train_x"].reshape(6, 784) / 255.0, dtype=torch.float32)
    assert torch.equal(ds.x_train, expected)
    assert ds.y_test.tolist() == arrays["test_y"].tolist() and ds.y_train.dtype == torch.int64
    image = load_dataset(name, root=str(tmp_path), image=True)
    assert image.x_test.shape == (4, 1, 28, 28) and image.input_shape == (1, 28, 28)


def test_parse_idx_reads_big_endian_dims_and_other_dtypes() -> None:
    values = (np.arange(6).reshape(2, 3) - 3).astype(">i2")
    data = bytes([0, 0, 0x0B, 2]) + np.array([2, 3], dtype=">u4").tobytes() + values.tobytes()
    assert parse_idx(data).tolist() == values.tolist()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01\x08\x01" + bytes(4), "bad IDX magic number 00010801"),
        (b"\x00\x00\x07\x01" + bytes(4), "bad IDX magic number"),
        (b"", "bad IDX magic number (empty)"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((2, 3)))[:-1], "need 6 data bytes, found 5"),
    ],
)
def test_parse_idx_rejects_corrupt_data(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_idx(data, "f")


def test_corrupted_magic_number_in_a_file_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / IDX_FILES["test_y"]
    path.write_bytes(b"\x00\x00\x99" + path.read_bytes()[3:])
    with pytest.raises(ValueError, match=f"{path}: bad IDX magic number 00009901"):
        load_dataset("mnist", root=str(tmp_path))


def _corrupt_gz(data: bytes, kind: str) -> bytes:
    good = gzip.compress(data)
    if kind == "deflate":           # a bad block type in the deflate stream: a zlib.error
        return good[:10] + bytes([good[10] | 0b110]) + good[11:]
    if kind == "crc":
        return good[:-8] + bytes(4) + good[-4:]
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not_gzip":
        return data
    return good + b"junk"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("deflate", "corrupt gzip file (Error -3 while decompressing data: invalid block type)"),
        ("crc", "corrupt gzip file (CRC check failed"),
        ("truncated", "corrupt gzip file (Compressed file ended before the end-of-stream marker"),
        ("not_gzip", "corrupt gzip file (Not a gzipped file"),
        ("trailing", "corrupt gzip file (Not a gzipped file (b'ju'))"),
    ],
)
def test_corrupt_gzip_idx_file_is_one_line_naming_it(tmp_path: Path, kind: str, message: str) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / (IDX_FILES["train_x"] + ".gz")
    path.write_bytes(_corrupt_gz(gzip.decompress(path.read_bytes()), kind))
    with pytest.raises(ValueError) as err:
        load_dataset("mnist", root=str(tmp_path))
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_gzip_idx_is_not_decompressed_past_its_header(tmp_path: Path) -> None:
    # dims whose product overflows int64 (was "need 0 data bytes"), then a stream of zeros
    header = bytes([0, 0, 0x08, 3]) + np.array([2**31] * 3, dtype=">u4").tobytes()
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header + bytes(1 << 20)))
    with pytest.raises(ValueError, match=r"need 9903520314283042199192993792 data bytes, found 1048576"):
        read_idx(path)
    small = tmp_path / "y.gz"                     # declares 6 bytes, holds a megabyte more
    small.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3))) + bytes(1 << 20)))
    with pytest.raises(ValueError, match="need 6 data bytes, found 7"):
        read_idx(small)


def test_float_idx_images_must_be_finite(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = np.full((6, 28, 28), np.nan, dtype=">f4")
    data = bytes([0, 0, 0x0D, 3]) + np.array(images.shape, dtype=">u4").tobytes() + images.tobytes()
    (tmp_path / IDX_FILES["train_x"]).write_bytes(data)
    with pytest.raises(ValueError, match="mnist: train images hold NaN or infinite pixels"):
        load_dataset("mnist", root=str(tmp_path))


def test_corrupt_idx_file_through_the_cli(tmp_path: Path, capsys) -> None:
    import yaml

    from gossamer.cli import main

    write_mnist(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / (IDX_FILES["test_y"] + ".gz")
    path.write_bytes(_corrupt_gz(gzip.decompress(path.read_bytes()), "crc"))
    cfg = {"data": {"dataset": "mnist", "params": {"root": str(tmp_path / "mnist")}},
           "partition": {"num_nodes": 2}, "model": {"name": "logreg"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gossamer: config error: data.params: {path}: corrupt gzip file (CRC")
    assert len(err.splitlines()) == 1


def test_mismatched_counts_and_missing_files(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / IDX_FILES["train_y"]).write_bytes(idx_bytes(np.zeros(5)))
    with pytest.raises(ValueError, match="train images .* and labels .* do not match"):
        load_dataset("mnist", root=str(tmp_path))
    (tmp_path / IDX_FILES["train_y"]).unlink()
    missing = tmp_path / IDX_FILES["train_y"]
    with pytest.raises(ValueError, match=f"mnist: missing file {missing}\\[.gz\\]"):
        load_dataset("mnist", root=str(tmp_path))


def test_download_fetches_missing_idx_files_from_the_url(tmp_path: Path) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    arrays = write_mnist(mirror, gz=True)
    ds = load_dataset("mnist", root=str(root), download=True, url=mirror.as_uri())
    assert ds.y_train.tolist() == arrays["train_y"].tolist()
    assert sorted(p.name for p in root.iterdir()) == sorted(s + ".gz" for s in IDX_FILES.values())


def test_failed_download_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="could not download file://"):
        load_dataset("mnist", root=str(tmp_path), download=True, url=(tmp_path / "none").as_uri())
    assert list(tmp_path.iterdir()) == []  # no partial file left


def cifar_batch(count: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = RNG.randint(0, 10, count)
    pixels = RNG.randint(0, 256, (count, 3072))
    records = np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8)
    return records.tobytes(), labels, pixels


def write_cifar(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    pixels = []
    for i in range(1, 6):
        data, _, px = cifar_batch(2)
        (folder / f"data_batch_{i}.bin").write_bytes(data)
        pixels.append(px)
    data, labels, _ = cifar_batch(3)
    (folder / "test_batch.bin").write_bytes(data)
    return np.concatenate(pixels), labels


def test_cifar10_binary_loader(tmp_path: Path) -> None:
    train_pixels, test_labels = write_cifar(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.y_test.tolist() == test_labels.tolist()
    # The first 1024 pixel bytes of a record are the red plane, row-major.
    assert ds.x_train[1, 0, 0, 1] == np.float32(train_pixels[1, 1] / 255.0)
    assert ds.x_train[1, 2, 31, 31] == np.float32(train_pixels[1, 3071] / 255.0)


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar10: missing file .*data_batch_1.bin"):
        load_dataset("cifar10", root=str(tmp_path))
    write_cifar(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(bytes(3074))
    with pytest.raises(ValueError, match="size 3074 is not a positive multiple of 3073"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar10_download_extracts_only_the_batches_folder(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_cifar(source / "cifar-10-batches-bin")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        evil = tarfile.TarInfo("../evil.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    root = tmp_path / "root"
    ds = load_dataset("cifar10", root=str(root), download=True, url=archive.as_uri())
    assert ds.x_train.shape == (10, 3, 32, 32)
    assert not (tmp_path / "evil.txt").exists()
