"""RedisClusterTier with compact storages (hps_core.storage) against a real local 3-node Redis Cluster.

Covers: stored rows of every storage written and fetched as the same bytes, the cluster's layout (value = the stored
row's bytes, a storage record per table), the storage record seen by a second tier and refused when another storage
is asked for (nothing written), HPS / older tables without a record read as float32, load from table files encoded
as encode_rows would, iter_chunks yielding stored rows, bad input refused before writing, and the record checked
again by writes when its node was down at create_table.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch
from redis.crc import key_slot

from hps_core import storage as st
from hps_core.tables import open_table, write_table
from hps_core.tiers.redis_cluster import RedisClusterTier, RedisClusterTierError, partition_of

try:  # tests/ as a package (with __init__.py files) ...
    from .redis_fixture import LocalRedisCluster, requires_redis
except ImportError:  # ... or pytest's default rootdir-relative imports (this directory on sys.path)
    from redis_fixture import LocalRedisCluster, requires_redis

pytestmark = [requires_redis, pytest.mark.redis]

USER, PASSWORD = "hps", "s3cret-pw-storage"
FAST = dict(timeout_ms=300, retry_backoff_ms=100, max_backoff_ms=400)
STORAGES = list(st.STORAGE_NAMES)  # float32, float16, bfloat16, int8, fp8_e4m3
DIM = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("redis_storage")) as rc:
        rc.acl_setuser(USER, PASSWORD)
        yield rc


@pytest.fixture
def fresh(cluster):
    """The shared cluster, emptied, with every node up (a test that kills a node restarts it)."""
    cluster.revive()
    cluster.flushall()
    yield cluster
    cluster.revive()


@pytest.fixture
def tiers():
    made: list[RedisClusterTier] = []
    yield made
    for t in made:
        t.close()


def make_tier(cluster, tiers, **kw) -> RedisClusterTier:
    args = dict(user_name=USER, password=PASSWORD, num_partitions=8, num_node_connections=4, **FAST)
    args.update(kw)
    tier = RedisClusterTier(cluster.addresses, **args)
    tiers.append(tier)
    return tier


def hkey(tag: str, p: int, suffix: str = "v") -> bytes:
    return f"hps_et{{{tag}/p{p}}}{suffix}".encode()


def record_key(tag: str) -> bytes:
    return hkey(tag, 0, "storage")


def node_of(cluster, key: bytes) -> int:
    return cluster.node_index_of_slot(key_slot(key))


def table_rows(seed: int, n: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys (extremes included) and float32 rows with a spread of magnitudes (a row-wise scale matters)."""
    rng = np.random.default_rng(seed)
    extremes = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1], np.int64)
    keys = np.unique(np.concatenate([extremes, rng.integers(-(2**62), 2**62, n)]))
    rng.shuffle(keys)
    rows = rng.standard_normal((keys.size, dim)).astype(np.float32) * rng.uniform(0.01, 50, (keys.size, 1))
    return torch.from_numpy(keys), torch.from_numpy(rows.astype(np.float32))


def as_bytes(stored: torch.Tensor) -> np.ndarray:
    return stored.contiguous().view(torch.uint8).numpy()


def snapshot(cluster) -> dict:
    """Everything every node holds: {(node, key): hash contents or string value}."""
    out = {}
    for i in range(cluster.num_nodes):
        with contextlib.closing(cluster.admin(i)) as c:
            for key in c.keys("*"):
                kind = c.type(key)
                out[(i, key)] = c.hgetall(key) if kind == b"hash" else c.get(key)
    return out


def expect_rows(tier, tag, keys: torch.Tensor, stored: torch.Tensor) -> None:
    """fetch(keys + absent keys + duplicates) returns exactly `stored`'s bytes for the present keys, zero bytes and
    found=False for the absent ones."""
    absent = torch.tensor([12345678901, -98765432109], dtype=torch.int64)
    assert not torch.isin(absent, keys).any()
    query = torch.cat([keys, absent, keys[:5]])
    values, found = tier.fetch(tag, query)
    assert values.dtype == stored.dtype and values.shape == (query.numel(), stored.shape[1])
    assert found.tolist() == [True] * keys.numel() + [False, False] + [True] * 5
    got = as_bytes(values)
    assert np.array_equal(got[: keys.numel()], as_bytes(stored))
    assert np.array_equal(got[-5:], as_bytes(stored[:5]))
    assert not got[keys.numel() : keys.numel() + 2].any()


# ---------------------------------------------------------------------------------------------- rows as stored


@pytest.mark.parametrize("storage", STORAGES)
def test_insert_then_fetch_gives_the_same_bytes(fresh, tiers, storage):
    tier = make_tier(fresh, tiers)
    tag = f"hps_et.rows.{storage}"
    tier.create_table(tag, DIM, storage)
    assert tier.storage(tag) == storage and tier.tables()[tag] == DIM
    keys, rows = table_rows(1, 3000)
    stored = st.encode_rows(rows, storage)
    assert stored.dtype == st.row_dtype(storage) and stored.shape == (keys.numel(), st.stored_width(storage, DIM))
    assert tier.insert(tag, keys, stored) == keys.numel()
    assert tier.size(tag) == keys.numel()
    expect_rows(tier, tag, keys, stored)

    # The value in the cluster is the stored row's raw bytes (for float32: HPS's dim raw float32 bytes).
    k = int(keys[7])
    p = int(partition_of(np.array([k], np.int64), 8)[0])
    with contextlib.closing(fresh.admin(node_of(fresh, hkey(tag, p)))) as c:
        value = c.hget(hkey(tag, p), k.to_bytes(8, "little", signed=True))
    assert value == as_bytes(stored[7]).tobytes()
    assert len(value) == st.bytes_per_row(storage, DIM)
    with contextlib.closing(fresh.admin(node_of(fresh, record_key(tag)))) as c:
        assert c.get(record_key(tag)) == storage.encode()

    # Overwrite keeps the newest stored row; an empty fetch has the stored shape.
    newer = st.encode_rows(rows[:10] * 2 + 1, storage)
    assert tier.insert(tag, keys[:10], newer) == 0
    values, found = tier.fetch(tag, keys[:10])
    assert found.all() and np.array_equal(as_bytes(values), as_bytes(newer))
    v0, f0 = tier.fetch(tag, torch.empty(0, dtype=torch.int64))
    assert v0.shape == (0, st.stored_width(storage, DIM)) and v0.dtype == st.row_dtype(storage) and f0.numel() == 0


@pytest.mark.parametrize("storage", STORAGES)
def test_a_second_tier_sees_the_storage_and_the_rows(fresh, tiers, storage):
    tag = f"hps_et.second.{storage}"
    first = make_tier(fresh, tiers)
    first.create_table(tag, DIM, storage)
    keys, rows = table_rows(2, 500)
    stored = st.encode_rows(rows, storage)
    first.insert(tag, keys, stored)
    first.close()

    second = make_tier(fresh, tiers)  # another server, or this one restarted
    second.create_table(tag, DIM, storage)
    assert second.storage(tag) == storage
    expect_rows(second, tag, keys, stored)


@pytest.mark.parametrize("storage", STORAGES)
def test_another_storage_is_refused_and_nothing_written(fresh, tiers, storage):
    tag, empty = f"hps_et.clash.{storage}", f"hps_et.clash.{storage}.empty"
    tier = make_tier(fresh, tiers)
    tier.create_table(tag, DIM, storage)
    tier.create_table(empty, DIM, storage)  # a table with no rows yet: its record alone decides
    keys, rows = table_rows(3, 200)
    tier.insert(tag, keys, st.encode_rows(rows, storage))
    other_server = make_tier(fresh, tiers)  # only has the cluster's record to go by
    before = snapshot(fresh)
    assert before[(node_of(fresh, record_key(empty)), record_key(empty))] == storage.encode()
    for other in STORAGES:
        if other == storage:
            continue
        for t, name in ((tier, tag), (other_server, tag), (other_server, empty)):
            with pytest.raises(ValueError, match=rf"{re.escape(name)}'.*storage {storage}, asked for storage {other}\b"):
                t.create_table(name, DIM, other)
    assert snapshot(fresh) == before
    assert tier.storage(tag) == storage and set(other_server.tables()) == set()


def _records_made(cluster, tag, storage) -> dict:
    """The snapshot entry of the storage record create_table writes for a table that had none."""
    return {(node_of(cluster, record_key(tag)), record_key(tag)): storage.encode()}


def test_a_dim_that_does_not_match_the_rows_is_refused(fresh, tiers):
    tag = "hps_et.dim.int8"
    tier = make_tier(fresh, tiers)
    tier.create_table(tag, 8, "int8")
    keys, rows = table_rows(4, 100)
    tier.insert(tag, keys, st.encode_rows(rows, "int8"))
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"rows of 16 bytes.*dim 12 as int8 \(20 bytes\)"):
        make_tier(fresh, tiers).create_table(tag, 12, "int8")
    with pytest.raises(ValueError, match="dim 8, got 12"):
        tier.create_table(tag, 12, "int8")
    assert snapshot(fresh) == before


# ---------------------------------------------------------------------------------------------- HPS's tables


def test_a_table_without_a_record_is_float32(fresh, tiers):
    """Rows written as HPS writes them (no storage record): float32 to every tier; asking for another storage is
    refused, naming both, with nothing written; asking for float32 reads the rows and records float32."""
    tag = "hps_et.hps.t"
    keys, rows = table_rows(5, 300)
    parts = partition_of(keys.numpy(), 8)
    for p in range(8):
        with contextlib.closing(fresh.admin(node_of(fresh, hkey(tag, p)))) as c:
            sel = np.flatnonzero(parts == p)
            c.hset(hkey(tag, p), mapping={int(keys[i]).to_bytes(8, "little", signed=True): rows[i].numpy().tobytes()
                                          for i in sel})
    before = snapshot(fresh)
    for other in STORAGES[1:]:  # no record but rows: the rows are HPS's float32 ones, whatever their size says
        with pytest.raises(ValueError, match=rf"storage float32\b.*storage {other}\b"):
            make_tier(fresh, tiers).create_table(tag, DIM, other)
    assert snapshot(fresh) == before
    tier = make_tier(fresh, tiers)
    tier.create_table(tag, DIM)
    assert tier.storage(tag) == "float32"
    expect_rows(tier, tag, keys, rows)
    assert snapshot(fresh) == before | _records_made(fresh, tag, "float32")


# ---------------------------------------------------------------------------------------------- load / iter_chunks


@pytest.mark.parametrize("storage", STORAGES)
def test_load_encodes_table_files_as_encode_rows(fresh, tiers, tmp_path, storage):
    keys, rows = table_rows(6, 5000)
    write_table(tmp_path / "t", keys.numpy(), rows.numpy())
    tier = make_tier(fresh, tiers)
    tag = f"hps_et.load.{storage}"
    # load creates the table with the storage (no create_table first); small blocks: several encode calls.
    files = open_table(tmp_path / "t", DIM)
    assert tier.load(tag, files, progress=False, storage=storage) == keys.numel()
    assert tier.storage(tag) == storage and tier.size(tag) == keys.numel()
    expect_rows(tier, tag, keys, st.encode_rows(rows, storage))
    # Loading again into the existing table works; with another storage it is refused.
    assert tier.load(tag, files, progress=False, storage=storage) == keys.numel()
    if storage != "float32":
        with pytest.raises(ValueError, match=rf"storage {storage}\b.*storage float32\b"):
            tier.load(tag, files, progress=False)


@pytest.mark.parametrize("storage", STORAGES)
def test_iter_chunks_yields_stored_rows_that_load_copies(fresh, tiers, storage):
    tier = make_tier(fresh, tiers)
    tag = f"hps_et.iter.{storage}"
    tier.create_table(tag, DIM, storage)
    keys, rows = table_rows(7, 2000)
    stored = st.encode_rows(rows, storage)
    tier.insert(tag, keys, stored)

    blocks = list(tier.iter_chunks(tag, chunk_rows=100))
    assert len(blocks) > 8  # several partitions, several blocks each
    for k, v in blocks:
        assert isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.dim() == 1 and k.device.type == "cpu"
        assert isinstance(v, torch.Tensor) and v.dtype == st.row_dtype(storage)
        assert v.shape == (k.numel(), st.stored_width(storage, DIM)) and 0 < k.numel() <= 100
    got_keys = torch.cat([k for k, _ in blocks])
    got_rows = torch.cat([v for _, v in blocks])
    order, expected_order = torch.argsort(got_keys), torch.argsort(keys)
    assert torch.equal(got_keys[order], keys[expected_order])
    assert np.array_equal(as_bytes(got_rows[order]), as_bytes(stored[expected_order]))

    # Another tier's blocks are stored rows already: load copies them as they are (no decode / re-encode).
    class Source:  # what load reads of a TableFiles: dim, num_keys, iter_chunks
        dim, num_keys, path = DIM, keys.numel(), "iter_chunks"

        @staticmethod
        def iter_chunks(chunk_rows, progress=False, desc=None):
            return tier.iter_chunks(tag, chunk_rows)

    copy = f"{tag}.copy"
    assert tier.load(copy, Source(), progress=False, storage=storage) == keys.numel()
    expect_rows(tier, copy, keys, stored)


# ---------------------------------------------------------------------------------------------- bad input


def test_rows_that_are_not_the_tables_stored_rows_are_refused(fresh, tiers):
    tier = make_tier(fresh, tiers)
    tag = "hps_et.bad.int8"
    tier.create_table(tag, DIM, "int8")
    keys, rows = table_rows(8, 50)
    with pytest.raises(TypeError, match=r"torch\.int8.*torch\.float32"):  # float32 rows: encode them first
        tier.insert(tag, keys, rows)
    with pytest.raises(TypeError, match=r"torch\.int8.*torch\.float8_e4m3fn"):  # another storage's rows
        tier.insert(tag, keys, st.encode_rows(rows, "fp8_e4m3"))
    with pytest.raises(ValueError, match=r"shape"):
        tier.insert(tag, keys, st.encode_rows(rows, "int8")[:, :DIM])  # the codes without the scale
    with pytest.raises(ValueError, match=r"one row per key"):
        tier.insert(tag, keys[:-1], st.encode_rows(rows, "int8"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tier.insert(tag, keys, st.encode_rows(rows, "int8").numpy())
    assert tier.size(tag) == 0


@pytest.mark.parametrize("storage, bad, match", [
    ("int8", float("nan"), "int8 storage keeps finite rows only"),
    ("fp8_e4m3", float("inf"), "fp8_e4m3 storage keeps finite rows only"),
    ("float16", 1e6, "beyond float16's range"),
])
def test_load_of_rows_the_storage_cannot_keep_raises(fresh, tiers, tmp_path, storage, bad, match):
    keys, rows = table_rows(9, 400)
    rows[3, 5] = bad
    write_table(tmp_path / "t", keys.numpy(), rows.numpy())
    tier = make_tier(fresh, tiers)
    tag = f"hps_et.nan.{storage}"
    with pytest.raises(ValueError, match=rf"rows 0\.\. of .*t: row 3 .*{match}"):
        tier.load(tag, open_table(tmp_path / "t", DIM), progress=False, storage=storage)
    assert tier.size(tag) == 0  # the first block was refused before anything was written
    assert tier.loaded_from(tag) is None


# ---------------------------------------------------------------------------------------------- degraded start


def test_record_checked_again_by_writes_when_its_node_was_down(fresh, tiers):
    """A tier starting while the record's node is down takes its storage as asked; its first write asks the cluster
    again, and refuses (writing nothing) when the record names another storage."""
    tag = "hps_et.degraded.s"
    first = make_tier(fresh, tiers)
    first.create_table(tag, DIM, "int8")
    keys, rows = table_rows(10, 1000)
    first.insert(tag, keys, st.encode_rows(rows, "int8"))
    first.close()
    victim = node_of(fresh, record_key(tag))
    fresh.save(victim)
    fresh.kill(victim)

    late = make_tier(fresh, tiers)
    # float16 rows of dim 8 are 16 bytes, as int8's are: only the record tells them apart, and it is unreachable.
    late.create_table(tag, DIM, "float16")
    assert late.storage(tag) == "float16"
    fresh.restart(victim)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"storage int8\b.*storage float16\b"):
        late.insert(tag, keys[:10], st.encode_rows(rows[:10], "float16"))
    assert snapshot(fresh) == before

    # A tier asking for the recorded storage, started while the node is down, writes nothing until it is back.
    ok = make_tier(fresh, tiers)
    fresh.kill(victim)
    ok.create_table(tag, DIM, "int8")
    with pytest.raises(RedisClusterTierError, match=r"storage record .* could not be checked.*nothing was written"):
        ok.insert(tag, keys, st.encode_rows(rows * 3, "int8"))
    fresh.restart(victim)
    expect_rows(ok, tag, keys, st.encode_rows(rows, "int8"))  # the rows the first tier wrote, untouched
    newer = st.encode_rows(rows * 3, "int8")
    ok.insert(tag, keys, newer)
    expect_rows(ok, tag, keys, newer)
