"""Compact storage in every tier (issue 16 item 1): a table's storage applies to the host-memory tier and, as stored
bytes, to RocksDB (and Redis) - not only to the device tables. Rows are encoded once (load, update) and move as the
same bytes between tiers and tables: every tier holds encode(row) exactly, a row fetched from any tier and served from
any table decodes to the same values, and nothing drifts through evictions, promotions, refreshes or restarts
(re-encoding a decoded int8 / fp8 row would not give its bytes back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.storage import STORAGE_NAMES, bytes_per_row, encode_rows
from hps_core.testing import device_params

from engine_refs import make_table, stored

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
pytest.importorskip("rocksdict", reason="rocksdict is not installed")

COMPACT = [s for s in STORAGE_NAMES if s != "float32"]
TAG = "hps_et.m.t"
DEFAULT = 0.25
# Tier layouts: which tiers hold the table, and whether lookups ever reach them (a 5% cache misses often).
TIERS = {
    "host_memory": {"host_memory": {"enabled": True, "num_partitions": 2}, "rocksdb": {"enabled": False}},
    "rocksdb": {"host_memory": {"enabled": False}, "rocksdb": {"enabled": True}},
    # A host map too small for the table, filled from RocksDB as lookups miss: promotions move stored bytes.
    "host_over_rocksdb": {"host_memory": {"enabled": True, "num_partitions": 1, "overflow_margin": 400,
                                          "cache_missed_embeddings": True},
                          "rocksdb": {"enabled": True}},
}


def as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def config(tmp_path, tiers, storage, cache=None, dim=16):
    t = dict(TIERS[tiers])
    if t["rocksdb"]["enabled"]:
        t["rocksdb"] = {**t["rocksdb"], "path": str(tmp_path / "rocksdb")}
    table = {"name": "t", "path": str(tmp_path / "t"), "dim": dim, "max_keys_per_sample": 4096,
             "default_value": DEFAULT}
    return {"key_dtype": "int64",
            "models": {"m": {"tables": [table], "max_batch_size": 1, "deployed_device_list": [0],
                             "cache": {"ratio": 0.05, "hit_rate_threshold": 1.1, "storage": storage,
                                       **(cache or {})}}},
            "tiers": t}


def assert_tiers_hold(hps, keys: np.ndarray, rows: np.ndarray, storage: str) -> None:
    """Every tier that holds a key holds encode(row) exactly - the bytes, not just close values."""
    want = as_bytes(encode_rows(torch.from_numpy(np.ascontiguousarray(rows)), storage))
    for tier in hps.tiers:
        assert tier.storage(TAG) == storage, tier.name
        got, found = tier.fetch(TAG, torch.from_numpy(keys))
        assert found.any(), f"{tier.name} holds none of the keys"
        np.testing.assert_array_equal(as_bytes(got)[found.numpy()], want[found.numpy()], err_msg=tier.name)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("storage", COMPACT)
def test_every_tier_keeps_the_stored_bytes_and_nothing_drifts(tmp_path, rng, tiers, storage, device):
    """On a GPU the cache's misses take the same bytes from the tiers (pinned plan buffers, then the device)."""
    keys, rows = make_table(tmp_path / "t", 3000, 16, rng)
    by_key = dict(zip(keys.tolist(), range(len(keys))))
    current = rows.copy()
    with HierarchicalParameterServer(config(tmp_path, tiers, storage), progress=False) as hps:
        assert_tiers_hold(hps, keys, rows, storage)
        # Lookups through a 5% cache: hits, misses from the tiers (promotions into the small host map), defaults.
        absent = np.arange(1 << 50, (1 << 50) + 40, dtype=np.int64)
        for _ in range(4):
            q = np.concatenate([rng.choice(keys, 1000), absent])
            got = hps.lookup("m", "t", torch.from_numpy(q).to(device)).cpu().numpy()
            want = stored(current[[by_key[k] for k in q[:-40].tolist()]], storage)
            np.testing.assert_array_equal(got[:-40], want)
            np.testing.assert_array_equal(got[-40:], stored(np.full((40, 16), DEFAULT, np.float32), storage))
        assert_tiers_hold(hps, keys, current, storage)  # promoted rows are the loaded bytes

        # update(): encoded once; every tier holds those bytes, and the row survives eviction and refetch unchanged.
        upd = rng.choice(keys, 200, replace=False)
        new_rows = rng.standard_normal((200, 16)).astype(np.float32) * 4
        hps.update("m", "t", torch.from_numpy(upd), torch.from_numpy(new_rows))
        current[[by_key[k] for k in upd.tolist()]] = new_rows
        assert_tiers_hold(hps, upd, new_rows, storage)
        first = hps.lookup("m", "t", torch.from_numpy(upd).to(device)).cpu().numpy()
        np.testing.assert_array_equal(first, stored(new_rows, storage))
        for _ in range(3):  # churn the cache: the updated keys are evicted and fetched again from the tiers
            hps.lookup("m", "t", torch.from_numpy(rng.choice(keys, 2000)).to(device))
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(upd).to(device)).cpu().numpy(), first)

        # refresh(): the cached keys re-read from the tiers as bytes - the same values again, not a re-encoding.
        before = hps.lookup("m", "t", torch.from_numpy(keys).to(device)).cpu().numpy()
        assert hps.refresh() > 0
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(keys).to(device)).cpu().numpy(), before)
        np.testing.assert_array_equal(before, stored(current, storage))
        assert_tiers_hold(hps, keys, current, storage)


@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_table_without_a_cache_decodes_the_tiers_rows(tmp_path, rng, storage, dtype):
    keys, rows = make_table(tmp_path / "t", 800, 16, rng)
    cfg = config(tmp_path, "host_over_rocksdb", storage, cache={"enabled": False})
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        q = np.concatenate([keys[::3], np.array([1 << 55], dtype=np.int64)])
        want = np.concatenate([stored(rows[::3], storage), stored(np.full((1, 16), DEFAULT, np.float32),
                                                                      storage)])
        want_t = torch.from_numpy(want).to(dtype or torch.float32)
        got = hps.lookup("m", "t", torch.from_numpy(q), dtype)  # the native pass-through pipeline
        assert got.dtype == want_t.dtype
        torch.testing.assert_close(got, want_t, rtol=0, atol=0)
        assert_tiers_hold(hps, keys, rows, storage)


def test_host_memory_per_row_follows_the_storage(tmp_path, rng):
    make_table(tmp_path / "t", 20_000, 128, rng)
    used = {}
    for storage in ("float32", "float16", "int8"):
        with HierarchicalParameterServer(config(tmp_path, "host_memory", storage, dim=128), progress=False) as hps:
            used[storage] = hps.tiers[0].memory_bytes(TAG)
    for storage in ("float16", "int8"):
        # index and meta bytes per row stay; the row bytes shrink as the storage says
        saved = (bytes_per_row("float32", 128) - bytes_per_row(storage, 128)) * 20_000
        assert used[storage] <= used["float32"] - 0.9 * saved, used


@pytest.mark.parametrize("storage", ["int8", "fp8_e4m3"])
def test_rocksdb_keeps_its_storage_across_restarts(tmp_path, rng, storage):
    keys, rows = make_table(tmp_path / "t", 1000, 16, rng)
    cfg = config(tmp_path, "rocksdb", storage)
    upd = keys[:50]
    new_rows = rng.standard_normal((50, 16)).astype(np.float32)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.update("m", "t", torch.from_numpy(upd), torch.from_numpy(new_rows))
        served = hps.lookup("m", "t", torch.from_numpy(keys)).numpy()
    # The same storage: the rows (updates included) are kept, not reloaded from the files.
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(keys)).numpy(), served)
        assert_tiers_hold(hps, upd, new_rows, storage)
    # Another storage for the same directory: refused, naming both, and the directory is left as it was.
    other = "float16" if storage != "float16" else "int8"
    with pytest.raises(ValueError, match=f"storage {storage}, asked for storage {other}"):
        HierarchicalParameterServer(config(tmp_path, "rocksdb", other), progress=False)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(keys)).numpy(), served)
