"""Embedding-table files in the HPS layout: open (memory-mapped), validate, write, convert.

A table is a directory holding raw little-endian binaries:

    key         int64   x N            one key per row
    emb_vector  float32 x N x dim      row i belongs to key i
    meta        8 bytes x N (optional) same size as `key` (HPS validates it and otherwise ignores it)

Example: 1000 keys of dim 16 -> `key` is 8000 B and `emb_vector` 64000 B. There is no header, so `dim` comes from
the configuration (or is inferred from the two file sizes).

Opening never reads the vectors into RAM: `keys`, `vectors` and `meta` are read-only `np.memmap`s and
`TableFiles.iter_chunks` walks them in row blocks. Writing goes to temporary files in the table directory that are
renamed into place only once everything is on disk, so a failed write leaves no half table behind.

Unlike HPS (which only checks sizes) `open_table` also checks `emb_vector` against N x dim and, by default, that
keys are unique (HPS hash maps silently keep the last row of a duplicated key; its static table assumes uniqueness).
Non-finite values are allowed, as in HPS.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

KEY_FILE = "key"
VECTOR_FILE = "emb_vector"
META_FILE = "meta"

KEY_BYTES = 8  # int64 keys, always (also in int32 key mode: HPS narrows them at load)
VALUE_BYTES = 4  # float32 vector elements
META_BYTES = 8

_KEY_DTYPE = np.dtype("<i8")
_VALUE_DTYPE = np.dtype("<f4")
_META_DTYPE = np.dtype("<i8")

_KEY_DTYPES = ("int32", "int64")
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
_INT64_MAX = int(np.iinfo(np.int64).max)

# write_table(progress=None) shows a bar from this many bytes on (about a second of disk writes).
_AUTO_PROGRESS_BYTES = 64 << 20
# Row block for scans over the keys (int32 range check): bounded temporaries on huge tables.
_SCAN_ROWS = 1 << 22
_DUPLICATES_SHOWN = 5

__all__ = [
    "TableFileError",
    "TableFiles",
    "open_table",
    "validate_table",
    "write_table",
    "from_numpy",
    "from_torch_embedding",
    "from_keras_embedding",
    "KEY_FILE",
    "VECTOR_FILE",
    "META_FILE",
]


class TableFileError(ValueError):
    """A table directory or its files do not form a valid HPS table (the message names the file and the numbers)."""


@dataclasses.dataclass(frozen=True, eq=False)
class TableFiles:
    """One opened (validated) table directory. Build it with `open_table` or `write_table`.

    Attributes:
        path: the table directory.
        dim: embedding vector size.
        num_keys: N, number of rows.
        keys: read-only `np.memmap`, int64 (N,), CPU.
        vectors: read-only `np.memmap`, float32 (N, dim), CPU; row i belongs to keys[i].
        meta: read-only `np.memmap`, int64 (N,), or None when the table has no `meta` file.

    Example:
        >>> t = open_table("/data/model/table0", dim=16)
        >>> for keys, vectors in t.iter_chunks(1 << 16):   # int64 (m,), float32 (m, 16)
        ...     tier.insert(tag, torch.from_numpy(np.array(keys)), torch.from_numpy(np.array(vectors)))
    """

    path: pathlib.Path
    dim: int
    num_keys: int
    keys: np.ndarray = dataclasses.field(repr=False)
    vectors: np.ndarray = dataclasses.field(repr=False)
    meta: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def identity(self) -> str:
        """What names these files' contents for a persistent tier's load record: the resolved directory, and the size
        and modification time (ns) of `key` and `emb_vector`. New files at the same path have another identity."""
        parts = [str(self.path.resolve()), f"dim={self.dim}", f"rows={self.num_keys}"]
        for name in (KEY_FILE, VECTOR_FILE):
            st = (self.path / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)

    @property
    def nbytes(self) -> int:
        """Bytes of `key` + `emb_vector` (+ `meta`) on disk."""
        meta = 0 if self.meta is None else self.num_keys * META_BYTES
        return self.num_keys * (KEY_BYTES + self.dim * VALUE_BYTES) + meta

    def iter_chunks(
        self, chunk_rows: int = 1 << 20, progress: bool = False, desc: str | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(keys int64 (m,), vectors float32 (m, dim))` blocks of at most `chunk_rows` rows, in file order.

        Every row is yielded exactly once; the last block may be shorter. Blocks are read-only views of the
        memory map (no copy, pages are read on access): copy them (`np.array(...)`, `torch.tensor(...)`) to keep
        or modify them. `progress=True` shows a tqdm bar counting rows (`desc` labels it).

        Example:
            >>> sum(len(k) for k, _ in table.iter_chunks(1000)) == table.num_keys
            True
        """
        chunk_rows = _positive_int(chunk_rows, "chunk_rows")
        keys, vectors = np.asarray(self.keys), np.asarray(self.vectors)
        with tqdm(
            total=self.num_keys,
            unit="rows",
            unit_scale=True,
            desc=desc if desc is not None else f"reading {self.path}",
            disable=not progress,
        ) as bar:
            for start in range(0, self.num_keys, chunk_rows):
                stop = min(start + chunk_rows, self.num_keys)
                yield keys[start:stop], vectors[start:stop]
                bar.update(stop - start)

    def to_torch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole table as CPU tensors (copies): keys int64 (N,), vectors float32 (N, dim).

        Reads everything into RAM: meant for small tables and tests; use `iter_chunks` for big ones.
        """
        keys = torch.from_numpy(np.array(self.keys, dtype=np.int64))
        vectors = torch.from_numpy(np.array(self.vectors, dtype=np.float32))
        return keys, vectors

    def __len__(self) -> int:
        return self.num_keys


# --------------------------------------------------------------------------------------------- argument checks


def _positive_int(value: Any, name: str) -> int:
    """`value` as an int > 0, else TypeError/ValueError naming `name` and the value."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive int, got bool {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}") from None
    if as_int <= 0:
        raise ValueError(f"{name} must be a positive int, got {as_int}")
    return as_int


def _key_dtype_name(key_dtype: Any) -> str:
    """Normalise 'int32'/'int64' (also np.int32, np.dtype('int64'), torch.int32...) to the string name."""
    name = str(key_dtype)
    if not isinstance(key_dtype, str):
        try:
            name = np.dtype(key_dtype).name
        except TypeError:
            name = name.removeprefix("torch.")
    if name not in _KEY_DTYPES:
        raise ValueError(f"key_dtype must be one of {list(_KEY_DTYPES)}, got {key_dtype!r}")
    return name


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


# ------------------------------------------------------------------------------------------------------ reading


def _file_size(path: pathlib.Path, what: str) -> int:
    """Size of a required regular file, or TableFileError."""
    if not path.exists():
        raise TableFileError(f"{what} file {path} is missing")
    if not path.is_file():
        raise TableFileError(f"{what} file {path} is not a regular file")
    return path.stat().st_size


def _check_int32_range(keys: np.ndarray, key_path: pathlib.Path) -> None:
    """Every key must fit int32; else name the first offending key and its row."""
    for start in range(0, len(keys), _SCAN_ROWS):
        block = np.asarray(keys[start : start + _SCAN_ROWS])
        if block.min() < _INT32_MIN or block.max() > _INT32_MAX:
            bad = np.flatnonzero((block < _INT32_MIN) | (block > _INT32_MAX))
            row = start + int(bad[0])
            raise TableFileError(
                f"key file {key_path}: key {int(keys[row])} at row {row} does not fit key_dtype int32 "
                f"[{_INT32_MIN}, {_INT32_MAX}] ({len(bad)} such keys in rows {start}..{start + len(block) - 1})"
            )


def _duplicate_report(keys: np.ndarray) -> str | None:
    """None when all keys are distinct, else a description with counts and the first few duplicated keys.

    Works on the keys only (one sorted copy: 8 bytes per key), never on the vectors.
    """
    ordered = np.sort(keys, kind="stable")
    repeated = ordered[1:] == ordered[:-1]  # True at each row that repeats its predecessor
    extra_rows = int(np.count_nonzero(repeated))
    if extra_rows == 0:
        return None
    values = np.unique(ordered[1:][repeated])
    shown = values[:_DUPLICATES_SHOWN]
    # Row positions only for the few keys shown: one pass over the keys, on the error path.
    rows = np.flatnonzero(np.isin(keys, shown))
    parts = []
    for v in shown:
        where = rows[np.asarray(keys[rows]) == v][:4]
        parts.append(f"{int(v)} (rows {', '.join(map(str, where.tolist()))}{', ...' if len(where) == 4 else ''})")
    more = f" and {len(values) - len(shown)} more" if len(values) > len(shown) else ""
    return (
        f"{extra_rows} duplicate rows: {len(values)} distinct keys appear more than once, "
        f"e.g. {'; '.join(parts)}{more}"
    )


def open_table(
    path: str | os.PathLike,
    dim: int | None = None,
    *,
    check_duplicates: bool = True,
    key_dtype: str = "int64",
) -> TableFiles:
    """Open and validate an HPS table directory, memory-mapped (nothing but the keys is read).

    Args:
        path: directory holding `key` (int64 x N), `emb_vector` (float32 x N x dim), optional `meta` (8 B x N).
        dim: the configured vector size; `emb_vector` must hold exactly N x dim floats. None infers it from the
            file sizes (error when they do not divide).
        check_duplicates: reject tables whose keys repeat (reads and sorts the keys: 8 bytes per key of RAM).
        key_dtype: "int64", or "int32" to require every key to fit int32 (the file is int64 either way).

    Returns:
        TableFiles with read-only memmaps: keys int64 (N,), vectors float32 (N, dim), meta int64 (N,) or None.

    Raises:
        TableFileError: missing directory/files, empty files, sizes not multiples of 8/4, vector count != N x dim,
            bad meta size, duplicate keys, keys outside int32 in int32 mode; the message names the file and sizes.
        ValueError / TypeError: bad arguments (dim <= 0, unknown key_dtype).

    Example:
        >>> t = open_table("/data/model/table0", dim=16)
        >>> t.num_keys, t.vectors.shape, t.vectors.dtype
        (1000, (1000, 16), dtype('float32'))
    """
    if dim is not None:
        dim = _positive_int(dim, "dim")
    check_duplicates = _check_bool(check_duplicates, "check_duplicates")
    key_dtype = _key_dtype_name(key_dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = pathlib.Path(path)

    if not path.exists():
        raise TableFileError(f"table directory {path} does not exist")
    if not path.is_dir():
        raise TableFileError(f"table path {path} is not a directory (expected a directory with key and emb_vector)")

    key_path, vec_path, meta_path = path / KEY_FILE, path / VECTOR_FILE, path / META_FILE
    key_size = _file_size(key_path, "key")
    vec_size = _file_size(vec_path, "emb_vector")
    if key_size == 0:
        raise TableFileError(f"key file {key_path} is empty (0 bytes)")
    if key_size % KEY_BYTES:
        raise TableFileError(
            f"key file {key_path} has {key_size} bytes, not a multiple of {KEY_BYTES} (int64 keys): "
            f"{key_size // KEY_BYTES} keys + {key_size % KEY_BYTES} stray bytes"
        )
    if vec_size == 0:
        raise TableFileError(f"emb_vector file {vec_path} is empty (0 bytes)")
    if vec_size % VALUE_BYTES:
        raise TableFileError(
            f"emb_vector file {vec_path} has {vec_size} bytes, not a multiple of {VALUE_BYTES} (float32 values): "
            f"{vec_size // VALUE_BYTES} floats + {vec_size % VALUE_BYTES} stray bytes"
        )
    num_keys = key_size // KEY_BYTES
    num_floats = vec_size // VALUE_BYTES
    if dim is None:
        if num_floats % num_keys:
            raise TableFileError(
                f"cannot infer dim: emb_vector file {vec_path} holds {num_floats} floats ({vec_size} bytes), "
                f"not a multiple of the N={num_keys} keys in {key_path}"
            )
        dim = num_floats // num_keys
    elif vec_size != num_keys * dim * VALUE_BYTES:
        found_dim = f"{num_floats / num_keys:g}"
        raise TableFileError(
            f"emb_vector file {vec_path} has {vec_size} bytes, expected N x dim x 4 = {num_keys} x {dim} x 4 = "
            f"{num_keys * dim * VALUE_BYTES} bytes (N={num_keys} keys in {key_path}; the file holds {num_floats} "
            f"floats = {found_dim} per key)"
        )

    meta = None
    if meta_path.exists():
        meta_size = _file_size(meta_path, "meta")
        if meta_size == 0:
            raise TableFileError(f"meta file {meta_path} is empty (0 bytes); remove it or write {key_size} bytes")
        if meta_size != key_size:
            raise TableFileError(
                f"meta file {meta_path} has {meta_size} bytes, expected the key file's size {key_size} bytes "
                f"({META_BYTES} bytes per key, N={num_keys})"
            )
        meta = np.memmap(meta_path, dtype=_META_DTYPE, mode="r", shape=(num_keys,))

    keys = np.memmap(key_path, dtype=_KEY_DTYPE, mode="r", shape=(num_keys,))
    vectors = np.memmap(vec_path, dtype=_VALUE_DTYPE, mode="r", shape=(num_keys, dim))

    if key_dtype == "int32":
        _check_int32_range(keys, key_path)
    if check_duplicates:
        logger.debug("checking %d keys of %s for duplicates", num_keys, key_path)
        report = _duplicate_report(keys)
        if report is not None:
            raise TableFileError(
                f"key file {key_path} (N={num_keys}) has {report}; deduplicate the table or pass "
                f"check_duplicates=False (lookups then see the last row of each duplicated key)"
            )
    logger.debug("opened table %s: N=%d dim=%d meta=%s", path, num_keys, dim, meta is not None)
    return TableFiles(path=path, dim=dim, num_keys=num_keys, keys=keys, vectors=vectors, meta=meta)


def validate_table(
    path: str | os.PathLike,
    dim: int | None = None,
    *,
    check_duplicates: bool = True,
    key_dtype: str = "int64",
) -> TableFiles:
    """Run every check of `open_table` on `path` and return the opened table (same arguments, same errors).

    Example:
        >>> validate_table("/data/model/table0", dim=16, key_dtype="int32").num_keys
        1000
    """
    return open_table(path, dim, check_duplicates=check_duplicates, key_dtype=key_dtype)


# ------------------------------------------------------------------------------------------------------ writing


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _int_array(values: Any, name: str) -> np.ndarray:
    """An integer array-like/tensor of shape (n,) as a contiguous little-endian int64 numpy array."""
    if _is_tensor(values):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}); HPS rejects empty table files")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > _INT64_MAX:
        row = int(np.argmax(arr > _INT64_MAX))
        raise ValueError(f"{name}[{row}] = {int(arr[row])} does not fit int64 (max {_INT64_MAX})")
    return np.ascontiguousarray(arr, dtype=_KEY_DTYPE)


class _VectorSource:
    """(N, dim) floating vectors from numpy/array-like/torch, converted to float32 one row block at a time,
    so writing a float64 or on-GPU table never holds a full float32 copy in RAM."""

    def __init__(self, vectors: Any, name: str = "vectors") -> None:
        if _is_tensor(vectors):
            if not vectors.is_floating_point():
                raise TypeError(f"{name} must hold floats, got a tensor of dtype {vectors.dtype}")
            self._data = vectors.detach()
        else:
            arr = np.asarray(vectors)
            if arr.dtype.kind != "f":
                raise TypeError(f"{name} must hold floats (converted to float32), got dtype {arr.dtype}")
            self._data = arr
        shape = tuple(self._data.shape)
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (N, dim), got shape {shape}")
        if shape[1] == 0:
            raise ValueError(f"{name} must have dim > 0, got shape {shape}")
        if shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {shape}); HPS rejects empty table files")
        self.num_rows, self.dim = int(shape[0]), int(shape[1])

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as contiguous little-endian float32, numpy `astype` rounding."""
        part = self._data[start:stop]
        if _is_tensor(part):
            # float32 on the tensor's side when it is not numpy-representable (bfloat16); otherwise numpy casts.
            part = part.cpu()
            if part.dtype == torch.bfloat16:
                part = part.float()
            part = part.numpy()
        return np.ascontiguousarray(part, dtype=_VALUE_DTYPE)


def _write_temp(directory: pathlib.Path, final_name: str) -> tuple[pathlib.Path, Any]:
    """Create a fresh hidden temp file next to its final name (same filesystem, so rename is atomic).

    Opened with mode 0o666 so the umask applies as it would to a plainly created file.
    """
    for _ in range(100):
        tmp = directory / f".{final_name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return tmp, os.fdopen(fd, "wb")
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # NOTE: some platforms/filesystems cannot open directories; the data files are synced already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_table(
    path: str | os.PathLike,
    keys: Any,
    vectors: Any,
    meta: Any = None,
    *,
    progress: bool | None = None,
    chunk_rows: int = 1 << 20,
    overwrite: bool = False,
    check_duplicates: bool = True,
) -> TableFiles:
    """Write an HPS table directory (`key`, `emb_vector`, optional `meta`) and return it opened.

    Args:
        path: table directory; created (with parents) when missing.
        keys: integers (N,) — numpy, torch (any device) or a list; stored as int64.
        vectors: floats (N, dim) — numpy or torch (any device, any float dtype); stored as float32, cast like
            numpy `astype(float32)`, block by block (no full float32 copy in RAM).
        meta: optional integers (N,), stored as int64 (8 bytes per key).
        progress: tqdm bar over rows; None = on when the table is larger than 64 MB.
        chunk_rows: rows converted and written per block.
        overwrite: replace the table files already at `path`; otherwise an existing table is an error.
        check_duplicates: reject repeated keys before writing anything.

    Every argument is checked before anything is written. Files are written to hidden temporary files in `path`,
    synced, then renamed over the final names (`emb_vector`, `meta`, `key` last); a failure removes the temporary
    files (and the directories this call created), leaving any previous table as it was. Readers that have the old
    table memory-mapped keep seeing the old files.

    Raises:
        TypeError / ValueError: bad arguments (non-integer keys, non-float or non-2-D vectors, row count mismatch,
            empty input, chunk_rows <= 0), naming the argument and what was found.
        TableFileError: `path` is a file, or already holds a table and overwrite=False; duplicate keys.
        OSError: the write itself failed (disk full...); nothing is left behind.

    Example:
        >>> t = write_table("tables/t0", np.array([3, 7]), np.ones((2, 4), np.float32))
        >>> t.num_keys, t.dim
        (2, 4)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = pathlib.Path(path)
    chunk_rows = _positive_int(chunk_rows, "chunk_rows")
    overwrite = _check_bool(overwrite, "overwrite")
    check_duplicates = _check_bool(check_duplicates, "check_duplicates")
    if progress is not None:
        progress = _check_bool(progress, "progress")

    key_arr = _int_array(keys, "keys")
    source = _VectorSource(vectors, "vectors")
    num_keys, dim = len(key_arr), source.dim
    if source.num_rows != num_keys:
        raise ValueError(f"keys has {num_keys} rows but vectors has {source.num_rows} (shape ({source.num_rows}, {dim}))")
    meta_arr = None
    if meta is not None:
        meta_arr = _int_array(meta, "meta")
        if len(meta_arr) != num_keys:
            raise ValueError(f"meta has {len(meta_arr)} rows but keys has {num_keys}")
    if check_duplicates:
        report = _duplicate_report(key_arr)
        if report is not None:
            raise TableFileError(f"keys for {path / KEY_FILE} have {report}; nothing was written")

    if path.exists() and not path.is_dir():
        raise TableFileError(f"table path {path} exists and is not a directory")
    existing = [n for n in (KEY_FILE, VECTOR_FILE, META_FILE) if (path / n).exists()]
    if existing and not overwrite:
        raise TableFileError(
            f"table directory {path} already holds {', '.join(existing)}; pass overwrite=True to replace them"
        )

    total_bytes = num_keys * (KEY_BYTES + dim * VALUE_BYTES) + (0 if meta_arr is None else num_keys * META_BYTES)
    show = progress if progress is not None else total_bytes > _AUTO_PROGRESS_BYTES

    # Directories this call creates, outermost first, so a failure can remove exactly those (when empty).
    created: list[pathlib.Path] = []
    probe = path
    while not probe.exists():
        created.insert(0, probe)
        probe = probe.parent
    temps: dict[str, pathlib.Path] = {}
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tqdm(total=num_keys, unit="rows", unit_scale=True, desc=f"writing {path}", disable=not show) as bar:
            tmp, f = _write_temp(path, VECTOR_FILE)
            temps[VECTOR_FILE] = tmp
            with f:
                for start in range(0, num_keys, chunk_rows):
                    stop = min(start + chunk_rows, num_keys)
                    f.write(source.block(start, stop).data)
                    bar.update(stop - start)
                f.flush()
                os.fsync(f.fileno())
            for name, arr in ((KEY_FILE, key_arr), (META_FILE, meta_arr)):
                if arr is None:
                    continue
                tmp, f = _write_temp(path, name)
                temps[name] = tmp
                with f:
                    f.write(arr.data)
                    f.flush()
                    os.fsync(f.fileno())
        # Commit: the key file last, so a directory with a new `key` has its new vectors.
        os.replace(temps.pop(VECTOR_FILE), path / VECTOR_FILE)
        if meta_arr is not None:
            os.replace(temps.pop(META_FILE), path / META_FILE)
        else:
            (path / META_FILE).unlink(missing_ok=True)  # a stale meta of the old table would mismatch
        os.replace(temps.pop(KEY_FILE), path / KEY_FILE)
        _fsync_dir(path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # not empty (someone else wrote there) or already gone: leave it
                break
        raise
    logger.info("wrote table %s: N=%d dim=%d (%.1f MB)", path, num_keys, dim, total_bytes / 1e6)
    return open_table(path, dim, check_duplicates=False)


# --------------------------------------------------------------------------------------------------- converters


def _default_keys(num_rows: int) -> np.ndarray:
    return np.arange(num_rows, dtype=np.int64)


def from_numpy(path: str | os.PathLike, weights: np.ndarray, keys: Any = None, **kw: Any) -> TableFiles:
    """Write a dense (N, dim) float matrix as a table; row i gets key `keys[i]` (default: i).

    `kw` goes to `write_table` (meta, progress, chunk_rows, overwrite, check_duplicates).

    Example:
        >>> from_numpy("tables/t0", np.random.rand(100, 8)).keys[:3]
        memmap([0, 1, 2])
    """
    source = _VectorSource(weights, "weights")  # check shape/dtype first, to name `weights` in the error
    if keys is None:
        keys = _default_keys(source.num_rows)
    return write_table(path, keys, weights, **kw)


def from_torch_embedding(path: str | os.PathLike, module: Any, keys: Any = None, **kw: Any) -> TableFiles:
    """Write the weight (num_embeddings, dim) of a `torch.nn.Embedding` / `torch.nn.EmbeddingBag` as a table.

    The weight is detached and read from its device block by block; row i gets key `keys[i]` (default: i).
    `kw` goes to `write_table`.

    Example:
        >>> from_torch_embedding("tables/t1", torch.nn.Embedding(1000, 16)).dim
        16
    """
    if not isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        raise TypeError(f"module must be a torch.nn.Embedding or torch.nn.EmbeddingBag, got {type(module).__name__}")
    weight = module.weight.detach()
    if keys is None:
        keys = _default_keys(weight.shape[0])
    return write_table(path, keys, weight, **kw)


def from_keras_embedding(path: str | os.PathLike, layer: Any, keys: Any = None, **kw: Any) -> TableFiles:
    """Write the matrix (input_dim, output_dim) of a built `keras.layers.Embedding` as a table.

    Duck-typed (this module never imports TensorFlow/Keras): the layer needs `input_dim`, `output_dim` and its
    weights (`get_weights()[0]`, else `embeddings`); it must be built (called once or `build()`).
    Row i gets key `keys[i]` (default: i). `kw` goes to `write_table`.

    Example:
        >>> layer = keras.layers.Embedding(1000, 16); layer(np.array([0]))
        >>> from_keras_embedding("tables/t2", layer).num_keys
        1000
    """
    if not (hasattr(layer, "input_dim") and hasattr(layer, "output_dim")):
        raise TypeError(
            f"layer must be a Keras Embedding layer (with input_dim/output_dim), got {type(layer).__name__}"
        )
    weights = None
    if hasattr(layer, "get_weights"):
        got = layer.get_weights()
        if got:
            weights = got[0]
    if weights is None and getattr(layer, "embeddings", None) is not None:
        emb = layer.embeddings
        weights = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
    if weights is None:
        raise ValueError(
            f"layer {getattr(layer, 'name', type(layer).__name__)!r} has no weights yet: build it "
            f"(call it once or layer.build(...)) before converting"
        )
    weights = np.asarray(weights)
    expected = (int(layer.input_dim), int(layer.output_dim))
    if tuple(weights.shape) != expected:
        raise ValueError(
            f"layer {getattr(layer, 'name', '?')!r}: weights have shape {tuple(weights.shape)}, expected "
            f"(input_dim, output_dim) = {expected}"
        )
    if keys is None:
        keys = _default_keys(weights.shape[0])
    return write_table(path, keys, weights, **kw)
