"""The native lookup pipeline through the engine, on every device: tables that fit stay resident (no miss, no
eviction, bytes ~ rows x row bytes + a small index), misses cost only what they are, the lower tiers through the
callback, bad input refused with nothing changed, CUDA graph capture of the all-hit path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.nn import LookupLayer
from hps_core.testing import device_params

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
DEVICES = device_params()
INDEX_BYTES_PER_KEY = 13 / 0.8 + 1  # resident index: 13 B per slot at load 0.8, plus spill flags and rounding


def engine(tmp_path, rng, *, mode="dynamic", ratio=1.0, rows=20_000, dim=16, default=-0.5,
           tiers=("host_memory",), threshold=1.1, max_keys=4096):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, dim, rng)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": max_keys,
                                     "default_value": default}],
                         "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"ratio": ratio, "type": mode, "hit_rate_threshold": threshold}}},
        "tiers": {"host_memory": {"enabled": "host_memory" in tiers, "num_partitions": 4},
                  "rocksdb": {"enabled": "rocksdb" in tiers, "path": str(tmp_path / "rocksdb")}},
    }
    return HierarchicalParameterServer(cfg, progress=False), Reference(keys, vectors, default), keys


def stats(hps, device):
    return hps.stats()["models"]["m"]["t"][str(torch.device(device) if device == "cpu" else "cuda:0")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,ratio", [("dynamic", 1.0), ("static", 0.5)])
def test_a_table_that_fits_stays_resident(tmp_path, rng, device, mode, ratio):
    hps, ref, keys = engine(tmp_path, rng, mode=mode, ratio=ratio)
    with hps:
        pipe = hps.pipeline("m", "t", device)
        assert pipe.kind == "resident" and pipe.size() == keys.size
        assert bool(pipe.contains(torch.from_numpy(keys).to(device)).all())
        row_bytes = ref.dim * 4
        assert pipe.memory_bytes() <= keys.size * (row_bytes + INDEX_BYTES_PER_KEY) + 4096
        for _ in range(3):  # every key, in random order, twice over: nothing misses, nothing is evicted
            q = rng.permutation(np.concatenate([keys, keys]))[:4096]
            out = hps.lookup("m", "t", torch.from_numpy(q).to(device))
            np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
        s = stats(hps, device)
        assert s["cache_misses"] == 0 and s["evictions"] == 0 and s["cache_size"] == keys.size
        assert s["hit_rate"] == 1.0 and s["keys"] == 3 * 4096


@pytest.mark.parametrize("device", DEVICES)
def test_static_table_answers_every_key_itself(tmp_path, rng, device):
    """HPS static semantics: a key the table lacks gets the default vector; no tier is asked."""
    hps, ref, keys = engine(tmp_path, rng, mode="static", tiers=("host_memory", "rocksdb"))
    with hps:
        fetches = {t.name: sum(s.fetches for s in t.stats().values()) for t in hps.tiers}
        q = np.array([1 << 61, int(keys[0]), -(1 << 61), int(keys[1])], dtype=np.int64)
        out = hps.lookup("m", "t", torch.from_numpy(q).to(device))
        np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
        assert {t.name: sum(s.fetches for s in t.stats().values()) for t in hps.tiers} == fetches
        s = stats(hps, device)
        assert s["cache_misses"] == 2 and s["defaults_served"] == 2 and s["unique_misses"] == 0
        # update() reaches the static table, new keys included (it answers for the whole table)
        new_keys = torch.tensor([int(keys[5]), 1 << 61])
        hps.update("m", "t", new_keys, torch.full((2, ref.dim), 4.0))
        assert bool((hps.lookup("m", "t", new_keys.to(device)) == 4.0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_resident_cache_over_private_tiers_answers_every_key_itself(tmp_path, rng, device):
    """ratio 1.0 (dynamic) over in-process tiers: the table holds the newest row of every key any tier holds (it
    starts from them and update() writes it too, growing for new keys), so a key it lacks is in no tier - it gets the
    default without a tier being asked, and the lookup waits on nothing (one launch, like a static table)."""
    hps, ref, keys = engine(tmp_path, rng, mode="dynamic", ratio=1.0, tiers=("host_memory", "rocksdb"))
    with hps:
        pipe = hps.pipeline("m", "t", device)
        assert pipe.answers_all and pipe.mode == "dynamic"
        extra = torch.tensor([1 << 61])
        hps.update("m", "t", extra, torch.full((1, ref.dim), 9.0))  # a new key: the resident table grows for it
        fetches = {t.name: sum(s.fetches for s in t.stats().values()) for t in hps.tiers}
        q = torch.tensor([1 << 61, int(keys[0]), 1 << 62])
        for _ in range(2):
            out = hps.lookup("m", "t", q.to(device)).cpu()
            assert bool((out[0] == 9.0).all()) and bool((out[2] == ref.default).all())
            np.testing.assert_array_equal(out[1].numpy(), ref.rows[int(keys[0])])
        assert {t.name: sum(s.fetches for s in t.stats().values()) for t in hps.tiers} == fetches
        s = stats(hps, device)
        assert s["cache_misses"] == 2 and s["defaults_served"] == 2 and s["unique_misses"] == 0
        assert pipe.size() == keys.size + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiers", [("host_memory", "rocksdb"), ("rocksdb",)])
def test_dynamic_cache_learns_and_misses_cost_what_they_are(tmp_path, rng, device, tiers):
    """A learning cache: each batch's misses are fetched (host map, lower tiers through the callback, defaults)
    and inserted; the same batch again hits entirely."""
    hps, ref, keys = engine(tmp_path, rng, mode="dynamic", ratio=0.3, tiers=tiers)
    with hps:
        for i in range(6):
            q = rng.choice(keys, 1500)
            q[::50] = rng.integers(1 << 50, 1 << 60, size=q[::50].size)  # in no tier
            t = torch.from_numpy(q).to(device)
            np.testing.assert_array_equal(hps.lookup("m", "t", t).cpu().numpy(), ref.lookup(q))
            before = stats(hps, device)["cache_misses"]
            np.testing.assert_array_equal(hps.lookup("m", "t", t).cpu().numpy(), ref.lookup(q))
            assert stats(hps, device)["cache_misses"] == before, "the batch's misses were inserted"
        s = stats(hps, device)
        assert s["inserts"] > 0 and s["defaults_served"] >= 6 * 30
        hits = s["tier_hits"]
        assert hits.get("rocksdb", 0) + hits.get("host_memory", 0) == s["unique_misses"] - s["defaults_served"]
        if tiers == ("rocksdb",):
            assert hits["rocksdb"] > 0  # every miss went through the lower-tier callback


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_refused_and_changes_nothing(tmp_path, rng, device):
    hps, ref, keys = engine(tmp_path, rng, mode="dynamic", ratio=0.3, max_keys=100)
    with hps:
        q = torch.from_numpy(keys[:50]).to(device)
        hps.lookup("m", "t", q)
        before = stats(hps, device)
        with pytest.raises(TypeError, match="int32 or int64, found torch.float32"):
            hps.lookup("m", "t", q.float())
        with pytest.raises(ValueError, match="101 keys for hps_et.m.t exceed"):
            hps.lookup("m", "t", torch.zeros(101, dtype=torch.int64, device=device))
        pipe = hps.pipeline("m", "t", device)
        other = "cpu" if device != "cpu" else ("cuda" if torch.cuda.is_available() else None)
        if other is not None:
            with pytest.raises(ValueError, match=f"keys for hps_et.m.t must be on {pipe.device}"):
                pipe.lookup(q.to(other))
        after = stats(hps, device)
        for k in ("lookups", "keys", "cache_misses", "inserts", "cache_size"):
            assert after[k] == before[k], k
    with pytest.raises(RuntimeError, match="closed"):
        hps.lookup("m", "t", q)
    with pytest.raises(ValueError, match="no open lookup pipeline"):
        pipe.lookup(q)


@pytest.mark.parametrize("device", DEVICES)
def test_lower_tier_failure_raises_from_the_lookup(tmp_path, rng, device, monkeypatch):
    hps, ref, keys = engine(tmp_path, rng, mode="dynamic", ratio=0.3, tiers=("host_memory", "rocksdb"))
    with hps:
        rocks = hps.tiers[1]

        def broken(tag, k):
            raise OSError("disk on fire")

        monkeypatch.setattr(rocks, "fetch", broken)
        with pytest.raises(RuntimeError, match="lower tiers failed"):
            hps.lookup("m", "t", torch.tensor([1 << 55], device=device))  # in no tier: asks RocksDB


@pytest.mark.parametrize("device", DEVICES)
def test_lookup_layer_is_the_pipeline(tmp_path, rng, device):
    hps, ref, keys = engine(tmp_path, rng, mode="dynamic", ratio=1.0)
    with hps:
        layer = LookupLayer("m", "t", server=hps)
        q = torch.from_numpy(rng.choice(keys, (8, 64))).to(device)
        out = layer(q)
        assert out.shape == (8, 64, ref.dim) and out.device == q.device
        np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q.cpu().numpy()))
        assert layer._handles[q.device] == hps.pipeline("m", "t", device).handle


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mode,ratio,waits", [("static", 1.0, False), ("dynamic", 1.0, False), ("dynamic", 0.5, True)])
def test_a_resident_lookup_returns_before_the_gpu_runs_it(tmp_path, rng, mode, ratio, waits):
    """A table that answers every key (static, or covering over in-process tiers) is one launch the host does not
    wait for: the call returns while the stream is still busy with earlier work. A learning cache waits for its
    miss count, so its call returns only after the stream ran it."""
    hps, ref, keys = engine(tmp_path, rng, mode=mode, ratio=ratio)
    with hps:
        q = torch.from_numpy(keys[:512].copy()).cuda()
        hps.lookup("m", "t", q)  # the learning cache now holds q: the timed call below is all hits
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the lookup on the same stream
        out = hps.lookup("m", "t", q)
        busy = not torch.cuda.current_stream().query()
        assert busy != waits
        np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(keys[:512]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mode,ratio", [("static", 1.0), ("dynamic", 1.0), ("dynamic", 0.5)])
def test_all_hit_lookup_is_capturable_in_a_cuda_graph(tmp_path, rng, mode, ratio):
    """torch.cuda.graph captures the layer's lookup (the find alone); replays with new keys in the static input
    return their rows. A dynamic cache's miss inside a replay gets the default vector (no host round trip)."""
    hps, ref, keys = engine(tmp_path, rng, mode=mode, ratio=ratio)
    with hps:
        layer = LookupLayer("m", "t", server=hps)
        resident = keys if ratio >= 1.0 else keys[: keys.size // 4]
        static_keys = torch.from_numpy(rng.choice(resident, 1024)).cuda()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on the capture stream: fills a learning cache with `resident`
            for start in range(0, resident.size, 4096):
                layer(torch.from_numpy(resident[start:start + 4096]).cuda())
            layer(static_keys)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_keys)
        for _ in range(3):
            q = rng.choice(resident, 1024)
            static_keys.copy_(torch.from_numpy(q))
            graph.replay()
            torch.cuda.synchronize()
            np.testing.assert_array_equal(static_out.cpu().numpy(), ref.lookup(q))
        lookups = stats(hps, "cuda")["lookups"]
        q = rng.choice(resident, 1024)
        q[7] = 1 << 61  # in no tier and not resident
        static_keys.copy_(torch.from_numpy(q))
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(static_out.cpu().numpy(), ref.lookup(q))
        s = stats(hps, "cuda")
        assert s["lookups"] == lookups + 1  # replays are counted on the device
        assert s["defaults_served"] >= 1
