"""MNIST, Fashion-MNIST (IDX files), CIFAR-10 and CIFAR-100 (binary versions) from a local folder.

Files are parsed with numpy, never unpickled. `download=True` fetches missing files from `url`.
Fashion-MNIST — Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset
for Benchmarking Machine Learning Algorithms", arXiv preprint 2017. arXiv:1708.07747
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from gossamer.data.datasets import DATASETS, Dataset, from_arrays
from gossamer.data.download import extract_tar, fetch

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR100_FOLDER = "cifar-100-binary"
CIFAR100_RECORD = 2 + 3 * 32 * 32
CIFAR100_LABELS = {"coarse": (0, 20), "fine": (1, 100)}   # label byte, number of classes


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes (LeCun's MNIST format): magic 0,0,dtype,ndim; big-endian dims; data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{source}: bad IDX magic number {data[:4].hex() or '(empty)'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize            # Python ints: no overflow
    if len(data) - header != expected:
        raise ValueError(
            f"{source}: IDX dims {dims} need {expected} data bytes, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gunzipping it when its name ends in .gz.

    A gzip file is decompressed as a stream and never past what its IDX header declares
    (plus one byte, to notice trailing data), so a corrupt or hostile file is a one-line
    ValueError naming it rather than a zlib traceback or a decompression bomb.
    """
    if path.suffix != ".gz":
        try:
            return parse_idx(path.read_bytes(), str(path))
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            if len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_DTYPES:
                head += f.read(4 * head[3])
            need = _idx_size(head)
            data = head + (_read_at_most(f, need - len(head) + 1) if need is not None else b"")
            if need is not None and len(data) == need:
                f.read(1)                           # the end of the stream: checks the CRC
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip file ({err})") from None
    return parse_idx(data, str(path))


def _idx_size(head: bytes) -> int | None:
    """Total bytes (header and data) of the IDX file whose header is ``head``; None when the
    header is incomplete or invalid (:func:`parse_idx` then says what is wrong)."""
    if len(head) < 4 or head[2] not in IDX_DTYPES or len(head) < 4 + 4 * head[3]:
        return None
    dims = np.frombuffer(head, dtype=">u4", count=head[3], offset=4)
    return 4 + 4 * head[3] + math.prod(int(d) for d in dims) * np.dtype(IDX_DTYPES[head[2]]).itemsize


def _read_at_most(f, size: int, chunk: int = 1 << 24) -> bytes:
    out = bytearray()
    while len(out) < size:
        part = f.read(min(chunk, size - len(out)))
        if not part:
            break
        out += part
    return bytes(out)


def _find_idx(name: str, root: Path, stem: str, download: bool, url: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    if not download:
        raise ValueError(
            f"{name}: missing file {root / stem}[.gz] (pass download=True to fetch it)"
        )
    return fetch(url.rstrip("/") + f"/{stem}.gz", root / f"{stem}.gz")


def _idx_dataset(name: str, root: str, download: bool, url: str, image: bool) -> Dataset:
    folder = Path(root).expanduser()
    arrays = {
        key: read_idx(_find_idx(name, folder, stem, download, url))
        for key, stem in IDX_FILES.items()
    }
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{name}: {split} images {x.shape} and labels {y.shape} do not match [N, 28, 28] / [N]"
            )
        if y.dtype.kind not in "iu":
            raise ValueError(f"{name}: {split} labels are {y.dtype}, not integers, in {folder}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(f"{name}: {split} images hold NaN or infinite pixels in {folder}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{name}: {split} labels outside 0..9 in {folder}")
    shape = (1, 28, 28) if image else (784,)
    train = (_scaled(arrays["train_x"]), arrays["train_y"])
    test = (_scaled(arrays["test_x"]), arrays["test_y"])
    return from_arrays(name, train, test, 10, shape)


def _scaled(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32)
    x /= 255.0
    return x


@DATASETS.register("mnist")
def mnist(root: str, download: bool = False, url: str = MNIST_URL, image: bool = False) -> Dataset:
    """MNIST (LeCun et al. 1998) from the four IDX files in `root`; shape (784,) or (1, 28, 28)."""
    return _idx_dataset("mnist", root, download, url, image)


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    root: str, download: bool = False, url: str = FASHION_MNIST_URL, image: bool = False
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) from IDX files in `root`."""
    return _idx_dataset("fashion_mnist", root, download, url, image)


@DATASETS.register("cifar10")
def cifar10(root: str, download: bool = False, url: str = CIFAR10_URL) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) binary version from `root`/cifar-10-batches-bin; shape (3, 32, 32)."""
    folder = Path(root).expanduser() / CIFAR10_FOLDER
    train_files = [f"data_batch_{i}.bin" for i in range(1, 6)]
    names = [*train_files, "test_batch.bin"]
    if download and not all((folder / n).is_file() for n in names):
        archive = fetch(url, Path(root).expanduser() / "cifar-10-binary.tar.gz")
        extract_tar(archive, folder.parent, CIFAR10_FOLDER)
    train = [read_cifar_batch(_require("cifar10", folder / n)) for n in train_files]
    test = read_cifar_batch(_require("cifar10", folder / "test_batch.bin"))
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return from_arrays("cifar10", (train_x, train_y), test, 10, (3, 32, 32))


@DATASETS.register("cifar100")
def cifar100(
    root: str, label: str = "fine", download: bool = False, url: str = CIFAR100_URL
) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009) binary version from `root`/cifar-100-binary/{train,test}.bin.

    `label`: "fine" (100 classes) or "coarse" (the 20 superclasses); shape (3, 32, 32).
    """
    if label not in CIFAR100_LABELS:
        raise ValueError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    folder = Path(root).expanduser() / CIFAR100_FOLDER
    names = ["train.bin", "test.bin"]
    if download and not all((folder / n).is_file() for n in names):
        archive = fetch(url, Path(root).expanduser() / "cifar-100-binary.tar.gz")
        extract_tar(archive, folder.parent, CIFAR100_FOLDER)
    column, classes = CIFAR100_LABELS[label]
    train, test = (
        read_cifar_records(_require("cifar100", folder / n), 2, column, classes) for n in names
    )
    return from_arrays("cifar100", train, test, classes, (3, 32, 32))


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    return read_cifar_records(path, 1, 0, 10)


def read_cifar_records(
    path: Path, label_bytes: int, column: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR binary records: `label_bytes` label bytes (CIFAR-100: coarse, fine) + 3072
    pixel bytes (R, G, B planes); the label is byte `column`. Returns ([n, 3072] in [0, 1], [n])."""
    record = label_bytes + 3 * 32 * 32
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path}: size {raw.size} is not a positive multiple of {record}-byte records"
        )
    records = raw.reshape(-1, record)
    labels = records[:, column].astype(np.int64)
    if labels.max() >= num_classes:
        raise ValueError(f"{path}: label {labels.max()} outside 0..{num_classes - 1}")
    return _scaled(records[:, label_bytes:]), labels


def _require(name: str, path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{name}: missing file {path} (pass download=True to fetch it)")
    return path
