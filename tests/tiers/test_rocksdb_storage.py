"""RocksDBTier with compact storages (hps_core.storage) against real RocksDB directories in tmp_path.

Covers: stored rows of every storage written and fetched as the same bytes, the on-disk layout (value = the stored
row's bytes, a storage entry per table), the storage kept across reopen (read-write and read-only), another storage
refused with nothing written, tables without a storage entry (HPS's, earlier versions') read as float32, load from
table files encoded as encode_rows would (both methods, several blocks and slabs), load of another tier's stored
blocks copied as they are, iter_chunks yielding stored rows, bad input and rows a storage cannot keep refused.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import rocksdict
import torch

from hps_core import storage as st
from hps_core.tables import write_table
from hps_core.tiers import rocksdb as rocksdb_module
from hps_core.tiers.rocksdb import RocksDBTier

STORAGES = list(st.STORAGE_NAMES)  # float32, float16, bfloat16, int8, fp8_e4m3
DIM = 8
TAG = "hps_et.m.t0"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
METHODS = ["sst", "write_batch"]


def keys_t(keys) -> torch.Tensor:
    return torch.tensor(list(keys), dtype=torch.int64)


def as_bytes(rows: torch.Tensor) -> np.ndarray:
    """Stored rows as their bytes, uint8 (n, bytes_per_row): compares bf16 / fp8 rows bit for bit (NaN, -0.0 too)."""
    return rows.contiguous().view(torch.uint8).numpy()


def other_storage(storage: str) -> str:
    return "int8" if storage != "int8" else "bfloat16"


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


def random_rows(rng, n: int, dim: int = DIM) -> torch.Tensor:
    # Wide magnitudes and a few exact zeros / negative zeros: every codec's corners, all encodable.
    rows = rng.standard_normal((n, dim)).astype(np.float32) * rng.choice([1e-3, 1.0, 300.0], size=(n, 1))
    rows[::7, 0] = 0.0
    rows[::11, 1] = -0.0
    return torch.from_numpy(rows.astype(np.float32))


def open_raw(path):
    """The directory opened with rocksdict directly (raw mode), as HPS or another tool would see it."""
    families = rocksdict.Rdict.list_cf(str(path))
    opts = rocksdict.Options(raw_mode=True)
    return rocksdict.Rdict(str(path), opts, column_families={cf: opts for cf in families})


# ------------------------------------------------------------------------------------------ insert / fetch


@pytest.mark.parametrize("storage", STORAGES)
def test_insert_fetch_same_bytes_and_reopen(tmp_path, rng, storage):
    path = tmp_path / "db"
    keys = np.concatenate([[INT64_MIN, INT64_MAX, 0, -1], rng.integers(-(10**6), 10**6, 200)]).astype(np.int64)
    keys = np.unique(keys)
    stored = st.encode_rows(random_rows(rng, len(keys)), storage)
    width = st.stored_width(storage, DIM)
    assert stored.shape == (len(keys), width)
    probe = torch.from_numpy(np.concatenate([keys[::-1], [12_345_678_901]]))  # reversed + one miss
    with RocksDBTier(path, num_threads=2, max_batch_size=37) as t:
        t.create_table(TAG, DIM, storage)
        assert t.storage(TAG) == storage and t.tables() == {TAG: DIM}
        assert t.insert(TAG, torch.from_numpy(keys), stored) == len(keys)
        values, found = t.fetch(TAG, probe)
        assert values.dtype == st.row_dtype(storage) and values.shape == (len(probe), width)
        assert found[:-1].all() and not found[-1]
        np.testing.assert_array_equal(as_bytes(values[:-1]), as_bytes(stored)[::-1])
        assert not as_bytes(values[-1:]).any()  # a miss is zero bytes
        empty, none = t.fetch(TAG, torch.empty(0, dtype=torch.int64))
        assert empty.dtype == st.row_dtype(storage) and empty.shape == (0, width) and none.shape == (0,)
        assert t.insert(TAG, torch.empty(0, dtype=torch.int64), stored[:0]) == 0
    # The directory keeps the storage: a plain reopen and a read-only one find it without being told.
    for read_only in (False, True):
        with RocksDBTier(path, num_threads=2, read_only=read_only) as t:
            assert t.storage(TAG) == storage and t.tables() == {TAG: DIM} and t.size(TAG) == len(keys)
            values, found = t.fetch(TAG, probe)
            assert values.dtype == st.row_dtype(storage) and found[:-1].all()
            np.testing.assert_array_equal(as_bytes(values[:-1]), as_bytes(stored)[::-1])
            t.create_table(TAG, DIM, storage)  # idempotent for the same dim and storage
            t.create_table(TAG, DIM, st.row_dtype(storage))  # a dtype names the same storage


@pytest.mark.parametrize("storage", STORAGES)
def test_on_disk_layout(tmp_path, rng, storage):
    """value = the stored row's bytes (bytes_per_row); the storage is recorded as ASCII next to the dim."""
    path = tmp_path / "db"
    stored = st.encode_rows(random_rows(rng, 3), storage)
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM, storage)
        t.insert(TAG, keys_t([-2, 5, 9]), stored)
    db = open_raw(path)
    try:
        assert db[b"hps/storage/" + TAG.encode()] == storage.encode()
        assert db[b"hps/dim/" + TAG.encode()] == b"8"
        cf = db.get_column_family(TAG)
        for i, k in enumerate((-2, 5, 9)):
            value = cf[struct.pack("<q", k)]
            assert len(value) == st.bytes_per_row(storage, DIM)
            assert value == as_bytes(stored[i : i + 1]).tobytes()
        if storage == "float32":  # HPS's own layout: dim little-endian float32
            assert cf[struct.pack("<q", 5)] == struct.pack(f"<{DIM}f", *stored[1].tolist())
        cf.close()
    finally:
        db.close()


def test_row_dtype_views_are_not_copies_of_other_rows(tmp_path, rng):
    """Rows of one key land at every position asking for it, and a stored all-zero row is found (not a miss)."""
    stored = st.encode_rows(torch.cat([random_rows(rng, 2), torch.zeros(1, DIM)]), "int8")
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=2) as t:
        t.create_table(TAG, DIM, "int8")
        t.insert(TAG, keys_t([1, 2, 3]), stored)
        values, found = t.fetch(TAG, keys_t([3, 1, 4, 1, 2, 3]))
        assert found.tolist() == [True, True, False, True, True, True]
        np.testing.assert_array_equal(as_bytes(values)[[0, 1, 3, 4, 5]], as_bytes(stored)[[2, 0, 0, 1, 2]])


# -------------------------------------------------------------------------------------- storage mismatch


@pytest.mark.parametrize("storage", STORAGES)
def test_create_table_with_another_storage_is_refused(tmp_path, rng, storage):
    path = tmp_path / "db"
    other = other_storage(storage)
    stored = st.encode_rows(random_rows(rng, 4), storage)
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM, storage)
        t.insert(TAG, keys_t([1, 2, 3, 4]), stored)
        with pytest.raises(ValueError, match=rf"storage {storage}.*storage {other}"):
            t.create_table(TAG, DIM, other)
        assert t.storage(TAG) == storage and t.size(TAG) == 4
    with RocksDBTier(path, num_threads=2) as t:  # nothing changed on disk either
        with pytest.raises(ValueError, match=rf"storage {storage}.*storage {other}"):
            t.create_table(TAG, DIM, other)
        assert t.storage(TAG) == storage and t.size(TAG) == 4
        values, found = t.fetch(TAG, keys_t([1, 2, 3, 4]))
        assert found.all() and values.dtype == st.row_dtype(storage)
        np.testing.assert_array_equal(as_bytes(values), as_bytes(stored))
    db = open_raw(path)
    try:
        assert db[b"hps/storage/" + TAG.encode()] == storage.encode()
    finally:
        db.close()
    with RocksDBTier(path, read_only=True) as t:  # read-only opens refuse it the same way
        with pytest.raises(ValueError, match=rf"storage {storage}.*storage {other}"):
            t.create_table(TAG, DIM, other)


def test_bad_storage_arguments(tmp_path):
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        with pytest.raises(ValueError, match="storage"):
            t.create_table(TAG, DIM, "int4")
        with pytest.raises(ValueError, match="multiple of 4"):
            t.create_table(TAG, 6, "int8")
        assert t.tables() == {}
        t.create_table(TAG, DIM, "fp8")  # an alias: recorded under its canonical name
        assert t.storage(TAG) == "fp8_e4m3"


def test_table_without_storage_entry_is_float32(tmp_path, rng):
    """A table written before storages existed (a dim entry, no storage entry) is float32; another storage is
    refused, float32 works as before."""
    path = tmp_path / "db"
    rows = random_rows(rng, 3)
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM)
        t.insert(TAG, keys_t([1, 2, 3]), rows)
    db = open_raw(path)
    del db[b"hps/storage/" + TAG.encode()]
    db.close()
    with RocksDBTier(path, num_threads=2) as t:
        assert t.storage(TAG) == "float32"
        with pytest.raises(ValueError, match=r"storage float32.*storage int8"):
            t.create_table(TAG, DIM, "int8")
        t.create_table(TAG, DIM, "float32")
        np.testing.assert_array_equal(t.fetch(TAG, keys_t([1, 2, 3]))[0].numpy(), rows.numpy())


def test_hps_family_without_entries(tmp_path):
    """HPS's families: no entries at all. One with rows is float32 with the dim of its values; an empty one takes
    the dim and storage its first create_table asks for, and records them."""
    path = tmp_path / "db"
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path), opts)
    full = db.create_column_family("hps_et.hps.full", opts)
    full[struct.pack("<q", 7)] = np.full(4, 7, np.float32).tobytes()
    full.close()
    db.create_column_family("hps_et.hps.empty", opts).close()
    db.close()
    with RocksDBTier(path, num_threads=2) as t:
        assert t.tables() == {"hps_et.hps.full": 4, "hps_et.hps.empty": None}
        assert t.storage("hps_et.hps.full") == "float32"
        with pytest.raises(ValueError, match=r"storage float32.*storage int8"):
            t.create_table("hps_et.hps.full", 4, "int8")
        t.create_table("hps_et.hps.empty", DIM, "int8")
        assert t.storage("hps_et.hps.empty") == "int8"
    with RocksDBTier(path, num_threads=2) as t:
        assert t.tables() == {"hps_et.hps.full": 4, "hps_et.hps.empty": DIM}
        assert t.storage("hps_et.hps.empty") == "int8"
        assert t.fetch("hps_et.hps.full", keys_t([7]))[0].tolist() == [[7.0] * 4]


def test_drop_table_forgets_the_storage(tmp_path, rng):
    path = tmp_path / "db"
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM, "int8")
        t.insert(TAG, keys_t([1]), st.encode_rows(random_rows(rng, 1), "int8"))
        t.drop_table(TAG)
        t.create_table(TAG, DIM, "bfloat16")  # a new table: any storage
        assert t.storage(TAG) == "bfloat16" and t.size(TAG) == 0
    with RocksDBTier(path, num_threads=2) as t:
        assert t.storage(TAG) == "bfloat16"


def test_read_only_declares_a_missing_table_with_its_storage(tmp_path):
    path = tmp_path / "db"
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM)
    with RocksDBTier(path, read_only=True) as t:
        t.create_table("hps_et.m.absent", DIM, "fp8_e4m3")
        assert t.storage("hps_et.m.absent") == "fp8_e4m3"
        values, found = t.fetch("hps_et.m.absent", keys_t([1, 2]))
        assert values.dtype == torch.float8_e4m3fn and values.shape == (2, DIM + 4) and not found.any()
        assert not as_bytes(values).any()
        assert list(t.iter_chunks("hps_et.m.absent")) == []


# ------------------------------------------------------------------------------------------- bad inserts


@pytest.mark.parametrize(
    "storage, values, error, match",
    [
        ("int8", lambda n: torch.ones(n, DIM), TypeError, r"dtype torch\.int8.*float32"),
        ("int8", lambda n: torch.ones(n, DIM, dtype=torch.int8), ValueError, r"16"),  # codes without the scale
        ("fp8_e4m3", lambda n: st.encode_rows(torch.ones(n, DIM), "int8"), TypeError, "dtype"),
        ("bfloat16", lambda n: torch.ones(n, DIM, dtype=torch.float16), TypeError, "bfloat16"),
        ("float32", lambda n: st.encode_rows(torch.ones(n, DIM), "float16"), TypeError, "float32"),
        ("int8", lambda n: st.encode_rows(torch.ones(n + 1, DIM), "int8"), ValueError, "one row per key"),
    ],
)
def test_bad_insert_raises_and_writes_nothing(tmp_path, rng, storage, values, error, match):
    good = st.encode_rows(random_rows(rng, 1), storage)
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, DIM, storage)
        t.insert(TAG, keys_t([9]), good)
        with pytest.raises(error, match=match):
            t.insert(TAG, keys_t([1, 2]), values(2))
        assert t.size(TAG) == 1
        assert not t.fetch(TAG, keys_t([1, 2]))[1].any()
        np.testing.assert_array_equal(as_bytes(t.fetch(TAG, keys_t([9]))[0]), as_bytes(good))


def test_value_of_wrong_length_is_a_counted_miss_and_left_out_of_iter_chunks(tmp_path, rng):
    path = tmp_path / "db"
    stored = st.encode_rows(random_rows(rng, 2), "int8")
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, DIM, "int8")
        t.insert(TAG, keys_t([1, 2]), stored)
    db = open_raw(path)
    cf = db.get_column_family(TAG)
    cf[struct.pack("<q", 2)] = b"\x01" * (DIM * 4)  # a float32 row in an int8 table (dim + 8 bytes): corrupt
    cf.close()
    db.close()
    with RocksDBTier(path, num_threads=2) as t:
        values, found = t.fetch(TAG, keys_t([1, 2]))
        assert found.tolist() == [True, False]
        np.testing.assert_array_equal(as_bytes(values[:1]), as_bytes(stored[:1]))
        assert not as_bytes(values[1:]).any()
        assert t.stats()[TAG].errors == 1
        chunks = list(t.iter_chunks(TAG))
        assert [k.tolist() for k, _ in chunks] == [[1]]
        np.testing.assert_array_equal(as_bytes(chunks[0][1]), as_bytes(stored[:1]))


# ------------------------------------------------------------------------------------------- iter_chunks


@pytest.mark.parametrize("storage", STORAGES)
def test_iter_chunks_yields_stored_rows(tmp_path, rng, storage):
    keys = np.unique(rng.integers(INT64_MIN, INT64_MAX, 300, dtype=np.int64, endpoint=True))
    stored = st.encode_rows(random_rows(rng, len(keys)), storage)
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, DIM, storage)
        t.insert(TAG, torch.from_numpy(keys), stored)
        chunks = list(t.iter_chunks(TAG, chunk_rows=64))
    assert [len(k) for k, _ in chunks] == [64] * (len(keys) // 64) + ([len(keys) % 64] if len(keys) % 64 else [])
    for k, rows in chunks:
        assert isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.dim() == 1
        assert isinstance(rows, torch.Tensor) and rows.dtype == st.row_dtype(storage)
        assert rows.shape == (len(k), st.stored_width(storage, DIM))
        assert rows.view(torch.uint8).numpy().flags.writeable  # the caller's own memory, not RocksDB's buffers
    got_keys = torch.cat([k for k, _ in chunks]).numpy()
    # Key-byte order: little-endian bytes compared bytewise = the same bytes read as big-endian uint64.
    order = np.argsort(keys.astype("<i8").view(">u8"), kind="stable")
    np.testing.assert_array_equal(got_keys, keys[order])
    got = np.concatenate([as_bytes(r) for _, r in chunks])
    np.testing.assert_array_equal(got, as_bytes(stored)[order])


# -------------------------------------------------------------------------------------------------- load


def make_files(tmp_path, rng, n: int = 2000, dim: int = DIM):
    keys = rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64, endpoint=True)
    keys[:4] = [INT64_MIN, INT64_MAX, 0, -1]
    keys[10:20] = keys[200:210]  # repeated keys: the later row wins, within a block ...
    keys[100:130] = keys[500:530]  # ... and across blocks (of 300 rows in the test below)
    vectors = random_rows(rng, n, dim).numpy()
    files = write_table(tmp_path / "table", keys, vectors, check_duplicates=False)
    return keys, vectors, files


def expected_stored(keys: np.ndarray, vectors: np.ndarray, storage: str) -> np.ndarray:
    """The bytes load must leave per key of `keys`: encode_rows of the file rows, the last row of a repeated key."""
    last = {int(k): i for i, k in enumerate(keys)}
    rows = vectors[[last[int(k)] for k in keys]]
    return as_bytes(st.encode_rows(torch.from_numpy(np.ascontiguousarray(rows)), storage))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("storage", STORAGES)
def test_load_encodes_the_file_rows(tmp_path, rng, monkeypatch, storage, method):
    # Small blocks and slabs: several SST files with overlapping key ranges, several encoded slabs per block.
    monkeypatch.setattr(rocksdb_module, "_LOAD_BLOCK_BYTES", 40 * 300)
    monkeypatch.setattr(rocksdb_module, "_SST_PUT_ROWS", 64)
    keys, vectors, files = make_files(tmp_path, rng)
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=256) as t:
        # Not created first: load creates it with the files' dim and the storage asked for.
        assert t.load(TAG, files, progress=False, storage=storage, method=method) == len(keys)
        assert t.storage(TAG) == storage and t.tables() == {TAG: DIM}
        assert t.size(TAG) == len(np.unique(keys))
        values, found = t.fetch(TAG, torch.from_numpy(keys))
        assert found.all() and values.dtype == st.row_dtype(storage)
        np.testing.assert_array_equal(as_bytes(values), expected_stored(keys, vectors, storage))
        # Loading again over the rows (the table exists with that storage): the same bytes.
        assert t.load(TAG, files, progress=False, storage=storage, method=method) == len(keys)
        np.testing.assert_array_equal(as_bytes(t.fetch(TAG, torch.from_numpy(keys))[0]),
                                      expected_stored(keys, vectors, storage))
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        assert t.storage(TAG) == storage
        np.testing.assert_array_equal(as_bytes(t.fetch(TAG, torch.from_numpy(keys))[0]),
                                      expected_stored(keys, vectors, storage))


@pytest.mark.parametrize("method", METHODS)
def test_load_with_another_storage_is_refused(tmp_path, rng, method):
    keys, vectors, files = make_files(tmp_path, rng, n=600)
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, DIM, "int8")
        t.insert(TAG, keys_t([5]), st.encode_rows(torch.ones(1, DIM), "int8"))
        with pytest.raises(ValueError, match=r"storage int8.*storage float16"):
            t.load(TAG, files, progress=False, storage="float16", method=method)
        with pytest.raises(ValueError, match=r"storage int8.*storage float32"):
            t.load(TAG, files, progress=False, method=method)  # the default storage is float32
        assert t.size(TAG) == 1 and not t.fetch(TAG, torch.from_numpy(keys))[1].any()
        assert t.storage(TAG) == "int8"


class _TierSource:
    """Another tier's rows as a load source (what the engine hands load() at a start): iter_chunks of tensors."""

    def __init__(self, tier: RocksDBTier, tag: str) -> None:
        self.tier, self.tag, self.path = tier, tag, f"tier {tag}"
        self.dim, self.num_keys = tier.tables()[tag], tier.size(tag)

    def iter_chunks(self, chunk_rows, progress=False, desc=None):
        yield from self.tier.iter_chunks(self.tag, min(chunk_rows, 97))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "fp8_e4m3"])
def test_load_of_another_tiers_stored_rows_copies_them(tmp_path, rng, storage, method):
    keys = np.unique(rng.integers(-(10**9), 10**9, 500, dtype=np.int64))
    stored = st.encode_rows(random_rows(rng, len(keys)), storage)
    with RocksDBTier(tmp_path / "a", num_threads=2) as a, RocksDBTier(tmp_path / "b", num_threads=2) as b:
        a.create_table(TAG, DIM, storage)
        a.insert(TAG, torch.from_numpy(keys), stored)
        assert b.load(TAG, _TierSource(a, TAG), progress=False, storage=storage, method=method) == len(keys)
        values, found = b.fetch(TAG, torch.from_numpy(keys))
        assert found.all() and b.storage(TAG) == storage
        np.testing.assert_array_equal(as_bytes(values), as_bytes(stored))  # not decoded and encoded again
        if storage != "float32":
            # Stored rows of one storage are not rows of another: refused, nothing written.
            c_tag = "hps_et.m.c"
            b.create_table(c_tag, DIM, "float16")
            with pytest.raises(TypeError, match=str(st.row_dtype(storage))):
                b.load(c_tag, _TierSource(a, TAG), progress=False, storage="float16", method=method)
            assert b.size(c_tag) == 0


def _nan_files(tmp_path, n: int, bad_row: int, value: float):
    vectors = np.linspace(-1, 1, n * DIM, dtype=np.float32).reshape(n, DIM)
    vectors[bad_row, 3] = value
    keys = np.arange(n, dtype=np.int64)[::-1].copy()  # key order differs from file order
    return keys, vectors, write_table(tmp_path / f"table_{bad_row}", keys, vectors)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "storage, value", [("int8", float("nan")), ("fp8_e4m3", float("inf")), ("float16", 1e6), ("int8", -np.inf)]
)
def test_load_of_rows_the_storage_cannot_keep(tmp_path, monkeypatch, storage, value, method):
    monkeypatch.setattr(rocksdb_module, "_SST_PUT_ROWS", 16)
    n, bad_row = 300, 201
    keys, vectors, files = _nan_files(tmp_path, n, bad_row, value)
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=50) as t:
        t.create_table(TAG, DIM, storage)
        t.insert(TAG, keys_t([10_000]), st.encode_rows(torch.ones(1, DIM), storage))
        with pytest.raises(ValueError) as info:
            t.load(TAG, files, progress=False, storage=storage, method=method)
        message = str(info.value)
        assert str(files.path) in message and storage in message
        # The message names the file row: "rows <first>.. of <path>: row <r> holds ..." with first + r = bad_row.
        found = re.search(r"rows (\d+)\.\. of .*: row (\d+) holds", message)
        assert found and int(found[1]) + int(found[2]) == bad_row, message
        assert t.loaded_from(TAG) is None
        present = t.fetch(TAG, torch.from_numpy(keys))[1].numpy()
        if method == "sst":
            assert not present.any()  # nothing ingested
            assert t.size(TAG) == 1
        else:
            # WriteBatch loads write block by block: the blocks before the bad one (file rows 0..199) stay.
            np.testing.assert_array_equal(present, np.arange(n) < 200)
            assert t.size(TAG) == 201
        assert t.fetch(TAG, keys_t([10_000]))[1].item()
