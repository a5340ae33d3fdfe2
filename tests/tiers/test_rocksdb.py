"""RocksDBTier against real RocksDB directories in tmp_path: a dict model, persistence, read-only, bulk load, errors."""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import rocksdict
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hps_core.tables import write_table
from hps_core.tiers import rocksdb as rocksdb_module
from hps_core.tiers.rocksdb import RocksDBTier

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EDGE_KEYS = [INT64_MIN, INT64_MAX, 0, -1, 1, 255, 256, -256]
TAG = "hps_et.m.t0"


def keys_t(keys) -> torch.Tensor:
    return torch.tensor(list(keys), dtype=torch.int64)


class DictModel:
    """The tier's contract in plain Python: key -> row, last write wins, missing rows are zeros."""

    def __init__(self, dim: int) -> None:
        self.dim, self.rows = dim, {}

    def insert(self, keys, values) -> int:
        new = len({k for k in keys if k not in self.rows})
        for k, row in zip(keys, values):
            self.rows[k] = np.array(row, np.float32)
        return new

    def erase(self, keys) -> int:
        present = {k for k in keys if k in self.rows}
        for k in present:
            del self.rows[k]
        return len(present)

    def fetch(self, keys):
        values = np.zeros((len(keys), self.dim), np.float32)
        found = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            if k in self.rows:
                values[i], found[i] = self.rows[k], True
        return values, found


def assert_matches(tier: RocksDBTier, model: DictModel, tag: str, keys) -> None:
    values, found = tier.fetch(tag, keys_t(keys))
    exp_values, exp_found = model.fetch(list(keys))
    assert values.dtype == torch.float32 and found.dtype == torch.bool
    assert values.shape == (len(keys), model.dim) and found.shape == (len(keys),)
    np.testing.assert_array_equal(found.numpy(), exp_found)
    np.testing.assert_array_equal(values.numpy(), exp_values)
    assert tier.size(tag) == len(model.rows)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tier(tmp_path):
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=7) as t:
        t.create_table(TAG, 4)
        yield t


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("sort_fetch_keys", [True, False])
def test_round_trip_against_dict(tmp_path, rng, sort_fetch_keys):
    dim = 5
    model = DictModel(dim)
    universe = np.concatenate([EDGE_KEYS, rng.integers(INT64_MIN, INT64_MAX, 60, dtype=np.int64, endpoint=True)])
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=16, sort_fetch_keys=sort_fetch_keys) as t:
        t.create_table(TAG, dim)
        for step in range(30):
            op = step % 3
            keys = rng.choice(universe, size=int(rng.integers(0, 40))).tolist()  # with duplicates
            if op == 0:
                values = rng.standard_normal((len(keys), dim)).astype(np.float32)
                assert t.insert(TAG, keys_t(keys), torch.from_numpy(values)) == model.insert(keys, values)
            elif op == 1:
                assert t.erase(TAG, keys_t(keys)) == model.erase(keys)
            assert_matches(t, model, TAG, universe.tolist())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["insert", "erase"]),
            st.lists(st.sampled_from(EDGE_KEYS + [7, 8, 9]), max_size=12),
            st.integers(0, 2**31 - 1),
        ),
        max_size=10,
    ),
    batch=st.integers(1, 5),
)
def test_random_operation_sequences(ops, batch):
    dim = 3
    model = DictModel(dim)
    with tempfile.TemporaryDirectory() as d, RocksDBTier(d + "/db", num_threads=2, max_batch_size=batch) as t:
        t.create_table(TAG, dim)
        for op, keys, seed in ops:
            if op == "insert":
                values = np.random.default_rng(seed).standard_normal((len(keys), dim)).astype(np.float32)
                assert t.insert(TAG, keys_t(keys), torch.from_numpy(values)) == model.insert(keys, values)
            else:
                assert t.erase(TAG, keys_t(keys)) == model.erase(keys)
        assert_matches(t, model, TAG, EDGE_KEYS + [7, 8, 9, 10])


def test_overwrite_duplicates_and_missing(tier):
    keys = [3, 3, INT64_MIN, 3]
    values = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    assert tier.insert(TAG, keys_t(keys), values) == 2  # 3 and INT64_MIN, each once
    got, found = tier.fetch(TAG, keys_t([3, INT64_MIN, 4]))
    assert found.tolist() == [True, True, False]
    assert got[0].tolist() == values[3].tolist()  # last row of a repeated key wins
    assert got[1].tolist() == values[2].tolist()
    assert got[2].tolist() == [0.0] * 4
    assert tier.insert(TAG, keys_t([3]), torch.full((1, 4), -2.0)) == 0  # overwrite: not new
    assert tier.fetch(TAG, keys_t([3]))[0].tolist() == [[-2.0] * 4]
    assert tier.size(TAG) == 2


def test_empty_calls(tier):
    values, found = tier.fetch(TAG, torch.empty(0, dtype=torch.int64))
    assert values.shape == (0, 4) and found.shape == (0,)
    assert tier.insert(TAG, torch.empty(0, dtype=torch.int64), torch.empty(0, 4)) == 0
    assert tier.erase(TAG, torch.empty(0, dtype=torch.int64)) == 0
    assert tier.size(TAG) == 0


def test_all_miss_and_all_hit_large_batch(tmp_path, rng):
    # More keys than max_batch_size, so several MultiGets and WriteBatches.
    keys = rng.permutation(np.arange(-500, 500, dtype=np.int64))
    values = rng.standard_normal((len(keys), 2)).astype(np.float32)
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=64) as t:
        t.create_table(TAG, 2)
        assert not t.fetch(TAG, torch.from_numpy(keys))[1].any()
        assert t.insert(TAG, torch.from_numpy(keys), torch.from_numpy(values)) == len(keys)
        got, found = t.fetch(TAG, torch.from_numpy(keys[::-1].copy()))
        assert found.all()
        np.testing.assert_array_equal(got.numpy(), values[::-1])


def test_stats(tier):
    tier.insert(TAG, keys_t([1, 2]), torch.ones(2, 4))
    tier.fetch(TAG, keys_t([1, 2, 3]))
    tier.erase(TAG, keys_t([2, 5]))
    s = tier.stats()[TAG]
    assert (s.fetches, s.keys_requested, s.keys_found, s.keys_inserted, s.keys_evicted, s.errors) == (1, 3, 2, 2, 1, 0)


# ------------------------------------------------------------------------------------------ tables and layout


def test_two_tables_are_isolated(tmp_path):
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table("hps_et.a.t", 2)
        t.create_table("hps_et.b.t", 8)
        t.insert("hps_et.a.t", keys_t([1, 2]), torch.ones(2, 2))
        t.insert("hps_et.b.t", keys_t([2, 3]), torch.full((2, 8), 3.0))
        va, fa = t.fetch("hps_et.a.t", keys_t([1, 2, 3]))
        vb, fb = t.fetch("hps_et.b.t", keys_t([1, 2, 3]))
        assert fa.tolist() == [True, True, False] and va.shape == (3, 2)
        assert fb.tolist() == [False, True, True] and vb.shape == (3, 8)
        assert vb[1].tolist() == [3.0] * 8
        t.erase("hps_et.a.t", keys_t([2]))
        assert t.size("hps_et.a.t") == 1 and t.size("hps_et.b.t") == 2
        assert t.fetch("hps_et.b.t", keys_t([2]))[1].item()
        assert t.tables() == {"hps_et.a.t": 2, "hps_et.b.t": 8}


def test_create_table_dim_mismatch(tier):
    tier.create_table(TAG, 4)  # idempotent
    with pytest.raises(ValueError, match=r"dim 4.*dim 6"):
        tier.create_table(TAG, 6)
    with pytest.raises(ValueError, match="dim"):
        tier.create_table("hps_et.m.x", 0)
    with pytest.raises(ValueError, match="tag"):
        tier.create_table("default", 4)


def test_raw_hps_layout(tmp_path):
    """Keys are 8 little-endian bytes, values raw little-endian float32, one column family per tag."""
    path = tmp_path / "db"
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, 3)
        t.insert(TAG, keys_t([-2, 5]), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert TAG in rocksdict.Rdict.list_cf(str(path))
    db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
    cf = db.get_column_family(TAG)
    assert cf[struct.pack("<q", -2)] == struct.pack("<3f", 1.0, 2.0, 3.0)
    assert cf[struct.pack("<q", 5)] == struct.pack("<3f", 4.0, 5.0, 6.0)
    assert len(list(cf.keys())) == 2
    cf.close()
    db.close()


def test_opens_column_families_written_without_metadata(tmp_path):
    """A directory written by HPS (raw families, no dim/count entries): dim from the value length, exact size."""
    path = tmp_path / "db"
    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path), opts)
    cf = db.create_column_family("hps_et.hps.t", opts)
    for k in (-1, 0, 10):
        cf[struct.pack("<q", k)] = np.full(6, k, np.float32).tobytes()
    cf.close()
    db.close()
    with RocksDBTier(path, num_threads=2) as t:
        assert t.tables() == {"hps_et.hps.t": 6}
        assert t.size("hps_et.hps.t") == 3
        values, found = t.fetch("hps_et.hps.t", keys_t([10, 11]))
        assert found.tolist() == [True, False] and values[0].tolist() == [10.0] * 6
        assert t.insert("hps_et.hps.t", keys_t([11]), torch.ones(1, 6)) == 1
    with RocksDBTier(path, num_threads=2) as t:  # the count was stored this time
        assert t.size("hps_et.hps.t") == 4


# -------------------------------------------------------------------------------------- reopen and read-only


def test_reopen_sees_data_dims_and_sizes(tmp_path, rng):
    path = tmp_path / "db"
    keys = rng.integers(INT64_MIN, INT64_MAX, 300, dtype=np.int64, endpoint=True)
    values = rng.standard_normal((300, 16)).astype(np.float32)
    for wal in (True, False):
        sub = path / str(wal)
        with RocksDBTier(sub, num_threads=2, wal=wal) as t:
            t.create_table(TAG, 16)
            t.create_table("hps_et.m.small", 1)
            t.insert(TAG, torch.from_numpy(keys), torch.from_numpy(values))
            t.erase(TAG, torch.from_numpy(keys[:10]))
        with RocksDBTier(sub, num_threads=2) as t:
            assert t.tables() == {TAG: 16, "hps_et.m.small": 1}
            assert t.size(TAG) == len(np.unique(keys[10:])) and t.size("hps_et.m.small") == 0
            got, found = t.fetch(TAG, torch.from_numpy(keys))
            assert not found[:10].any() and found[10:].all()
            np.testing.assert_array_equal(got.numpy()[10:], values[10:])
            with pytest.raises(ValueError, match="dim 16"):
                t.create_table(TAG, 8)


def test_read_only_beside_a_writer(tmp_path):
    path = tmp_path / "db"
    writer = RocksDBTier(path, num_threads=2)
    writer.create_table(TAG, 4)
    writer.insert(TAG, keys_t([1, 2]), torch.ones(2, 4))
    with RocksDBTier(path, read_only=True) as reader:  # the writer still holds the directory (and its WAL)
        assert reader.read_only and reader.tables() == {TAG: 4}
        values, found = reader.fetch(TAG, keys_t([1, 3]))
        assert found.tolist() == [True, False] and values[0].tolist() == [1.0] * 4
        assert reader.size(TAG) == 2
        for call in (
            lambda: reader.insert(TAG, keys_t([5]), torch.ones(1, 4)),
            lambda: reader.erase(TAG, keys_t([1])),
        ):
            with pytest.raises(PermissionError, match=rf"read-only.*{TAG}") as info:
                call()
            assert str(path) in str(info.value)
        # A tag the read-only DB lacks is declared empty, not refused (an engine can start over it).
        reader.create_table("hps_et.m.other", 2)
        assert not reader.fetch("hps_et.m.other", keys_t([1]))[1].any()
        assert reader.size("hps_et.m.other") == 0
    # The writer kept working and saw no write from the reader.
    assert writer.fetch(TAG, keys_t([5]))[1].tolist() == [False]
    assert writer.size(TAG) == 2
    writer.close()


_WRITER_PROCESS = """
import struct, sys, rocksdict
db = rocksdict.Rdict(sys.argv[1], rocksdict.Options(raw_mode=True))
cf = db.get_column_family(sys.argv[2])
cf[struct.pack("<q", 77)] = struct.pack("<2f", 7.0, 7.0)   # in the WAL/memtable, not flushed
print("ready", flush=True)
sys.stdin.readline()
"""


def test_read_only_while_another_process_writes(tmp_path):
    path = tmp_path / "db"
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, 2)
        t.insert(TAG, keys_t([1]), torch.ones(1, 2))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER_PROCESS, str(path), TAG], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        with RocksDBTier(path, read_only=True) as reader:
            values, found = reader.fetch(TAG, keys_t([1, 2]))
            assert found.tolist() == [True, False] and values[0].tolist() == [1.0, 1.0]
            with pytest.raises(PermissionError, match="read-only"):
                reader.insert(TAG, keys_t([3]), torch.ones(1, 2))
        with pytest.raises(RuntimeError, match="could not open"):  # the writer holds the lock
            RocksDBTier(path, num_threads=2)
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
    assert writer.returncode == 0


def test_read_only_of_missing_db(tmp_path):
    with pytest.raises(FileNotFoundError, match="no RocksDB database"):
        RocksDBTier(tmp_path / "nothing", read_only=True)
    assert not (tmp_path / "nothing").exists()


# ----------------------------------------------------------------------------------------------- bulk load


def _reference_rows(keys: np.ndarray, vectors: np.ndarray) -> dict[int, np.ndarray]:
    return {int(k): v for k, v in zip(keys, vectors)}  # later rows win


@pytest.mark.parametrize("method", ["sst", "write_batch"])
def test_load_table_files(tmp_path, rng, method):
    keys = rng.integers(INT64_MIN, INT64_MAX, 3000, dtype=np.int64, endpoint=True)
    keys[:8] = EDGE_KEYS
    keys[100:110] = keys[200:210]  # repeated keys: the later row wins
    vectors = rng.standard_normal((len(keys), 12)).astype(np.float32)
    files = write_table(tmp_path / "table", keys, vectors, check_duplicates=False)
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=500) as t:
        t.create_table(TAG, 12)
        assert t.load(TAG, files, progress=False, method=method) == len(keys)
        assert t.size(TAG) == len(np.unique(keys))
        ref = _reference_rows(keys, vectors)
        got, found = t.fetch(TAG, torch.from_numpy(keys))
        assert found.all()
        np.testing.assert_array_equal(got.numpy(), np.stack([ref[int(k)] for k in keys]))
        # Loading over existing rows: overwrite, size recounted exactly.
        t.insert(TAG, keys_t([7, 8]), torch.zeros(2, 12))
        t.erase(TAG, torch.from_numpy(keys[:3]))
        t.load(TAG, files, progress=False, method=method)
        extra = len({7, 8} - set(keys.tolist()))
        assert t.size(TAG) == len(np.unique(keys)) + extra
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        assert t.size(TAG) == len(np.unique(keys)) + extra


def test_sst_and_write_batch_loads_agree(tmp_path, rng, monkeypatch):
    # Small SST blocks: several files whose key ranges overlap, with repeats across blocks.
    monkeypatch.setattr(rocksdb_module, "_LOAD_BLOCK_BYTES", 40 * 200)
    base = rng.integers(INT64_MIN, INT64_MAX, 1500, dtype=np.int64, endpoint=True)
    keys = np.concatenate([base, base[::7]])  # each repeat lies in a later block
    vectors = rng.standard_normal((len(keys), 8)).astype(np.float32)
    files = write_table(tmp_path / "table", keys, vectors, check_duplicates=False)
    results = {}
    for method in ("sst", "write_batch"):
        with RocksDBTier(tmp_path / method, num_threads=2, max_batch_size=300) as t:
            t.create_table(TAG, 8)
            t.load(TAG, files, progress=False, method=method)
            probe = np.concatenate([keys, rng.integers(INT64_MIN, INT64_MAX, 50, dtype=np.int64)])
            values, found = t.fetch(TAG, torch.from_numpy(probe))
            results[method] = (values.numpy(), found.numpy(), t.size(TAG))
    np.testing.assert_array_equal(results["sst"][0], results["write_batch"][0])
    np.testing.assert_array_equal(results["sst"][1], results["write_batch"][1])
    assert results["sst"][2] == results["write_batch"][2] == len(np.unique(keys))
    ref = _reference_rows(keys, vectors)
    np.testing.assert_array_equal(results["sst"][0][: len(keys)], np.stack([ref[int(k)] for k in keys]))


def test_load_dim_mismatch_writes_nothing(tmp_path, rng):
    files = write_table(tmp_path / "table", np.arange(10), np.ones((10, 3), np.float32))
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, 4)
        with pytest.raises(ValueError, match=r"dim 3.*dim 4"):
            t.load(TAG, files, progress=False)
        with pytest.raises(ValueError, match="method"):
            t.load(TAG, files, progress=False, method="bulk")
        assert t.size(TAG) == 0
        # An unknown tag is created with the files' dim and the storage asked for (the Tier contract).
        assert t.load("hps_et.m.new", files, progress=False) == 10
        assert t.tables()["hps_et.m.new"] == 3 and t.storage("hps_et.m.new") == "float32"


class _BadSecondBlock:
    """Table-files stand-in whose second block has float64 vectors (a corrupt source)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.num_keys, self.path = dim, 20, "bad"

    def iter_chunks(self, chunk_rows, progress=False, desc=None):
        yield np.arange(10, dtype=np.int64), np.ones((10, self.dim), np.float32)
        yield np.arange(10, 20, dtype=np.int64), np.ones((10, self.dim), np.float64)


class _NoRows:
    """Table-files stand-in with no rows (HPS files cannot be empty, but load() must not trip over it)."""

    dim, num_keys, path = 2, 0, "empty"

    def iter_chunks(self, chunk_rows, progress=False, desc=None):
        return iter(())


@pytest.mark.parametrize("method", ["sst", "write_batch"])
def test_load_of_nothing(tmp_path, method):
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, 2)
        assert t.load(TAG, _NoRows(), progress=False, method=method) == 0
        assert t.size(TAG) == 0


def test_sst_load_failing_midway_writes_nothing(tmp_path):
    with RocksDBTier(tmp_path / "db", num_threads=2) as t:
        t.create_table(TAG, 2)
        t.insert(TAG, keys_t([100]), torch.ones(1, 2))
        with pytest.raises(TypeError, match="float64"):
            t.load(TAG, _BadSecondBlock(2), progress=False, method="sst")
        assert t.size(TAG) == 1
        assert not t.fetch(TAG, keys_t(range(10)))[1].any()


# --------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "keys, values, error, match",
    [
        (torch.tensor([1, 2], dtype=torch.int32), torch.ones(2, 4), TypeError, "int64"),
        (torch.tensor([[1, 2]]), torch.ones(2, 4), ValueError, "1-D"),
        (np.array([1, 2]), torch.ones(2, 4), TypeError, "torch.Tensor"),
        (torch.tensor([1, 2]), torch.ones(2, 4, dtype=torch.float64), TypeError, "float32"),
        (torch.tensor([1, 2]), torch.ones(2, 5), ValueError, r"dim=4"),
        (torch.tensor([1, 2]), torch.ones(3, 4), ValueError, "3"),
        (torch.tensor([1, 2]), torch.ones(8), ValueError, "shape"),
    ],
)
def test_bad_insert_raises_and_writes_nothing(tier, keys, values, error, match):
    tier.insert(TAG, keys_t([9]), torch.full((1, 4), 9.0))
    with pytest.raises(error, match=match):
        tier.insert(TAG, keys, values)
    assert tier.size(TAG) == 1
    assert tier.fetch(TAG, keys_t([1, 2]))[1].tolist() == [False, False]
    assert tier.fetch(TAG, keys_t([9]))[0].tolist() == [[9.0] * 4]


def test_unknown_tag_lists_known_tags(tier):
    with pytest.raises(KeyError, match=rf"hps_et.m.nope.*{TAG}"):
        tier.fetch("hps_et.m.nope", keys_t([1]))
    with pytest.raises(KeyError, match=TAG):
        tier.insert("hps_et.m.nope", keys_t([1]), torch.ones(1, 4))
    with pytest.raises(KeyError):
        tier.erase("hps_et.m.nope", keys_t([1]))
    with pytest.raises(KeyError):
        tier.size("hps_et.m.nope")


def test_bad_fetch_and_erase_keys(tier):
    tier.insert(TAG, keys_t([1]), torch.ones(1, 4))
    for bad, error in ((torch.tensor([1.0]), TypeError), (torch.tensor([[1]]), ValueError), ([1], TypeError)):
        with pytest.raises(error, match="keys"):
            tier.fetch(TAG, bad)
        with pytest.raises(error, match="keys"):
            tier.erase(TAG, bad)
    assert tier.size(TAG) == 1


@pytest.mark.parametrize(
    "kwargs, error",
    [({"num_threads": 0}, ValueError), ({"max_batch_size": -1}, ValueError), ({"read_only": "no"}, TypeError),
     ({"max_batch_size": 1.5}, TypeError)],
)
def test_bad_constructor_arguments(tmp_path, kwargs, error):
    with pytest.raises(error):
        RocksDBTier(tmp_path / "db", **kwargs)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a database")
    with pytest.raises(ValueError, match=r"not a directory"):
        RocksDBTier(f)
    assert f.read_text() == "not a database"
    with pytest.raises(ValueError, match="cannot create"):
        RocksDBTier(f / "db")  # a path below a regular file cannot be created


def test_path_is_some_other_directory(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="not a RocksDB database"):
        RocksDBTier(d)
    assert sorted(p.name for p in d.iterdir()) == ["a.jpg"]


def test_non_raw_rocksdict_database_is_refused(tmp_path):
    path = tmp_path / "pickled"
    db = rocksdict.Rdict(str(path))  # rocksdict's default (pickling) mode
    db[1] = "one"
    db.close()
    with pytest.raises(ValueError, match="non-raw"):
        RocksDBTier(path)


def test_second_writer_is_refused_with_the_reason(tmp_path):
    with RocksDBTier(tmp_path / "db", num_threads=2):
        with pytest.raises(RuntimeError, match="could not open"):
            RocksDBTier(tmp_path / "db", num_threads=2)


# -------------------------------------------------------------------------------------- lifecycle, threads


def test_close_is_idempotent_and_final(tmp_path):
    t = RocksDBTier(tmp_path / "db", num_threads=2)
    t.create_table(TAG, 2)
    t.close()
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.fetch(TAG, keys_t([1]))
    with RocksDBTier(tmp_path / "db", num_threads=2) as again:  # the directory was released
        assert again.tables() == {TAG: 2}


def test_concurrent_fetches_during_inserts(tmp_path, rng):
    stable = np.arange(0, 2000, dtype=np.int64)
    stable_rows = rng.standard_normal((len(stable), 4)).astype(np.float32)
    errors = []
    with RocksDBTier(tmp_path / "db", num_threads=2, max_batch_size=256) as t:
        t.create_table(TAG, 4)
        t.insert(TAG, torch.from_numpy(stable), torch.from_numpy(stable_rows))

        def reader(seed):
            r = np.random.default_rng(seed)
            try:
                for _ in range(20):
                    idx = r.integers(0, len(stable), 500)
                    values, found = t.fetch(TAG, torch.from_numpy(stable[idx]))
                    assert found.all()
                    np.testing.assert_array_equal(values.numpy(), stable_rows[idx])
            except Exception as exc:  # reported to the main thread
                errors.append(exc)

        def writer(base):
            try:
                for i in range(10):
                    fresh = np.arange(base + 100 * i, base + 100 * (i + 1), dtype=np.int64)
                    assert t.insert(TAG, torch.from_numpy(fresh), torch.ones(100, 4)) == 100
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [
            threading.Thread(target=writer, args=(base,)) for base in (10_000, 20_000)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert t.size(TAG) == len(stable) + 2000  # two writers, 1000 distinct fresh keys each


def test_stored_zero_rows_are_found(tier):
    tier.insert(TAG, keys_t([4, 5]), torch.tensor([[0.0] * 4, [-0.0] * 4]))
    values, found = tier.fetch(TAG, keys_t([4, 6, 5]))
    assert found.tolist() == [True, False, True]
    assert values.abs().sum().item() == 0.0
    assert torch.signbit(values[2]).all()  # -0.0 came back bit for bit


def test_value_of_wrong_length_is_a_counted_miss(tmp_path):
    path = tmp_path / "db"
    with RocksDBTier(path, num_threads=2) as t:
        t.create_table(TAG, 2)
        t.insert(TAG, keys_t([1, 2]), torch.ones(2, 2))
    db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
    cf = db.get_column_family(TAG)
    cf[struct.pack("<q", 2)] = b"\x00" * 12  # 3 floats in a dim-2 table: corrupt
    cf.close()
    db.close()
    with RocksDBTier(path, num_threads=2) as t:
        values, found = t.fetch(TAG, keys_t([1, 2, 3]))
        assert found.tolist() == [True, False, False]
        assert values.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
        assert t.stats()[TAG].errors == 1 and t.stats()[TAG].keys_found == 1
