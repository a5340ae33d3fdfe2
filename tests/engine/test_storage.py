"""Compact storage through the public lookup (issue 16 item 1): a table deployed with `cache.storage` (or a table's
own `storage`) returns, on every deployment and device, each key's row as the storage keeps it -
decode(encode(row)) - whether the row was a hit, a miss fetched from the tiers, or a key no tier holds (the default
vector, stored like any row); update() encodes the same way; a bfloat16 lookup is that row rounded; the device
tables hold the stored bytes (memory per row); bad configs and rows a storage cannot keep raise, naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.config import ConfigError
from hps_core.engine import HierarchicalParameterServer
from hps_core.storage import STORAGE_NAMES, bytes_per_row
from hps_core.testing import device_params

from engine_refs import Reference, make_table, stored

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
DEVICES = device_params()
COMPACT = [s for s in STORAGE_NAMES if s != "float32"]
DEPLOYMENTS = {
    "dynamic_lru": {"ratio": 0.05, "policy": "lru"},
    "dynamic_lfu_tinylfu": {"ratio": 0.05, "policy": "lfu", "admission": "tinylfu"},
    "resident_ratio_1": {"ratio": 1.0},
    "static": {"type": "static"},
    "second_level": {"ratio": 0.05, "second_level": "host_mapped"},
}
DEFAULT = -0.3


class StoredReference(Reference):
    """Reference whose rows and default are what `storage` keeps."""

    def __init__(self, keys, vectors, storage):
        super().__init__(keys, stored(vectors, storage), float(stored(np.full((1, vectors.shape[1]), DEFAULT),
                                                                      storage)[0, 0]))
        self.storage = storage

    def update(self, keys, vectors):
        super().update(keys, stored(vectors, self.storage))


def server(tmp_path, rng, cache, *, storage, dim=16, rows=3000, table_storage=None):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, dim, rng)
    table = {"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 4096, "default_value": DEFAULT}
    if table_storage is not None:
        table["storage"] = table_storage
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [table], "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"hit_rate_threshold": 1.1, "storage": storage, **cache}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}},
    }
    effective = table_storage or storage
    return HierarchicalParameterServer(cfg, progress=False), StoredReference(keys, vectors, effective), keys, vectors


def query(rng, keys, n=600):
    absent = rng.integers(1 << 50, 1 << 51, 40)
    return np.concatenate([rng.choice(keys, n - 40), absent])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
@pytest.mark.parametrize("storage", COMPACT)
def test_lookups_return_the_stored_rows(tmp_path, rng, device, deployment, storage):
    hps, ref, keys, vectors = server(tmp_path, rng, DEPLOYMENTS[deployment], storage=storage)
    with hps:
        for _ in range(3):  # misses through the tiers (and their inserts), then hits
            q = query(rng, keys)
            got = hps.lookup("m", "t", torch.from_numpy(q).to(device))
            assert got.dtype == torch.float32
            np.testing.assert_array_equal(got.cpu().numpy(), ref.lookup(q))
        # A bfloat16 lookup is the stored row decoded, then rounded.
        q = query(rng, keys)
        got = hps.lookup("m", "t", torch.from_numpy(q).to(device), dtype=torch.bfloat16)
        assert torch.equal(got.cpu(), torch.from_numpy(ref.lookup(q)).to(torch.bfloat16))
        # And the stored rows are not the float32 ones (the test can tell the storages apart).
        assert not np.array_equal(ref.lookup(keys[:50]), vectors[:50])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deployment", ["dynamic_lru", "static", "second_level"])
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_update_encodes_as_load_does(tmp_path, rng, device, deployment, storage):
    hps, ref, keys, _ = server(tmp_path, rng, DEPLOYMENTS[deployment], storage=storage)
    with hps:
        q = torch.from_numpy(keys[:200]).to(device)
        hps.lookup("m", "t", q)  # cached / resident before the update
        new_keys = np.concatenate([keys[:100], rng.integers(1 << 45, 1 << 46, 20)])
        new_rows = rng.standard_normal((new_keys.size, 16)).astype(np.float32) * 3
        hps.update("m", "t", torch.from_numpy(new_keys), torch.from_numpy(new_rows))
        ref.update(new_keys, new_rows)
        for probe in (keys[:200], new_keys):
            got = hps.lookup("m", "t", torch.from_numpy(probe).to(device))
            np.testing.assert_array_equal(got.cpu().numpy(), ref.lookup(probe))


def test_table_storage_overrides_the_cache_and_memory_shrinks(tmp_path, rng):
    sizes = {}
    for storage in ("float32", "float16", "int8"):
        sub = tmp_path / storage
        sub.mkdir()
        hps, ref, keys, _ = server(sub, np.random.default_rng(1), {"type": "static"}, storage="float32",
                                   table_storage=storage, rows=4000, dim=64)
        with hps:
            q = query(rng, keys)
            np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(q)).numpy(), ref.lookup(q))
            pipe = hps.tables["m"][0].caches[torch.device("cpu")]
            assert pipe.storage == storage
            sizes[storage] = pipe.memory_bytes()
    index = sizes["float32"] - 4000 * bytes_per_row("float32", 64)
    # Rows in the table: 4,000 x 256 B (float32) -> 128 B (float16) -> 72 B (int8); the index is the same.
    assert sizes["float16"] - index < 0.52 * (sizes["float32"] - index) * 1.01
    assert sizes["int8"] - index == pytest.approx(4000 * (64 + 8), rel=0.01)


def test_hps_json_fp8_quant_makes_a_static_table_fp8(tmp_path, rng):
    from hps_core.config import read_hps_json as load_config

    path = tmp_path / "t"
    make_table(path, 100, 8, rng)
    model = {"model": "m", "sparse_files": [str(path)], "embedding_vecsize_per_table": [8],
             "maxnum_catfeature_query_per_table_per_sample": [4], "default_value_for_each_table": [0.0],
             "deployed_device_list": [0], "max_batch_size": 4, "fp8_quant": True, "embedding_table_names": ["t"]}
    static = load_config({"supportlonglong": True, "models": [{**model, "use_static_table": True}]})
    assert static.models["m"].cache.storage == "fp8_e4m3"
    dynamic = load_config({"supportlonglong": True, "models": [{**model, "gpucacheper": 0.5}]})
    assert dynamic.models["m"].cache.storage == "float32"  # HPS applied fp8_quant to static tables only
    with pytest.raises(ConfigError, match="fp8_quant"):
        load_config({"supportlonglong": True,
                     "models": [{**model, "use_static_table": True, "embedding_storage_dtype": "int8"}]})
    assert load_config({"supportlonglong": True, "models": [{**model, "embedding_storage_dtype": "bf16"}]}
                       ).models["m"].cache.storage == "bfloat16"


def test_bad_storage_configs_name_the_field(tmp_path, rng):
    with pytest.raises(ConfigError, match=r"cache\.storage.*int4"):
        server(tmp_path / "a", rng, {}, storage="int4")
    with pytest.raises(ConfigError, match=r"tables\[0\]\.storage.*multiple of 4"):
        server(tmp_path / "b", rng, {}, storage="float32", table_storage="int8", dim=10)


def test_rows_a_storage_cannot_keep_are_refused_naming_the_table(tmp_path, rng):
    hps, ref, keys, _ = server(tmp_path, rng, {"type": "static"}, storage="int8")
    with hps:
        before = hps.lookup("m", "t", torch.from_numpy(keys[:10]))
        bad = np.ones((2, 16), dtype=np.float32)
        bad[1, 3] = np.inf
        with pytest.raises(ValueError, match=r"vectors for hps_et.m.t: row 1 holds inf at column 3"):
            hps.update("m", "t", torch.from_numpy(keys[:2]), torch.from_numpy(bad))
        assert torch.equal(hps.lookup("m", "t", torch.from_numpy(keys[:10])), before)  # nothing written


@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
@pytest.mark.parametrize("storage", COMPACT)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_rows_equal_the_cpu_twin(tmp_path, rng, deployment, storage):
    hps, ref, keys, _ = server(tmp_path, rng, DEPLOYMENTS[deployment], storage=storage)
    with hps:
        q = torch.from_numpy(query(rng, keys))
        for dtype in (torch.float32, torch.float32, torch.bfloat16):
            cpu = hps.lookup("m", "t", q, dtype=dtype)
            gpu = hps.lookup("m", "t", q.cuda(), dtype=dtype)
            assert torch.equal(gpu.cpu(), cpu)
