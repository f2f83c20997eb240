"""`table`: a classification task from local parquet files or a Hugging Face `save_to_disk` folder.

`path` is a .parquet file, a folder of *.parquet files (read in sorted name order), or a folder
written by `datasets.Dataset.save_to_disk` (Arrow IPC stream files `data-*.arrow` listed in its
`state.json`); the `datasets` package itself is not needed. Reading needs pyarrow, an optional
dependency (`pip install pyarrow`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gossamer.data.datasets import DATASETS, Dataset, from_arrays

if TYPE_CHECKING:
    import pyarrow as pa


@DATASETS.register("table")
def table(
    path: str,
    features: str | list[str],
    label: str,
    test_path: str | None = None,
    test_fraction: float | None = None,
    partition_by: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Rows of a local table: features -> float32 x, `label` -> int64 y.

    features: one column holding a fixed-length list (or nested lists: an image) per row, whose
        shape becomes input_shape; or several numeric columns, input_shape (len(features),).
    label: an integer column (ids 0..num_classes-1) or a string column (its sorted distinct
        values of train and test become ids 0..K-1).
    test_path: a second table for testing; or test_fraction: the last round(f * rows) rows after
        a RandomState(seed) permutation are the test rows.
    partition_by: a column of the training rows whose distinct values, in sorted order, are the
        users of the natural partition (one node per value); use `partition: {name: natural}`.
    num_classes: default max label + 1 (integer labels) or the number of distinct strings.
    """
    pa = _pyarrow()
    columns = [features] if isinstance(features, str) else list(features)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"table: features must be a column name or a list of them, got {features!r}")
    if (test_path is None) == (test_fraction is None):
        raise ValueError("table: give exactly one of test_path and test_fraction")
    wanted = [*columns, label] + ([partition_by] if partition_by else [])
    train = read_table(pa, path, wanted)
    if test_path is not None:
        test = read_table(pa, test_path, [*columns, label])
        train_x, test_x = _features(pa, train, columns, path), _features(pa, test, columns, test_path)
        if train_x.shape[1:] != test_x.shape[1:]:
            raise ValueError(f"table: features of {path} have shape {train_x.shape[1:]} but "
                             f"those of {test_path} {test_x.shape[1:]}")
        ys, num = _labels(pa, [train.column(label), test.column(label)], label, num_classes)
        train_rows = np.arange(train.num_rows)
        parts = (train_x, ys[0]), (test_x, ys[1])
    else:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
                or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"table: test_fraction must be in (0, 1), got {test_fraction!r}")
        x = _features(pa, train, columns, path)
        (y,), num = _labels(pa, [train.column(label)], label, num_classes)
        order = np.random.RandomState(seed).permutation(train.num_rows)
        cut = train.num_rows - int(round(test_fraction * train.num_rows))
        if cut < 1 or cut == train.num_rows:
            raise ValueError(f"table: test_fraction {test_fraction} of {train.num_rows} rows leaves "
                             "an empty train or test split")
        train_rows, test_rows = order[:cut], order[cut:]
        parts = (x[train_rows], y[train_rows]), (x[test_rows], y[test_rows])
    natural = None
    if partition_by is not None:
        natural = _groups(train.column(partition_by).take(pa.array(train_rows)), partition_by, path)
    shape = parts[0][0].shape[1:]
    return from_arrays("table", parts[0], parts[1], num, shape, natural)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(
            "table: reading parquet or Arrow files needs pyarrow: pip install pyarrow"
        ) from None
    return pa


def read_table(pa, path: str, columns: list[str]) -> pa.Table:
    """The `columns` of a parquet file, a folder of *.parquet, or a `save_to_disk` folder."""
    where = Path(path).expanduser()
    if where.is_file():
        files, kind = [where], "parquet"
    elif where.is_dir():
        files, kind = _folder_files(where)
    else:
        raise ValueError(f"table: missing file or folder {where}")
    tables = [_read_file(pa, f, kind) for f in files]
    for f, t in zip(files, tables, strict=True):
        missing = [c for c in dict.fromkeys(columns) if c not in t.column_names]
        if missing:
            raise ValueError(f"table: {f} has no column {missing[0]!r}; columns: "
                             f"{', '.join(t.column_names)}")
    try:
        out = pa.concat_tables([t.select(list(dict.fromkeys(columns))) for t in tables])
    except pa.ArrowInvalid as err:
        raise ValueError(f"table: the files of {where} have different column types "
                         f"({_first_line(err)})") from None
    if out.num_rows == 0:
        raise ValueError(f"table: {where} has no rows")
    return out


def _folder_files(folder: Path) -> tuple[list[Path], str]:
    if (folder / "dataset_dict.json").is_file():
        raise ValueError(f"table: {folder} is a DatasetDict; point path at one split's folder, "
                         f"e.g. path: {folder / 'train'}, test_path: {folder / 'test'}")
    state = folder / "state.json"
    if state.is_file():
        try:
            listed = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
            files = [folder / entry["filename"] for entry in listed]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"table: {state}: not a save_to_disk state.json "
                             "(needs _data_files: [{filename: ...}])") from None
        for f in files:
            if not f.is_file():
                raise ValueError(f"table: {state} lists {f.name}, which is missing")
        if not files:
            raise ValueError(f"table: {state} lists no data files")
        return files, "arrow"
    arrow = sorted(folder.glob("data-*.arrow"))
    if arrow:
        return arrow, "arrow"
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        return parquet, "parquet"
    raise ValueError(f"table: {folder} holds no *.parquet files and no save_to_disk data-*.arrow")


def _read_file(pa, path: Path, kind: str) -> pa.Table:
    try:
        if kind == "parquet":
            return pa.parquet.read_table(path)
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:                 # an Arrow IPC *file* rather than a stream
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"table: {path}: not a readable {kind} file ({_first_line(err)})") from None


def _features(pa, t: pa.Table, columns: list[str], path: str) -> np.ndarray:
    """float32 [rows, *shape] from one list column or several numeric columns."""
    if len(columns) == 1 and _is_list(pa, t.column(columns[0]).type):
        return _list_column(pa, t.column(columns[0]), columns[0], path)
    return np.stack([_numeric(pa, t.column(c).combine_chunks(), c, path) for c in columns], axis=1)


def _is_list(pa, typ) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _list_column(pa, column, name: str, path: str) -> np.ndarray:
    arr, shape = column.combine_chunks(), []
    while _is_list(pa, arr.type):
        if arr.null_count:
            raise ValueError(f"table: column {name!r} of {path} has missing (null) lists")
        lengths = pa.compute.list_value_length(arr).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            raise ValueError(f"table: column {name!r} of {path} holds lists of different lengths "
                             f"({lengths.min()} to {lengths.max()}); features need a fixed length")
        shape.append(int(lengths[0]) if lengths.size else 0)
        arr = arr.flatten()
    values = _numeric(pa, arr, name, path)
    return values.reshape(len(column), *shape)


def _numeric(pa, arr, name: str, path: str) -> np.ndarray:
    typ = arr.type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        raise ValueError(f"table: column {name!r} of {path} is {typ}; features must be numbers "
                         "or fixed-length lists of numbers")
    if arr.null_count:
        raise ValueError(f"table: column {name!r} of {path} has missing (null) values")
    values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"table: column {name!r} of {path} holds NaN or infinite values")
    return values


def _labels(pa, columns: list, name: str, num_classes: int | None) -> tuple[list[np.ndarray], int]:
    """int64 ids of each label column and the number of classes."""
    arrays = [c.combine_chunks() for c in columns]
    if any(a.null_count for a in arrays):
        raise ValueError(f"table: label column {name!r} has missing (null) values")
    typ = arrays[0].type
    if pa.types.is_dictionary(typ):
        arrays = [a.cast(typ.value_type) for a in arrays]
        typ = typ.value_type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        values = [np.asarray(a.to_pylist(), dtype=object) for a in arrays]
        names = sorted(set().union(*(set(v) for v in values)))
        ids = {v: i for i, v in enumerate(names)}
        ys = [np.fromiter((ids[v] for v in vals), np.int64, len(vals)) for vals in values]
        found = len(names)
    elif pa.types.is_integer(typ):
        ys = [a.to_numpy(zero_copy_only=False).astype(np.int64) for a in arrays]
        if any((y < 0).any() for y in ys):
            raise ValueError(f"table: label column {name!r} holds negative labels")
        found = max(int(y.max()) for y in ys if y.size) + 1
    else:
        raise ValueError(f"table: label column {name!r} is {typ}; labels must be integers or strings")
    if num_classes is None:
        return ys, found
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < found:
        raise ValueError(f"table: num_classes must be an integer >= {found} (the labels found), "
                         f"got {num_classes!r}")
    return ys, num_classes


def _groups(column, name: str, path: str) -> list[np.ndarray]:
    """Train row indices per distinct value of `column`, values in sorted order."""
    if column.null_count:
        raise ValueError(f"table: partition_by column {name!r} of {path} has missing (null) values")
    values = column.combine_chunks().to_numpy(zero_copy_only=False)
    try:
        _, inverse = np.unique(values, return_inverse=True)
    except TypeError:
        raise ValueError(f"table: partition_by column {name!r} of {path} holds values that "
                         "cannot be sorted") from None
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    cuts = np.flatnonzero(np.diff(inverse[order])) + 1
    return [part.astype(np.int64) for part in np.split(order, cuts)]


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
