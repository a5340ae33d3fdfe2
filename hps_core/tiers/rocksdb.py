"""RocksDB tier (HPS "persistent_db" of type rocks_db) over rocksdict, in raw mode.

On-disk layout, compatible with HPS's RocksDB backend for float32 tables:

    column family "<tag>"  (tag = "hps_et.<model>.<table>")   one per table
        key   = the int64 key as 8 little-endian bytes (HPS: the raw native bytes of the key)
        value = the stored row's raw bytes (hps_core.storage), bytes_per_row(storage, dim) of them:
                    float32              dim float32, little-endian (4 * dim bytes): HPS's own layout
                    float16 / bfloat16   dim x 2 bytes
                    int8                 dim int8 codes, then the row's float32 scale and bias (dim + 8 bytes)
                    fp8_e4m3             dim float8_e4m3fn codes, then the row's float32 scale (dim + 4 bytes)
    column family "default"                                     our metadata (HPS leaves it empty)
        b"hps/dim/<tag>"     -> dim as ASCII decimal
        b"hps/storage/<tag>" -> the storage's canonical name as ASCII (absent = float32)
        b"hps/count/<tag>"   -> exact number of keys as ASCII decimal (absent = unknown: recounted on demand)
        b"hps/loaded/<tag>"  -> identity of the table files it holds completely (loaded_from / mark_loaded)

Rows are stored once encoded (by `load` from float32 table files, or as the stored rows `insert` is given) and move
as bytes from then on: `fetch` and `iter_chunks` return exactly the bytes written, as tensors of the storage's dtype
(numpy has no bfloat16 / fp8, so the bytes travel as uint8 and the torch tensor is viewed as that dtype at the end).
The storage is recorded with the table by `create_table`; a family without a storage entry (written by HPS, or by
versions of this project before storages existed) is float32, and asking for an existing table with another storage
raises ValueError with nothing changed (its bytes could not be read as another storage's rows).

Counting: RocksDB has no exact key count (its "estimate-num-keys" property is an estimate), so `insert` and
`erase` look the keys up before writing (they must report how many keys were new / present anyway) and write the new
count in the same WriteBatch as the rows, atomically. `load` removes the count before it starts and writes it back
when done; a directory whose count is missing (a crash mid-load, a DB written by HPS) is counted once by iteration
on the first `size()` and the count is stored again. HPS's size() check was inverted; this one is exact.

Column families that exist when the tier opens are opened with it (an engine restarted over the directory sees its
tables and their storages, read-only opens too); a family without a dim entry (written by HPS) takes its dim from
the length of its first value (float32 rows, unless a storage entry says otherwise).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import operator
import os
import pathlib
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import rocksdict
import torch

from hps_core.storage import bytes_per_row, check_encodable, row_dtype, storage_name, stored_width, to_stored
from hps_core.tables import _check_bool
from hps_core.tiers.base import (Tier, TierStats, check_int, check_keys, check_storage, check_storage_match,
                                 check_table_files, check_values)

if TYPE_CHECKING:  # pragma: no cover
    from hps_core.tables import TableFiles

logger = logging.getLogger(__name__)

__all__ = ["RocksDBTier"]

_KEY_DTYPE = np.dtype("<i8")
# The rows of table files (float32, little-endian). Stored rows are moved as the tensor's own bytes, which are
# little-endian on the hosts torch runs on here (x86-64, aarch64): a float32 table's values are HPS's bytes.
_VALUE_DTYPE = np.dtype("<f4")
# Bytewise order of little-endian int64 key bytes (RocksDB's default comparator) = integer order of the same
# 8 bytes read as a big-endian uint64. SST files must be written in that order.
_KEY_ORDER_DTYPE = np.dtype(">u8")

_DIM_PREFIX = b"hps/dim/"
# The table's storage name (hps_core.storage); absent = float32 (HPS, or a table written before storages existed).
_STORAGE_PREFIX = b"hps/storage/"
_COUNT_PREFIX = b"hps/count/"
# The identity of the table files a table was completely loaded from (TableFiles.identity()); deleted while a load
# runs, so a start after a crashed load reloads.
_LOADED_PREFIX = b"hps/loaded/"
# Staging directories of SST loads (removed by the load; one left behind was a crashed load's, removed on open).
_STAGING_PREFIX = ".hps_ingest_"
_DEFAULT_CF = "default"

# Table-file bytes (keys + float32 rows) per SST block when loading (1 GiB: 2 M rows of dim 128; the SST file holds
# the same rows as stored, fewer bytes for a compact storage). A block costs 16 bytes per row of RAM (its sort order
# and sorted keys); its rows are gathered (and encoded) slab by slab. Larger tables give several files whose key
# ranges overlap; RocksDB ingests them in order (later rows win) into level 0 and compacts them in the background.
_LOAD_BLOCK_BYTES = 1 << 30
# Rows gathered, encoded and turned into Python bytes objects at a time while writing an SST file (bounds the
# Python-object and encoding memory).
_SST_PUT_ROWS = 1 << 16

_LOAD_METHODS = ("sst", "write_batch")


@dataclasses.dataclass
class _Table:
    """One column family: its rocksdict handle(s), dim, storage and the exact key count (None = unknown, recount)."""

    dim: int | None
    storage: str  # hps_core.storage name: every value is one row stored this way (bytes_per_row bytes)
    cf: Any  # rocksdict.Rdict bound to the column family; None for a tag declared on a read-only DB lacking it
    handle: Any  # rocksdict.ColumnFamily for WriteBatch; None when read-only
    count: int | None
    stats: TierStats = dataclasses.field(default_factory=TierStats)


def _keys_numpy(keys: Any, name: str = "keys") -> np.ndarray:
    """A CPU int64 (n,) torch tensor -> contiguous little-endian int64 numpy array (no copy when possible)."""
    return np.ascontiguousarray(check_keys(keys, name).detach().numpy(), dtype=_KEY_DTYPE)


def _values_bytes(values: Any, n: int, dim: int, tag: str, storage: str) -> np.ndarray:
    """Stored rows of `storage` (check_values: a CPU tensor of row_dtype(storage), (n, stored_width)) -> their bytes,
    uint8 (n, bytes_per_row) C-contiguous (a view: numpy has no bfloat16 / fp8 dtype, bytes it can hold)."""
    values = check_values(values, n, dim, tag, storage).detach()
    if not n:  # an empty tensor can have a 0 stride (from numpy), which torch will not view as another dtype
        return np.empty((0, bytes_per_row(storage, dim)), dtype=np.uint8)
    return values.view(torch.uint8).numpy()


def _bytes_tensor(rows: torch.Tensor, storage: str) -> torch.Tensor:
    """uint8 (n, bytes_per_row) rows (a torch tensor, C-contiguous) -> the same memory as stored rows of `storage`."""
    return rows.view(row_dtype(storage))


def _key_bytes(keys: np.ndarray) -> list[bytes]:
    """int64 (n,) -> n 8-byte little-endian `bytes` (numpy void items keep trailing zero bytes, unlike 'S8')."""
    return keys.view("V8").tolist()


def _row_bytes(rows: np.ndarray) -> list[bytes]:
    """Rows (n, w) C-contiguous, any dtype (float32 rows, stored rows as uint8) -> n `bytes` of w * itemsize each."""
    return rows.view(f"V{rows.shape[1] * rows.itemsize}").ravel().tolist()


def _byte_order(keys: np.ndarray) -> np.ndarray:
    """Stable permutation that sorts `keys` by their little-endian bytes (RocksDB's bytewise order)."""
    return np.argsort(keys.view(_KEY_ORDER_DTYPE), kind="stable")


def _sorted_unique_last(keys: np.ndarray) -> np.ndarray:
    """Row indices that sort `keys` by byte order, keeping only the last row of each repeated key."""
    order = _byte_order(keys)
    ordered = keys[order]
    keep = np.ones(len(order), dtype=bool)
    keep[:-1] = ordered[1:] != ordered[:-1]  # stable sort: the last of a run is the last occurrence
    return order[keep]


class RocksDBTier(Tier):
    """Persistent tier: one RocksDB directory, one column family per table tag, raw bytes in and out.

    Args:
        path: database directory; created when missing (unless read_only). An existing path must be a RocksDB
            directory (or an empty directory).
        num_threads: RocksDB background parallelism (HPS `num_threads`, `IncreaseParallelism`).
        read_only: open read-only (HPS `OpenForReadOnly`); works beside a writer (it sees the data present when
            it opened); every write raises PermissionError.
        max_batch_size: keys per MultiGet / WriteBatch (HPS `max_batch_size`).
        wal: write-ahead log on for `insert`/`erase` (durable against a crash; off is faster, and `close()` still
            flushes). Bulk `load` never uses the WAL: it writes SST files or flushes at the end.
        block_cache_mb: RocksDB block cache, filled as blocks are read (`OptimizeForPointLookup`; HPS used 8 MB,
            leaving the rest to the OS page cache). A table that fits in it is served ~1.5x faster (measured:
            benchmarks/results/rocksdb_cpu.md).
        sort_fetch_keys: sort each MultiGet chunk by key bytes with numpy and un-permute the results (rocksdict's
            MultiGet otherwise sorts them itself, with RocksDB's comparator).

    All tensors are CPU tensors: keys int64 (n,), values the table's stored rows (hps_core.storage): float32 (n, dim)
    for a float32 table, (n, stored_width(storage, dim)) of row_dtype(storage) otherwise.

    Raises (at construction):
        ValueError: the path is a file, a non-empty directory that is not a RocksDB database, a rocksdict database
            in non-raw mode, or cannot be created; bad arguments.
        FileNotFoundError: read_only and no database at `path`.
        RuntimeError: RocksDB refused to open the database (e.g. another process holds it for writing).

    Example:
        >>> with RocksDBTier("pdb") as db:
        ...     db.create_table("hps_et.m.t0", 4)
        ...     db.insert("hps_et.m.t0", torch.tensor([1, 2]), torch.ones(2, 4))
        ...     values, found = db.fetch("hps_et.m.t0", torch.tensor([2, 3]))   # (2, 4) float32, [True, False]
        ...     db.create_table("hps_et.m.t1", 4, storage="int8")   # rows: int8 (n, 12), 4 codes + scale, bias
        ...     db.insert("hps_et.m.t1", torch.tensor([1]), hps_core.storage.encode_rows(torch.ones(1, 4), "int8"))
    """

    name = "rocksdb"
    persistent = True
    complete = True  # never evicts: it holds every row written to it
    can_drop_tables = True

    def __init__(
        self,
        path: str | os.PathLike,
        num_threads: int = 16,
        read_only: bool = False,
        max_batch_size: int = 65536,
        *,
        wal: bool = True,
        block_cache_mb: int = 1024,
        sort_fetch_keys: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        self.path = pathlib.Path(path)
        self.num_threads = check_int(num_threads, "num_threads", 1)
        self.read_only = _check_bool(read_only, "read_only")
        self.max_batch_size = check_int(max_batch_size, "max_batch_size", 1)
        self.wal = _check_bool(wal, "wal")
        self.block_cache_mb = check_int(block_cache_mb, "block_cache_mb", 1)
        self.sort_fetch_keys = _check_bool(sort_fetch_keys, "sort_fetch_keys")

        self._write_lock = threading.Lock()  # insert / erase / load / create_table / recount: one at a time
        self._db: Any = None

        self._check_path()
        self._options = self._make_options()
        existing = self._existing_column_families()
        access = rocksdict.AccessType.read_only(False) if self.read_only else rocksdict.AccessType.read_write()
        try:
            self._db = rocksdict.Rdict(
                str(self.path),
                self._options,
                column_families={cf: self._options for cf in existing},
                access_type=access,
            )
        except Exception as exc:
            mode = "read-only" if self.read_only else "read-write"
            raise RuntimeError(
                f"RocksDBTier: RocksDB could not open {self.path} {mode}: {exc}"
                + ("" if self.read_only else " (is another process using it? open it with read_only=True)")
            ) from exc

        self._write_options = rocksdict.WriteOptions()
        self._write_options.disable_wal = not self.wal
        self._bulk_write_options = rocksdict.WriteOptions()
        self._bulk_write_options.disable_wal = True
        self._read_options = rocksdict.ReadOptions()
        self._meta_handle = None if self.read_only else self._db.get_column_family_handle(_DEFAULT_CF)

        try:
            for tag in existing:
                if tag != _DEFAULT_CF:
                    self._open_existing(tag)
            if not self.read_only:
                self._remove_stale_staging()
        except BaseException:
            self.close()  # release the directory lock before reporting
            raise
        logger.info(
            "RocksDBTier: opened %s (%s) with %d tables: %s",
            self.path,
            "read-only" if self.read_only else "read-write",
            len(self._tables),
            ", ".join(f"{t} (dim {v.dim}, {v.storage})" for t, v in self._tables.items()) or "-",
        )

    # ----------------------------------------------------------------------------------------------- opening

    def _check_path(self) -> None:
        """Refuse paths that are not (or cannot become) a raw-mode RocksDB directory, before RocksDB touches them."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"RocksDBTier: path {p} exists and is not a directory (expected a RocksDB directory)")
        if self.read_only:
            if not (p / "CURRENT").is_file():
                raise FileNotFoundError(f"RocksDBTier: read_only=True but there is no RocksDB database at {p}")
        elif not p.exists():
            try:
                p.mkdir(parents=True)
            except OSError as exc:
                raise ValueError(f"RocksDBTier: cannot create the database directory {p}: {exc}") from exc
        elif any(p.iterdir()) and not (p / "CURRENT").is_file():
            raise ValueError(
                f"RocksDBTier: {p} is a non-empty directory but not a RocksDB database (no CURRENT file); "
                "give an empty or new directory"
            )
        if not self.read_only and not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"RocksDBTier: database directory {p} is not writable (open it with read_only=True)")
        config = p / "rocksdict-config.json"
        if config.is_file():
            # NOTE: rocksdict opens a non-raw database in raw mode without complaint; its config file tells.
            try:
                raw = json.loads(config.read_text()).get("raw_mode")
            except (OSError, ValueError) as exc:
                raise ValueError(f"RocksDBTier: cannot read {config}: {exc}") from exc
            if raw is False:
                raise ValueError(
                    f"RocksDBTier: {p} is a rocksdict database in non-raw mode ({config} has raw_mode false); "
                    "its keys and values are pickled, not raw bytes"
                )

    def _make_options(self) -> rocksdict.Options:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.increase_parallelism(self.num_threads)
        # Block cache + bloom filters + hash index inside data blocks: what HPS set (with an 8 MB cache).
        opts.optimize_for_point_lookup(self.block_cache_mb)
        # float32 embeddings do not compress: snappy would only cost CPU on every write and read.
        opts.set_compression_type(rocksdict.DBCompressionType.none())
        return opts

    def _existing_column_families(self) -> list[str]:
        if not (self.path / "CURRENT").is_file():
            return [_DEFAULT_CF]
        try:
            return list(rocksdict.Rdict.list_cf(str(self.path), self._options))
        except Exception as exc:
            raise RuntimeError(f"RocksDBTier: cannot list the column families of {self.path}: {exc}") from exc

    def _remove_stale_staging(self) -> None:
        """Remove the SST staging directories a crashed load left. The database is open read-write, so this process
        holds its lock: no other process can be loading into it, and no load of ours is running yet."""
        for stale in self.path.glob(_STAGING_PREFIX + "*"):
            if stale.is_dir():
                logger.warning("RocksDBTier(%s): removing %s, left by a load that did not finish", self.path, stale)
                shutil.rmtree(stale, ignore_errors=True)

    def _meta_get(self, prefix: bytes, tag: str) -> int | None:
        raw = self._db.get(prefix + tag.encode())
        return None if raw is None else int(raw)

    def _meta_storage(self, tag: str) -> str | None:
        """The storage entry of `tag` as a canonical name; None when there is none (HPS's family, or one written
        before storages existed: float32). ValueError for an entry that names no storage (not written by us)."""
        raw = self._db.get(_STORAGE_PREFIX + tag.encode())
        if raw is None:
            return None
        return storage_name(bytes(raw).decode(errors="replace"),
                            field=f"RocksDBTier({self.path}): the storage entry of table {tag!r}")

    def _open_existing(self, tag: str) -> None:
        cf = self._db.get_column_family(tag)
        handle = None if self.read_only else self._db.get_column_family_handle(tag)
        dim = self._meta_get(_DIM_PREFIX, tag)
        storage = self._meta_storage(tag) or "float32"
        if dim is None:
            # A family we did not write (HPS: float32): the first value's length gives the dim.
            for value in cf.values():
                dim = self._dim_of_value(tag, len(value), storage)
                break
            if dim is not None and not self.read_only:
                self._db.put(_DIM_PREFIX + tag.encode(), str(dim).encode(), self._write_options)
        self._tables[tag] = _Table(dim=dim, storage=storage, cf=cf, handle=handle,
                                   count=self._meta_get(_COUNT_PREFIX, tag))

    def _dim_of_value(self, tag: str, length: int, storage: str) -> int:
        """The dim whose rows stored as `storage` are `length` bytes; ValueError when there is none."""
        tail = bytes_per_row(storage, 0)  # the row-wise scale (int8, fp8), 0 bytes for the plain dtypes
        elem = row_dtype(storage).itemsize
        if length <= tail or (length - tail) % elem:
            raise ValueError(
                f"RocksDBTier: column family {tag!r} in {self.path} holds a {length}-byte value, not a row of "
                f"{storage} ({elem}-byte elements" + (f" + {tail} bytes of scale)" if tail else ")")
            )
        return (length - tail) // elem

    # --------------------------------------------------------------------------------------------- helpers

    @property
    def _where(self) -> str:
        return f"RocksDBTier({self.path})"

    def _check_writable(self, what: str, tag: str) -> None:
        if self.read_only:
            raise PermissionError(f"RocksDBTier({self.path}) is open read-only: {what} into {tag!r} refused")

    def _table_dim(self, tag: str, table: _Table) -> int:
        if table.dim is None:
            raise ValueError(
                f"table {tag!r} in RocksDBTier({self.path}) is empty and has no recorded dim: call create_table"
            )
        return table.dim

    def _count_entry(self, tag: str, count: int) -> tuple[bytes, bytes]:
        return _COUNT_PREFIX + tag.encode(), str(count).encode()

    def _new_batch(self, table: _Table) -> rocksdict.WriteBatch:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.set_default_column_family(table.handle)
        return batch

    def _present(self, table: _Table, unique_keys: np.ndarray) -> int:
        """How many of `unique_keys` are stored (a MultiGet; values are fetched and dropped)."""
        found = table.cf.get(_key_bytes(unique_keys), read_opt=self._read_options)
        return len(found) - found.count(None)

    # ------------------------------------------------------------------------------------------ Tier API

    def create_table(self, tag: str, dim: int, storage: str = "float32") -> None:
        """Declare table `tag` of `dim` whose rows `storage` keeps (a hps_core.storage name): creates its column
        family and records the dim and the storage.

        Idempotent for the same dim and storage; another dim or storage for an existing tag raises ValueError naming
        both, with nothing changed (a family without a storage entry - HPS's, or an earlier version's - is float32).
        An existing empty family with no dim entry (HPS's) takes the dim and storage asked for. On a read-only tier
        a tag the database lacks is declared empty (every fetch misses) rather than refused, so an engine can start
        over a read-only database that serves only some of its tables.
        """
        if not isinstance(tag, str) or not tag or tag == _DEFAULT_CF:
            raise ValueError(f"tag must be a non-empty str other than {_DEFAULT_CF!r}, got {tag!r}")
        dim = check_int(dim, "dim", 1)
        storage = check_storage(storage, dim, tag)
        self._check_open()
        with self._write_lock:
            table = self._tables.get(tag)
            if table is not None:
                if table.dim is None:
                    # An empty family with no dim entry (HPS's, or a create_table cut short before its entries): no
                    # row tells its storage, so unless an entry records one it becomes what is asked.
                    recorded = self._meta_storage(tag)
                    if recorded is not None:
                        check_storage_match(tag, self._where, recorded, storage)
                    if not self.read_only:
                        batch = rocksdict.WriteBatch(raw_mode=True)
                        batch.put(_DIM_PREFIX + tag.encode(), str(dim).encode())
                        batch.put(_STORAGE_PREFIX + tag.encode(), storage.encode())
                        self._db.write(batch, self._write_options)
                    table.dim, table.storage = dim, storage
                    return
                if table.dim != dim:
                    raise ValueError(
                        f"table {tag!r} already exists in RocksDBTier({self.path}) with dim {table.dim}; "
                        f"create_table asked for dim {dim}"
                    )
                check_storage_match(tag, self._where, table.storage, storage)
                return
            if self.read_only:
                logger.warning("RocksDBTier(%s) is read-only and has no table %r: every key misses", self.path, tag)
                self._tables[tag] = _Table(dim=dim, storage=storage, cf=None, handle=None, count=0)
                return
            cf = self._db.create_column_family(tag, self._options)
            handle = self._db.get_column_family_handle(tag)
            # One batch: a table never has a dim entry without its storage entry (a crash before it leaves an empty
            # family without entries, which the next create_table completes).
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(_DIM_PREFIX + tag.encode(), str(dim).encode())
            batch.put(_STORAGE_PREFIX + tag.encode(), storage.encode())
            batch.put(*self._count_entry(tag, 0))
            self._db.write(batch, self._write_options)
            self._tables[tag] = _Table(dim=dim, storage=storage, cf=cf, handle=handle, count=0)
            logger.info("RocksDBTier(%s): created table %s (dim %d, %s)", self.path, tag, dim, storage)

    def drop_table(self, tag: str) -> None:
        """Remove table `tag`: its column family and its records (a start that failed undoes its new tables)."""
        self._check_open()
        self._check_writable("drop_table", tag)
        with self._write_lock:
            table = self._tables.pop(tag, None)
            if table is None:
                return
            if table.cf is not None:
                table.cf.close()
            self._db.drop_column_family(tag)
            batch = rocksdict.WriteBatch(raw_mode=True)
            for prefix in (_DIM_PREFIX, _STORAGE_PREFIX, _COUNT_PREFIX, _LOADED_PREFIX):
                batch.delete(prefix + tag.encode())
            self._db.write(batch, self._write_options)
        logger.info("RocksDBTier(%s): dropped table %s", self.path, tag)

    def loaded_from(self, tag: str) -> str | None:
        """The identity of the table files `tag` was last completely loaded from (None: never, or a load did not
        finish)."""
        self._table(tag)
        raw = self._db.get(_LOADED_PREFIX + tag.encode())
        return None if raw is None else bytes(raw).decode()

    def mark_loaded(self, tag: str, identity: str | None) -> None:
        """Record (or, with None, forget) the identity of the files `tag` now holds completely."""
        self._table(tag)
        self._check_writable("mark_loaded", tag)
        key = _LOADED_PREFIX + tag.encode()
        if identity is None:
            self._db.delete(key, self._write_options)
        else:
            self._db.put(key, identity.encode(), self._write_options)

    def iter_chunks(self, tag: str, chunk_rows: int = 1 << 16) -> Any:
        """Yield (keys int64 (m,), stored rows (m, stored_width) of the table's storage dtype) CPU tensor blocks of
        every row of `tag`, in key-byte order (a start loads the upper tiers and the resident tables from here when
        this tier holds the newest rows). The rows are the bytes stored, not re-encoded. A key or value of the wrong
        size (not written by a tier of this table) is left out and logged, as a fetch reports it missing."""
        table = self._table(tag)
        dim = self._table_dim(tag, table)
        chunk_rows = check_int(chunk_rows, "chunk_rows", 1)
        if table.cf is None:
            return
        row_bytes = bytes_per_row(table.storage, dim)
        key_bytes = _KEY_DTYPE.itemsize
        items = iter(table.cf.items())
        while True:
            block = list(itertools.islice(items, chunk_rows))
            if not block:
                return
            good = [(k, v) for k, v in block if len(k) == key_bytes and len(v) == row_bytes]
            if len(good) != len(block):
                logger.error("RocksDBTier(%s): %d entries of %s are not an 8-byte key and a %d-byte row (dim %d, %s): "
                             "left out", self.path, len(block) - len(good), tag, row_bytes, dim, table.storage)
            if not good:
                continue
            # Copied into writable memory (bytearray): torch does not take read-only buffers.
            keys = torch.frombuffer(bytearray(b"".join(k for k, _ in good)), dtype=torch.int64)
            rows = torch.frombuffer(bytearray(b"".join(v for _, v in good)), dtype=torch.uint8)
            yield keys, _bytes_tensor(rows.reshape(len(good), row_bytes), table.storage)

    def fetch(self, tag: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys` -> (stored rows (n, stored_width) of the table's storage dtype - float32 (n, dim) for a
        float32 table -, found bool (n,)), CPU; missing rows are zero bytes. The rows are the bytes stored.

        One MultiGet per `max_batch_size` keys. A RocksDB read error (or a stored value of the wrong length)
        reports those keys as not found and counts them in `stats()[tag].errors`; it never raises.
        Safe from several threads at once; NOTE: rocksdict (0.3.29) holds the GIL inside MultiGet, so concurrent
        fetches do not run in parallel.

        Example:
            >>> values, found = tier.fetch("hps_et.m.t0", torch.tensor([1, 5], dtype=torch.int64))
        """
        table = self._table(tag)
        np_keys = _keys_numpy(keys)
        dim = self._table_dim(tag, table)
        n = len(np_keys)
        row_bytes = bytes_per_row(table.storage, dim)
        # The rows as bytes (numpy has no bfloat16 / fp8); the tensor is viewed as the storage's dtype at the end.
        if not n or table.cf is None:
            values, found = torch.zeros((n, row_bytes), dtype=torch.uint8), torch.zeros(n, dtype=torch.bool)
            hits = errors = 0
        else:
            values, found = torch.empty((n, row_bytes), dtype=torch.uint8), torch.empty(n, dtype=torch.bool)
            hits, errors = self._multi_get(tag, table, np_keys, values.numpy(), found.numpy())
        self._count(table.stats, fetches=1, keys_requested=n, keys_found=hits, errors=errors)
        return _bytes_tensor(values, table.storage), found

    def _multi_get(
        self, tag: str, table: _Table, keys: np.ndarray, out: np.ndarray, out_found: np.ndarray
    ) -> tuple[int, int]:
        """Fill out (n, row_bytes) uint8 and out_found (n,) from MultiGets of `max_batch_size` keys; returns
        (hits, errors).

        Per chunk: MultiGet with a shared all-zero row as the default (a miss returns that very object, so
        `is not` tells hits from misses even for stored all-zero rows), one join of the values, one frombuffer,
        and one copy into `out` (a scatter back to input order when the keys were sorted), one row-sized record per
        row whatever the storage. No per-key numpy or float work.
        """
        row_bytes = out.shape[1]
        records = out.view(np.dtype((np.void, row_bytes)))[:, 0]  # (n,) row records, a view of `out`
        zero_row = bytes(row_bytes)
        hits = errors = 0
        for start in range(0, len(keys), self.max_batch_size):
            chunk = keys[start : start + self.max_batch_size]
            stop = start + len(chunk)
            # Where the i-th MultiGet result goes: sorted chunk -> a permutation of start..stop, else a slice.
            where: slice | np.ndarray = slice(start, stop)
            if self.sort_fetch_keys and len(chunk) > 1:
                order = _byte_order(chunk)
                chunk, where = chunk[order], order + start
            try:
                got = table.cf.get(_key_bytes(chunk), default=zero_row, read_opt=self._read_options)
            except Exception as exc:  # a tier that fails reports misses, never raises into a lookup
                logger.error("RocksDBTier(%s): MultiGet of %d keys from %s failed: %s", self.path, len(chunk), tag, exc)
                out[start:stop] = 0
                out_found[start:stop] = False
                errors += len(chunk)
                continue
            hit = np.fromiter(map(operator.is_not, got, itertools.repeat(zero_row)), dtype=bool, count=len(got))
            joined = b"".join(got)
            if len(joined) != len(got) * row_bytes:  # a stored value of another size: report it missing
                lengths = np.fromiter(map(len, got), dtype=np.int64, count=len(got))
                bad = lengths != row_bytes
                logger.error(
                    "RocksDBTier(%s): %d values of %s are not %d bytes (dim %d, %s): reported as missing",
                    self.path, int(bad.sum()), tag, row_bytes, table.dim, table.storage,
                )
                errors += int(bad.sum())
                hit &= ~bad
                joined = b"".join([zero_row if b else v for v, b in zip(got, bad.tolist())])
            records[where] = np.frombuffer(joined, dtype=records.dtype)
            out_found[where] = hit
            hits += int(np.count_nonzero(hit))
        return hits, errors

    def insert(self, tag: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Insert or overwrite stored rows (keys int64 (n,), values the table's stored rows (n, stored_width) of its
        storage's dtype: float32 (n, dim) for a float32 table, see check_values); returns how many keys were new.

        The rows are written as they are (their bytes): encode float32 rows first (hps_core.storage.encode_rows).
        Bad input raises TypeError / ValueError before anything is written. Duplicate keys in one call: the last
        row wins and the key counts once. Written in WriteBatches of `max_batch_size` rows (WAL per `wal`); each
        batch also carries the table's new key count.
        """
        table = self._table(tag)
        np_keys = _keys_numpy(keys)
        dim = self._table_dim(tag, table)
        np_values = _values_bytes(values, len(np_keys), dim, tag, table.storage)
        self._check_writable("insert", tag)
        new_total = 0
        with self._write_lock:
            for start in range(0, len(np_keys), self.max_batch_size):
                chunk = np_keys[start : start + self.max_batch_size]
                unique = np.unique(chunk)
                new = len(unique) - self._present(table, unique)
                batch = self._new_batch(table)
                rows = _row_bytes(np_values[start : start + len(chunk)])
                collections.deque(map(batch.put, _key_bytes(chunk), rows), maxlen=0)
                if table.count is not None:
                    batch.put(*self._count_entry(tag, table.count + new), self._meta_handle)
                self._db.write(batch, self._write_options)
                if table.count is not None:
                    table.count += new
                new_total += new
            self._count(table.stats, keys_inserted=len(np_keys))
        return new_total

    def erase(self, tag: str, keys: torch.Tensor) -> int:
        """Remove keys (int64 (n,)); returns how many distinct keys were present."""
        table = self._table(tag)
        np_keys = _keys_numpy(keys)
        self._check_writable("erase", tag)
        removed = 0
        with self._write_lock:
            for start in range(0, len(np_keys), self.max_batch_size):
                unique = np.unique(np_keys[start : start + self.max_batch_size])
                present = self._present(table, unique)
                if not present:
                    continue
                batch = self._new_batch(table)
                collections.deque(map(batch.delete, _key_bytes(unique)), maxlen=0)
                if table.count is not None:
                    batch.put(*self._count_entry(tag, table.count - present), self._meta_handle)
                self._db.write(batch, self._write_options)
                if table.count is not None:
                    table.count -= present
                removed += present
            self._count(table.stats, keys_evicted=removed)
        return removed

    def size(self, tag: str) -> int:
        """Exact number of keys stored for `tag` (kept by insert/erase/load; counted by iteration when unknown)."""
        table = self._table(tag)
        if table.count is None:
            with self._write_lock:
                if table.count is None:
                    table.count = self._recount(tag, table)
        return table.count

    def _recount(self, tag: str, table: _Table) -> int:
        """Count the keys of a family by iterating it (caller holds the write lock); store the count if writable."""
        logger.info("RocksDBTier(%s): counting the keys of %s", self.path, tag)
        count = sum(1 for _ in table.cf.keys())
        if not self.read_only:
            self._db.put(*self._count_entry(tag, count), self._write_options)
        return count

    def load(
        self,
        tag: str,
        table: "TableFiles",
        progress: bool = True,
        storage: str = "float32",
        *,
        method: str = "sst",
    ) -> int:
        """Bulk-load table files (`TableFiles`: keys int64 (N,), vectors float32 (N, dim)) into table `tag`, creating
        it with the files' dim and `storage` (a hps_core.storage name) when needed; returns rows read.

        Blocks of float32 rows (table files) are encoded into the table's storage as they go (storage.to_stored); a
        source whose blocks are already the table's stored rows (another tier's iter_chunks: torch tensors of the
        storage's dtype) is copied as it is. Rows already stored are overwritten; a key repeated in the files keeps
        its last row.
        method="sst" (default, faster): each block of rows is sorted by key bytes, de-duplicated, encoded a slab at a
        time and written to an SST file; all files are ingested at the end in one call (nothing is visible, and
        nothing written, if a block fails). method="write_batch": WriteBatches of `max_batch_size` rows without WAL,
        flushed at the end; a block that fails leaves the blocks before it written (the table's load record stays
        cleared, so a start loads the files again).
        The key count is exact afterwards: computed from the loaded keys when the table was empty (8 bytes of RAM per
        row while loading), else recounted by iterating the table.

        Raises:
            ValueError: the files' dim, or `storage`, differs from the existing table's (nothing is written); a
                block the storage cannot keep (NaN / inf rows in an int8 or fp8 table, |x| > 65504 in a float16 one),
                naming its rows; an unknown method or storage.
            TypeError: the source yields keys or rows of another dtype or shape.
            PermissionError: the tier is read-only.
        """
        if method not in _LOAD_METHODS:
            raise ValueError(f"method must be one of {list(_LOAD_METHODS)}, got {method!r}")
        progress = _check_bool(progress, "progress")
        self._check_open()
        self._check_writable("load", tag)
        check_table_files(table)
        files_dim = check_int(table.dim, "table.dim", 1)
        num_rows = operator.index(table.num_keys)
        where = str(getattr(table, "path", table))
        existing = self._tables.get(tag)
        if existing is not None and existing.dim is not None and existing.dim != files_dim:
            raise ValueError(f"table files {where!r} have dim {files_dim}, table {tag!r} has dim {existing.dim}")
        # Creates the table, or checks the existing one's storage (ValueError naming both before anything is
        # written; an empty family without entries takes this dim and storage).
        self.create_table(tag, files_dim, storage)
        rt = self._table(tag)
        dim = self._table_dim(tag, rt)
        row_bytes = _KEY_DTYPE.itemsize + dim * _VALUE_DTYPE.itemsize  # of the table files
        block_rows = max(1, _LOAD_BLOCK_BYTES // row_bytes) if method == "sst" else self.max_batch_size
        desc = f"rocksdb load {tag}"

        with self._write_lock:
            was_empty = rt.count == 0
            # Count unknown and no "loaded" record while loading: a crash mid-load leaves no stale one behind.
            self._db.delete(_COUNT_PREFIX + tag.encode(), self._write_options)
            self._db.delete(_LOADED_PREFIX + tag.encode(), self._write_options)
            rt.count = None
            unique_blocks: list[np.ndarray] = []
            try:
                chunks = table.iter_chunks(block_rows, progress=progress, desc=desc)
                if method == "sst":
                    rows = self._load_sst(rt, chunks, dim, where, unique_blocks)
                else:
                    rows = self._load_write_batch(rt, chunks, dim, where, unique_blocks)
            except BaseException:
                rt.count = self._recount(tag, rt)  # whatever made it in (nothing, for a failed SST load)
                raise
            if was_empty:
                # Exact without iterating RocksDB: the distinct keys of the files.
                if len(unique_blocks) <= 1:
                    rt.count = sum(len(u) for u in unique_blocks)
                else:  # a key may repeat across blocks
                    rt.count = len(np.unique(np.concatenate(unique_blocks)))
                self._db.put(*self._count_entry(tag, rt.count), self._write_options)
            else:
                rt.count = self._recount(tag, rt)
            if rows != num_rows:
                logger.warning("RocksDBTier(%s): table files of %s announced %d rows, read %d",
                               self.path, tag, num_rows, rows)
            self._count(rt.stats, keys_inserted=rows)
        logger.info("RocksDBTier(%s): loaded %d rows into %s (%s, %s), %d keys stored",
                    self.path, rows, tag, method, rt.storage, rt.count)
        return rows

    @staticmethod
    def _check_chunk(
        keys: Any, vectors: Any, dim: int, storage: str, where: str
    ) -> tuple[np.ndarray, np.ndarray | torch.Tensor]:
        """One block of a load source -> (keys int64 (m,) contiguous numpy, rows): a numpy block must be float32
        (m, dim) rows (table files); a torch block float32 (m, dim) rows or the storage's stored rows (another
        tier's iter_chunks). TypeError naming what was found otherwise."""
        if isinstance(keys, torch.Tensor):
            keys = keys.detach().cpu().numpy()
        keys = np.ascontiguousarray(keys)
        if keys.ndim != 1 or keys.dtype != _KEY_DTYPE:
            raise TypeError(f"{where} yielded keys of dtype {keys.dtype} shape {keys.shape}, expected int64 (m,)")
        m = len(keys)
        width, dtype = stored_width(storage, dim), row_dtype(storage)
        if isinstance(vectors, torch.Tensor):
            ok = vectors.dim() == 2 and vectors.shape[0] == m and (
                (vectors.dtype == dtype and vectors.shape[1] == width)
                or (vectors.dtype == torch.float32 and vectors.shape[1] == dim)
            )
            found = f"{vectors.dtype} shape {tuple(vectors.shape)}"
        else:
            vectors = np.asarray(vectors)
            ok = vectors.dtype == _VALUE_DTYPE and vectors.shape == (m, dim)
            found = f"{vectors.dtype} shape {vectors.shape}"
        if not ok:
            expected = f"float32 ({m}, {dim})"
            if storage != "float32":
                expected += f" or {storage} stored rows ({dtype}, ({m}, {width}))"
            raise TypeError(f"{where} yielded rows of dtype {found}, expected {expected}")
        return keys, vectors

    @staticmethod
    def _stored_rows(vectors: np.ndarray | torch.Tensor, storage: str, dim: int, field: str) -> np.ndarray:
        """A checked block as a numpy array whose rows are the stored rows' bytes: float32 file rows of a float32
        table as they are (a view of the memory map: no copy), anything else through to_stored (float32 rows checked
        and encoded, stored rows copied as they are) as uint8 (m, bytes_per_row)."""
        if isinstance(vectors, np.ndarray) and storage == "float32":
            return vectors
        return to_stored(vectors, storage, dim, field=field).view(torch.uint8).numpy()

    @staticmethod
    def _encode_gathered(
        rows: np.ndarray, block: np.ndarray, storage: str, dim: int, first: int, where: str
    ) -> np.ndarray:
        """float32 rows gathered in key order from `block` (file rows `first`.. of `where`) -> their stored rows as
        uint8 (k, bytes_per_row). A row the storage cannot keep raises the ValueError check_encodable gives when the
        block is scanned in file order: the gathered order's row numbers would point nowhere in the files."""
        try:
            return to_stored(torch.from_numpy(rows), storage, dim).view(torch.uint8).numpy()
        except ValueError:
            for s in range(0, len(block), _SST_PUT_ROWS):
                part = torch.from_numpy(np.array(block[s : s + _SST_PUT_ROWS]))  # a copy: the map is read-only
                check_encodable(part, storage, field=f"rows {first + s}.. of {where}")
            raise

    def _load_sst(self, rt: _Table, chunks: Any, dim: int, where: str, unique_blocks: list[np.ndarray]) -> int:
        storage = rt.storage
        rows = 0
        with tempfile.TemporaryDirectory(prefix=_STAGING_PREFIX, dir=self.path) as staging:
            paths = []
            for keys, vectors in chunks:
                keys, vectors = self._check_chunk(keys, vectors, dim, storage, where)
                first, rows = rows, rows + len(keys)
                if not len(keys):
                    continue
                # float32 file rows of another storage are encoded after the gather, a slab at a time (encoding the
                # block first would hold an encoded copy of it in RAM); other blocks are gathered as stored rows.
                encode = isinstance(vectors, np.ndarray) and storage != "float32"
                source = vectors if encode else self._stored_rows(vectors, storage, dim, f"rows {first}.. of {where}")
                keep = _sorted_unique_last(keys)
                sorted_keys = keys[keep]
                unique_blocks.append(sorted_keys)
                sst_path = os.path.join(staging, f"{len(paths):06d}.sst")
                writer = rocksdict.SstFileWriter(self._options)
                writer.open(sst_path)
                # Rows gathered from the memory map in key-byte order, a slab at a time into one reused buffer
                # (a fresh copy of the whole block would cost its size in RAM and page faults). A slab that fails to
                # encode leaves an unfinished file in staging, removed with it: nothing is ingested.
                slab = np.empty((min(_SST_PUT_ROWS, len(keep)),) + source.shape[1:], dtype=source.dtype)
                for s in range(0, len(keep), _SST_PUT_ROWS):
                    part = keep[s : s + _SST_PUT_ROWS]
                    rows_out = slab[: len(part)]
                    np.take(source, part, axis=0, out=rows_out)
                    if encode:
                        rows_out = self._encode_gathered(rows_out, vectors, storage, dim, first, where)
                    collections.deque(
                        map(writer.__setitem__, _key_bytes(sorted_keys[s : s + len(part)]), _row_bytes(rows_out)),
                        maxlen=0,
                    )
                writer.finish()
                paths.append(sst_path)
            if paths:
                opts = rocksdict.IngestExternalFileOptions()
                opts.set_move_files(True)  # hard-link into the DB (same filesystem) rather than copy
                # One call: files ingested later get newer sequence numbers, so a later block wins on overlap.
                rt.cf.ingest_external_file(paths, opts)
        return rows

    def _load_write_batch(self, rt: _Table, chunks: Any, dim: int, where: str, unique_blocks: list[np.ndarray]) -> int:
        rows = 0
        for keys, vectors in chunks:
            keys, vectors = self._check_chunk(keys, vectors, dim, rt.storage, where)
            first, rows = rows, rows + len(keys)
            if not len(keys):
                continue
            # Checked and encoded before anything of the block is written (a block fails whole).
            stored = np.ascontiguousarray(self._stored_rows(vectors, rt.storage, dim, f"rows {first}.. of {where}"))
            unique_blocks.append(np.unique(keys))
            batch = self._new_batch(rt)
            collections.deque(map(batch.put, _key_bytes(keys), _row_bytes(stored)), maxlen=0)
            self._db.write(batch, self._bulk_write_options)
        rt.cf.flush()  # the rows went in without WAL: make them durable now
        return rows

    def close(self) -> None:
        """Flush memtables (read-write) and close the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._write_lock:
            cfs = [t.cf for t in self._tables.values() if t.cf is not None]
            self._tables.clear()
            self._meta_handle = None
            try:
                if not self.read_only:
                    for cf in cfs:
                        cf.flush()
                for cf in cfs:
                    cf.close()
            finally:
                del cfs
                db, self._db = self._db, None
                if db is not None:
                    db.close()
        logger.info("RocksDBTier: closed %s", self.path)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.read_only else "read-write")
        return f"RocksDBTier({str(self.path)!r}, {state}, tables={len(self._tables)})"

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
