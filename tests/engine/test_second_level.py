"""A dynamic cache over a host-mapped second level (issue 14, cache.second_level: host_mapped): the whole table in
host memory behind an index, one copy of the rows for every GPU, read for the cache's misses before the host map
and the lower tiers. Exact rows, a cache that learns, updates reaching every level, keys the table lacks through
the tiers, bad configs refused - on every device (the CPU twin reads the same table in RAM)."""

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


def config(tmp_path, rng, *, rows=20_000, dim=16, default=-0.5, ratio=0.05, tiers=("host_memory",), int32=False,
           **cache):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, dim, rng, int32=int32)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 4096,
                                     "default_value": default}],
                         "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"ratio": ratio, "type": "dynamic", "hit_rate_threshold": 1.1,
                                   "second_level": "host_mapped", **cache}}},
        "tiers": {"host_memory": {"enabled": "host_memory" in tiers, "num_partitions": 4},
                  "rocksdb": {"enabled": "rocksdb" in tiers, "path": str(tmp_path / "rocksdb")}},
    }
    return cfg, Reference(keys, vectors, default), keys


def stats(hps, device):
    return hps.stats()["models"]["m"]["t"][str(torch.device(device) if device == "cpu" else "cuda:0")]


def tier_fetches(hps):
    return {t.name: sum(s.fetches for s in t.stats().values()) for t in hps.tiers}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiers", [("host_memory",), ("rocksdb",), ("host_memory", "rocksdb")])
def test_misses_come_from_the_second_level_and_the_cache_learns(tmp_path, rng, device, tiers):
    cfg, ref, keys = config(tmp_path, rng, tiers=tiers)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        pipe = hps.pipeline("m", "t", device)
        assert pipe.kind == "dynamic_cache" and pipe.second_level is not None
        l2 = pipe.second_level
        assert l2.kind == "resident" and l2.size() == keys.size and l2.device == pipe.device
        before = tier_fetches(hps)
        q = rng.choice(keys, 600, replace=False)
        for _ in range(2):  # first pass: every key misses the cache and comes from the second level; then all hit
            out = hps.lookup("m", "t", torch.from_numpy(q).to(device))
            np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
        assert tier_fetches(hps) == before  # no tier was asked for a key of the table
        s = stats(hps, device)
        assert s["cache_misses"] == 600 and s["second_level_hits"] == 600 and s["cache_hits"] == 600
        assert s["inserts"] == 600 and s["defaults_served"] == 0
        assert s["second_level_memory_bytes"] >= keys.size * ref.dim * 4


@pytest.mark.parametrize("device", DEVICES)
def test_keys_the_table_lacks_go_on_to_the_tiers(tmp_path, rng, device):
    """update() of a key outside the files: a second level in RAM (CPU) grows for it; host-mapped rows (GPU) cannot,
    so there the key lives in the tiers and the second level stops answering for every key - its misses are asked
    of the tiers from then on. Either way the row is the new one; a key no tier holds gets the default."""
    cfg, ref, keys = config(tmp_path, rng, tiers=("host_memory", "rocksdb"))
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        new = np.array([1 << 61], dtype=np.int64)
        hps.update("m", "t", torch.from_numpy(new), torch.full((1, ref.dim), 3.0))
        ref.update(new, np.full((1, ref.dim), 3.0, np.float32))
        q = np.array([1 << 61, int(keys[7]), 1 << 62], dtype=np.int64)
        out = hps.lookup("m", "t", torch.from_numpy(q).to(device))
        np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
        s = stats(hps, device)
        l2 = hps.pipeline("m", "t", device).second_level
        assert s["defaults_served"] == 1
        if device == "cpu":
            assert l2.answers_all and s["second_level_hits"] == 2 and sum(s["tier_hits"].values()) == 0
        else:
            assert not l2.answers_all and s["second_level_hits"] == 1 and sum(s["tier_hits"].values()) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_update_reaches_the_second_level_and_the_cache(tmp_path, rng, device):
    cfg, ref, keys = config(tmp_path, rng)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        cached, below = keys[:100], keys[100:200]
        hps.lookup("m", "t", torch.from_numpy(cached).to(device))  # now in the cache
        upd = np.concatenate([cached[:50], below[:50]])
        new = rng.standard_normal((upd.size, ref.dim)).astype(np.float32)
        hps.update("m", "t", torch.from_numpy(upd), torch.from_numpy(new))
        ref.update(upd, new)
        l2 = hps.pipeline("m", "t", device).second_level
        assert l2.stats(None)["updates"] == 1
        q = np.concatenate([cached, below])
        out = hps.lookup("m", "t", torch.from_numpy(q).to(device))
        np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))


@pytest.mark.parametrize("device", DEVICES)
def test_refresh_rereads_the_cached_rows_from_the_second_level(tmp_path, rng, device):
    """HPS refresh with no tier holding the table (the second level is the only copy): the cached rows stay right."""
    cfg, ref, keys = config(tmp_path, rng, tiers=())
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        assert hps.tiers == []
        q = torch.from_numpy(keys[:200]).to(device)
        hps.lookup("m", "t", q)
        assert hps.refresh("m", "t") >= 200
        np.testing.assert_array_equal(hps.lookup("m", "t", q).cpu().numpy(), ref.lookup(keys[:200]))
        assert stats(hps, device)["cache_hits"] == 200


@pytest.mark.cuda
def test_gpus_of_a_table_share_one_pinned_copy(tmp_path, rng):
    """Every GPU's second level reads the same pinned rows (one copy per process); the CPU's has its own."""
    gpus = torch.cuda.device_count()
    if gpus < 1:
        pytest.skip("CUDA is not available")
    cfg, ref, keys = config(tmp_path, rng)
    cfg["models"]["m"]["deployed_device_list"] = list(range(min(gpus, 2)))
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        devices = [f"cuda:{i}" for i in range(min(gpus, 2))]
        l2s = [hps.pipeline("m", "t", d).second_level for d in devices]
        assert len({p.native.rows_ptr() for p in l2s}) == 1 and l2s[0].native.rows_ptr() != 0
        assert hps.pipeline("m", "t", "cpu").second_level.native.rows_ptr() != l2s[0].native.rows_ptr()
        q = keys[:300]
        for d in devices + ["cpu"]:
            np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(q).to(d)).cpu().numpy(),
                                          ref.lookup(q))


@pytest.mark.parametrize("cache,match", [
    ({"type": "static"}, r"models\.m\.cache\.second_level = 'host_mapped': a second level goes below a dynamic cache"),
    ({"ratio": 1.0}, r"models\.m\.cache\.second_level = 'host_mapped': a cache of ratio 1\.0 already holds"),
    ({"second_level": "ssd"}, r"models\.m\.cache\.second_level = 'ssd': allowed: host_mapped \| none"),
])
def test_bad_second_level_configs_are_refused(tmp_path, rng, cache, match):
    cfg, _, _ = config(tmp_path, rng, **cache)
    if "ratio" in cache:
        cfg["models"]["m"]["cache"]["ratio"] = cache["ratio"]
    with pytest.raises(ConfigError, match=match):
        HierarchicalParameterServer(cfg, progress=False)


def test_hps_json_key(tmp_path, rng):
    _, ref, keys = config(tmp_path, rng)
    js = {"supportlonglong": True, "volatile_db": {"type": "hash_map", "num_partitions": 4},
          "models": [{"model": "m", "sparse_files": [str(tmp_path / "t")], "embedding_table_names": ["t"],
                      "embedding_vecsize_per_table": [ref.dim], "maxnum_catfeature_query_per_table_per_sample": [64],
                      "default_value_for_each_table": [-0.5], "deployed_device_list": [0], "max_batch_size": 1,
                      "gpucacheper": 0.1, "hit_rate_threshold": 1.1, "gpucache_second_level": "host_mapped"}]}
    path = tmp_path / "hps.json"
    path.write_text(json.dumps(js))
    with HierarchicalParameterServer(str(path), progress=False) as hps:
        assert hps.config.models["m"].cache.second_level == "host_mapped"
        q = keys[:64]
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(q)).numpy(), ref.lookup(q))
        assert stats(hps, "cpu")["second_level_hits"] == 64


# ---------------------------------------------------------------------------------------------- GPU-direct path
# On a GPU whose second level answers every key (host-mapped rows, no shared tier, no update beyond the rows), the
# cache's misses never reach the CPU: find -> second-level probe + zero-copy row copy -> (bucket, key) sort -> insert,
# all on the caller's stream.




@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("key_dtype", [torch.int64, torch.int32])
def test_gpu_direct_lookup_waits_on_nothing_and_matches_the_cpu_twin(tmp_path, rng, policy, key_dtype):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    cfg, ref, keys = config(tmp_path, rng, rows=20_000, ratio=0.05, policy=policy, int32=True)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        gpu, cpu = hps.pipeline("m", "t", "cuda:0"), hps.pipeline("m", "t", "cpu")
        assert gpu.second_level.answers_all
        warm = torch.from_numpy(rng.choice(keys, 3000)).to(key_dtype)
        hps.lookup("m", "t", warm.cuda())  # first call: index upload, workspaces; not the one checked
        hps.lookup("m", "t", warm)
        batches = [rng.choice(keys, 3000) for _ in range(6)]  # repeats inside and across batches; evictions
        batches.append(np.concatenate([batches[0][:100], np.array([2**31 - 1, -(2**31)])]))  # keys not in the table
        for i, b in enumerate(batches):
            q = torch.from_numpy(b).to(key_dtype)
            torch.cuda.synchronize()
            qd = q.cuda()
            torch.cuda._sleep(100_000_000)  # GPU work ahead of the lookup on the same stream
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing torch call inside the lookup raises
            try:
                out_gpu = hps.lookup("m", "t", qd)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert not torch.cuda.current_stream().query(), f"batch {i}: the lookup waited for the GPU"
            out_cpu = hps.lookup("m", "t", q)
            np.testing.assert_array_equal(out_gpu.cpu().numpy(), ref.lookup(b), err_msg=f"batch {i}")
            np.testing.assert_array_equal(out_cpu.numpy(), ref.lookup(b))
        # the same cache on both devices (the GPU inserts in the host plan's (bucket, key) order)
        kg, vg = gpu.native.export_all()
        kc, vc = cpu.native.export_all()
        og, oc = torch.argsort(kg.cpu()), torch.argsort(kc)
        assert torch.equal(kg.cpu()[og], kc[oc]) and torch.equal(vg.cpu()[og], vc[oc])
        s = stats(hps, "cuda:0")
        assert s["defaults_served"] == 2 and s["second_level_hits"] > 0 and s["inserts"] > 0


@pytest.mark.cuda
def test_gpu_direct_lookup_with_misses_is_capturable(tmp_path, rng):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    cfg, ref, keys = config(tmp_path, rng, ratio=0.05)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        pipe = hps.pipeline("m", "t", "cuda:0")
        warm = torch.from_numpy(rng.choice(keys, 512)).cuda()
        pipe.lookup(warm)  # sizes the workspaces before the capture
        q = torch.from_numpy(rng.choice(keys, 512)).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pipe.lookup(warm)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = pipe.lookup(q)
        for _ in range(2):  # the first replay misses (second level), the second hits the cache
            g.replay()
            torch.cuda.synchronize()
            np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q.cpu().numpy()))
        assert bool(pipe.contains(q).all())


def test_lookups_during_updates_never_see_a_torn_row(tmp_path, rng):
    """Readers on the CPU pipeline (cache misses read the second level under its lock) while a writer updates the
    same keys with rows whose every element is the version: every row read is one version, never a mix, and no
    reader goes back in time."""
    import threading

    cfg, ref, keys = config(tmp_path, rng, rows=4000, dim=16, ratio=0.02)
    hot = keys[:256]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.update("m", "t", torch.from_numpy(hot), torch.zeros(hot.size, 16))
        stop, problems = threading.Event(), []

        def reader(seed):
            r = np.random.default_rng(seed)
            last = np.zeros(hot.size)
            while not stop.is_set():
                idx = r.integers(0, hot.size, 64)
                out = hps.lookup("m", "t", torch.from_numpy(hot[idx])).numpy()
                if not (out == out[:, :1]).all():
                    problems.append("torn row")
                v = out[:, 0]
                if (v < last[idx]).any():
                    problems.append("a row went back to an older version")
                np.maximum.at(last, idx, v)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for version in range(1, 40):
            hps.update("m", "t", torch.from_numpy(hot), torch.full((hot.size, 16), float(version)))
        stop.set()
        for t in threads:
            t.join()
        assert not problems, problems[:5]
        np.testing.assert_array_equal(hps.lookup("m", "t", torch.from_numpy(hot)).numpy(), np.full((hot.size, 16), 39.0))
