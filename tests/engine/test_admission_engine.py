"""Admission in the engine (issue 16): `cache.admission: tinylfu` (HPS JSON `gpucache_admission`, per table
`tables[i].admission`) on an LFU cache - lookups stay exact, the cache refuses keys that would push out hotter ones
and holds more of the hot set than plain LFU on the same Zipf trace, CPU and CUDA caches end in the same state;
configs that cannot work are refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hps_core.config import ConfigError
from hps_core.engine import HierarchicalParameterServer
from hps_core.testing import device_params

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
DEVICES = device_params()


def config(tmp_path, rng, admission="tinylfu", policy="lfu", rows=20_000, **table):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, 8, rng)
    cfg = {"key_dtype": "int64",
           "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": 8, "max_keys_per_sample": 512,
                                        "default_value": -1.0, **table}],
                            "max_batch_size": 1, "deployed_device_list": [0],
                            "cache": {"ratio": 0.02, "policy": policy, "admission": admission,
                                      "hit_rate_threshold": 1.1}}},
           "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}}}
    return cfg, Reference(keys, vectors, -1.0), keys


def zipf_batches(rng, keys, calls=60, n=512, alpha=1.05):
    p = 1.0 / np.arange(1, keys.size + 1) ** alpha
    p /= p.sum()
    return [rng.choice(keys, n, p=p) for _ in range(calls)]


def run(cfg, device, batches, ref=None):
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for q in batches:
            got = hps.lookup("m", "t", torch.from_numpy(q).to(device))
            if ref is not None:
                np.testing.assert_array_equal(got.cpu().numpy(), ref.lookup(q))
        stats = hps.stats()["models"]["m"]["t"][str(torch.device(device)) if device == "cpu" else "cuda:0"]
        pipe = hps.pipeline("m", "t", device)
        keys, _ = pipe.export_all()
        return stats, set(keys.cpu().tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_admission_keeps_the_hot_set_and_lookups_exact(tmp_path, device):
    rng = np.random.default_rng(7)
    cfg, ref, keys = config(tmp_path, rng)
    batches = zipf_batches(np.random.default_rng(8), keys)
    tiny, cached_tiny = run(cfg, device, batches, ref)
    cfg["models"]["m"]["cache"]["admission"] = "none"
    lfu, cached_lfu = run(cfg, device, batches)
    assert tiny["refused_inserts"] > 0 and lfu["refused_inserts"] == 0  # admission said no, plain LFU never does
    assert tiny["cache_hits"] > lfu["cache_hits"], (tiny["cache_hits"], lfu["cache_hits"])
    hot = set(keys[:50].tolist())  # the 50 most popular keys (rank order = table order here)
    assert len(hot & cached_tiny) >= len(hot & cached_lfu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_cache_equals_the_cpu_twin(tmp_path):
    rng = np.random.default_rng(3)
    cfg, _, keys = config(tmp_path, rng)
    batches = zipf_batches(np.random.default_rng(4), keys, calls=30)
    cpu_stats, cpu_keys = run(cfg, "cpu", batches)
    gpu_stats, gpu_keys = run(cfg, "cuda", batches)
    assert cpu_keys == gpu_keys
    assert {k: cpu_stats[k] for k in ("cache_hits", "refused_inserts", "evictions")} == \
        {k: gpu_stats[k] for k in ("cache_hits", "refused_inserts", "evictions")}


def test_a_table_chooses_its_own_admission(tmp_path):
    rng = np.random.default_rng(5)
    cfg, _, keys = config(tmp_path, rng, admission="none")
    cfg["models"]["m"]["tables"][0]["admission"] = "tinylfu"  # the model's cache has none; this table has it
    batches = zipf_batches(np.random.default_rng(6), keys, calls=20)
    stats, _ = run(cfg, "cpu", batches)
    assert stats["refused_inserts"] > 0


def test_hps_json_keys(tmp_path):
    rng = np.random.default_rng(9)
    path = tmp_path / "t"
    keys, vectors = make_table(path, 5000, 8, rng)
    hps_json = {"supportlonglong": True, "models": [{
        "model": "m", "sparse_files": [str(path)], "embedding_table_names": ["t"],
        "embedding_vecsize_per_table": [8], "maxnum_catfeature_query_per_table_per_sample": [512],
        "default_value_for_each_table": [0.0], "deployed_device_list": [0], "max_batch_size": 1,
        "gpucacheper": 0.05, "hit_rate_threshold": 1.1, "gpucache_policy": "lfu", "gpucache_admission": "tinylfu"}]}
    (tmp_path / "hps.json").write_text(json.dumps(hps_json))
    batches = zipf_batches(np.random.default_rng(10), keys, calls=20)
    with HierarchicalParameterServer(str(tmp_path / "hps.json"), progress=False) as hps:
        for q in batches:
            hps.lookup("m", 0, torch.from_numpy(q))
        assert hps.stats()["models"]["m"]["t"]["cpu"]["refused_inserts"] > 0


@pytest.mark.parametrize("change, field", [
    ({"cache": {"policy": "lru", "admission": "tinylfu"}}, "models.m.cache.admission"),
    ({"cache": {"admission": "w-tinylfu"}}, "models.m.cache.admission"),
    ({"cache": {"type": "static", "admission": "tinylfu"}}, "models.m.cache.admission"),
    ({"table": {"admission": "tinylfu"}, "cache": {"policy": "lru", "admission": "none"}},
     "models.m.tables[0].admission"),
])
def test_configs_that_cannot_work_are_refused(tmp_path, change, field):
    rng = np.random.default_rng(11)
    cfg, _, _ = config(tmp_path, rng)
    cfg["models"]["m"]["cache"].update(change.get("cache", {}))
    cfg["models"]["m"]["tables"][0].update(change.get("table", {}))
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        HierarchicalParameterServer(cfg, progress=False)
