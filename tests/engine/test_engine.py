"""The CPU engine end to end: results equal a numpy reference over random deployments."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")


def deployment(tmp_path, rng, *, tiers=("host_memory", "rocksdb"), key_dtype="int64", ratio=0.05, threshold=1.1,
               policy="lru", models=None):
    """Writes the tables of `models` ({model: [(rows, dim, default), ...]}) and returns (config dict, refs)."""
    models = models or {"ads": [(3000, 8, 0.5), (500, 3, -1.0)], "feed": [(2000, 16, 0.0)]}
    refs = {}
    cfg_models = {}
    for model, tables in models.items():
        tcfgs = []
        for i, (rows, dim, default) in enumerate(tables):
            path = tmp_path / "tables" / model / f"t{i}"
            keys, vectors = make_table(path, rows, dim, rng, int32=key_dtype == "int32")
            refs[(model, i)] = Reference(keys, vectors, default)
            tcfgs.append({"name": f"t{i}", "path": str(path), "dim": dim, "max_keys_per_sample": 64,
                          "default_value": default})
        cfg_models[model] = {
            "tables": tcfgs,
            "max_batch_size": 256,
            "deployed_device_list": [0],
            "cache": {"ratio": ratio, "hit_rate_threshold": threshold, "policy": policy},
        }
    cfg = {
        "key_dtype": key_dtype,
        "models": cfg_models,
        "tiers": {
            "host_memory": {"enabled": "host_memory" in tiers, "num_partitions": 4},
            "rocksdb": {"enabled": "rocksdb" in tiers, "path": str(tmp_path / "rocksdb")},
        },
    }
    return cfg, refs


def query(ref: Reference, rng, shape, dtype, unknown_fraction=0.2):
    """Keys drawn from the table (with duplicates) plus unknown keys."""
    known = np.array(list(ref.rows.keys()), dtype=np.int64)
    n = int(np.prod(shape))
    keys = rng.choice(known, size=n)
    unknown = rng.random(n) < unknown_fraction
    info = np.iinfo(np.int32 if dtype == torch.int32 else np.int64)
    fresh = rng.integers(info.min, info.max, size=n, dtype=np.int64)
    keys[unknown] = fresh[unknown]
    keys[: min(n, 2)] = [info.max, info.min][: min(n, 2)]  # extremes are ordinary keys (usually unknown here)
    return torch.from_numpy(keys.reshape(shape)).to(dtype)


@pytest.mark.parametrize("key_dtype", ["int64", "int32"])
@pytest.mark.parametrize("tiers", [("host_memory", "rocksdb"), ("host_memory",), ("rocksdb",)])
def test_lookup_matches_reference(tmp_path, rng, key_dtype, tiers):
    cfg, refs = deployment(tmp_path, rng, tiers=tiers, key_dtype=key_dtype)
    dtype = torch.int32 if key_dtype == "int32" else torch.int64
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for step in range(12):
            for (model, tid), ref in refs.items():
                shape = [(64,), (16, 4), (2, 3, 5)][step % 3]
                keys = query(ref, rng, shape, dtype)
                out = hps.lookup(model, tid, keys)
                assert out.shape == (*shape, ref.dim) and out.dtype == torch.float32
                np.testing.assert_array_equal(out.numpy(), ref.lookup(keys.numpy()))
        stats = hps.stats()
        t0 = stats["models"]["ads"]["t0"]["cpu"]
        assert t0["keys"] > 0 and t0["cache_hits"] > 0  # repeated keys come back from the cache
        assert t0["evictions"] > 0  # a 5% cache must evict
        assert t0["defaults_served"] > 0


def test_tables_addressed_by_id_and_name(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = query(refs[("ads", 1)], rng, (32,), torch.int64)
        torch.testing.assert_close(hps.lookup("ads", 1, keys), hps.lookup("ads", "t1", keys), rtol=0, atol=0)


def test_no_cache_deployment(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng)
    cfg["models"]["feed"]["cache"]["enabled"] = False
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        ref = refs[("feed", 0)]
        keys = query(ref, rng, (8, 8), torch.int64)
        np.testing.assert_array_equal(hps.lookup("feed", 0, keys).numpy(), ref.lookup(keys.numpy()))


@pytest.mark.parametrize("tiers", [("host_memory", "rocksdb"), ("rocksdb",)])
@pytest.mark.parametrize("key_dtype", ["int64", "int32"])
def test_no_cache_cpu_lookups_run_natively(tmp_path, rng, tiers, key_dtype):
    """A table without a cache: CPU keys go through its pass-through pipeline (host map, then the lower tiers
    through the callback, then the default vector) - every position, nothing stored - with the same rows."""
    cfg, refs = deployment(tmp_path, rng, tiers=tiers, key_dtype=key_dtype)
    cfg["models"]["feed"]["cache"]["enabled"] = False
    dtype = torch.int32 if key_dtype == "int32" else torch.int64
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        ref = refs[("feed", 0)]
        total = defaults = 0
        for shape in [(8, 8), (64,), (3, 1, 5)]:
            keys = query(ref, rng, shape, dtype)
            np.testing.assert_array_equal(hps.lookup("feed", 0, keys).numpy(), ref.lookup(keys.numpy()))
            total += keys.numel()
            defaults += int(sum(int(k) not in ref.rows for k in keys.reshape(-1).tolist()))
        pipe = hps.cpu_pipeline("feed", 0)
        assert pipe.kind == "pass_through" and pipe.size() == 0
        s = hps.stats()["models"]["feed"]["t0"]["cpu"]
        assert s["lookups"] == 3 and s["keys"] == total and s["cache_hits"] == 0
        assert s["defaults_served"] == defaults
        assert sum(s["tier_hits"].values()) == total - defaults
        with pytest.raises(ValueError, match="exceed"):
            hps.lookup("feed", 0, torch.zeros(256 * 64 + 1, dtype=dtype))
        with pytest.raises(ValueError, match="pass-through"):
            pipe.update(torch.tensor([1]), torch.zeros(1, ref.dim))


def test_restart_over_existing_rocksdb(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng, tiers=("rocksdb",))
    ref = refs[("ads", 0)]
    keys = query(ref, rng, (100,), torch.int64)
    new_rows = torch.randn(3, ref.dim)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        known = torch.tensor(list(ref.rows)[:3])
        hps.update("ads", 0, known, new_rows)
        ref.update(known.numpy(), new_rows.numpy())
    # Restart without loading the files: RocksDB still has every row, including the update.
    with HierarchicalParameterServer(cfg, progress=False, load=False) as hps:
        np.testing.assert_array_equal(hps.lookup("ads", 0, keys).numpy(), ref.lookup(keys.numpy()))
        np.testing.assert_array_equal(hps.lookup("ads", 0, known).numpy(), new_rows.numpy())


def test_update_reaches_tiers_and_caches(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng, ratio=1.0)
    ref = refs[("ads", 0)]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = torch.tensor(list(ref.rows)[:50])
        hps.lookup("ads", 0, keys)  # cached now
        new = torch.randn(50, ref.dim)
        dup_keys = torch.cat([keys, keys[:5]])
        dup_new = torch.cat([new, new[:5] + 1.0])  # last occurrence wins
        hps.update("ads", 0, dup_keys, dup_new)
        expected = new.clone()
        expected[:5] += 1.0
        torch.testing.assert_close(hps.lookup("ads", 0, keys), expected, rtol=0, atol=0)
        for tier in hps.tiers:
            values, found = tier.fetch("hps_et.ads.t0", keys)
            assert bool(found.all())
            torch.testing.assert_close(values, expected, rtol=0, atol=0)


def test_refresh_reads_tier_changes(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng, ratio=1.0, tiers=("host_memory",))
    ref = refs[("feed", 0)]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = torch.tensor(list(ref.rows)[:40])
        hps.lookup("feed", 0, keys)
        changed = torch.full((40, ref.dim), 7.0)
        hps.tiers[0].insert("hps_et.feed.t0", keys, changed)  # behind the cache's back
        assert not torch.equal(hps.lookup("feed", 0, keys), changed)  # the cache still serves the old rows
        assert hps.refresh("feed", 0) >= 40
        torch.testing.assert_close(hps.lookup("feed", 0, keys), changed, rtol=0, atol=0)


def test_async_insertion_serves_defaults_then_hits(tmp_path, rng):
    # A learning cache (ratio < 1; at >= 1 the table is resident and nothing misses); the file's last rows are
    # outside what the start-up warm-up fills.
    cfg, refs = deployment(tmp_path, rng, ratio=0.5, threshold=0.0)
    ref = refs[("ads", 0)]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = torch.tensor(list(ref.rows)[-64:])
        first = hps.lookup("ads", 0, keys)
        # HPS async semantics: a batch whose hit rate >= threshold gets the default for its misses.
        assert torch.all(first == ref.default)
        hps.wait_for_inserts()
        np.testing.assert_array_equal(hps.lookup("ads", 0, keys).numpy(), ref.lookup(keys.numpy()))
        s = hps.stats()["models"]["ads"]["t0"]["cpu"]
        assert s["async_insert_batches"] >= 1 and s["defaults_served"] >= 64


def _state_fingerprint(hps):
    caches = [(rt.tag, str(d), pipe.size(), pipe.stats(None)["lookups"]) for rts in hps.tables.values()
              for rt in rts for d, pipe in rt.caches.items()]
    tiers = [(t.name, tag, t.size(tag)) for t in hps.tiers for tag in sorted(t.stats())]
    return caches, tiers


def test_bad_input_raises_and_changes_nothing(tmp_path, rng):
    cfg, refs = deployment(tmp_path, rng)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        hps.lookup("ads", 0, torch.tensor([1, 2, 3]))
        before = _state_fingerprint(hps)
        with pytest.raises(KeyError, match="unknown model 'nope'"):
            hps.lookup("nope", 0, torch.tensor([1]))
        with pytest.raises(KeyError, match="no table id 7"):
            hps.lookup("ads", 7, torch.tensor([1]))
        with pytest.raises(KeyError, match="no table 'zz'"):
            hps.lookup("ads", "zz", torch.tensor([1]))
        with pytest.raises(TypeError, match="int32 or int64, found torch.float32"):
            hps.lookup("ads", 0, torch.tensor([1.0]))
        with pytest.raises(ValueError, match="exceed max_batch_size"):
            hps.lookup("ads", 0, torch.zeros(256 * 64 + 1, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
            hps.update("ads", 0, torch.tensor([1, 2]), torch.zeros(2, 4))
        with pytest.raises(ValueError, match="2 keys but 3 vectors"):
            hps.update("ads", 0, torch.tensor([1, 2]), torch.zeros(3, 8))
        with pytest.raises(TypeError, match="float32"):
            hps.update("ads", 0, torch.tensor([1, 2]), torch.zeros(2, 8, dtype=torch.float64))
        assert _state_fingerprint(hps) == before


def test_concurrent_lookups_never_see_torn_rows(tmp_path, rng):
    """8 threads look up while another rewrites rows whose every element is one version number."""
    cfg, refs = deployment(tmp_path, rng, ratio=0.3, models={"m": [(2000, 64, 0.0)]})
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = torch.tensor(list(refs[("m", 0)].rows)[:300])
        hps.update("m", 0, keys, torch.zeros(300, 64))
        stop = threading.Event()
        errors = []

        def reader(seed):
            g = np.random.default_rng(seed)
            last = 0.0
            while not stop.is_set():
                batch = keys[torch.from_numpy(g.integers(0, 300, 200))]
                out = hps.lookup("m", 0, batch)
                per_row_min, per_row_max = out.min(dim=1).values, out.max(dim=1).values
                if not torch.equal(per_row_min, per_row_max):
                    errors.append("torn row")
                    return
                last = max(last, float(per_row_max.max()))

        def writer():
            for version in range(1, 60):
                sel = keys[torch.from_numpy(rng.choice(300, 150, replace=False))]
                hps.update("m", 0, sel, torch.full((150, 64), float(version)))
            stop.set()

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        # After the writer is done, every key reads back the last value written for it, from cache and tiers.
        final = hps.lookup("m", 0, keys)
        values, _ = hps.tiers[0].fetch("hps_et.m.t0", keys)
        torch.testing.assert_close(final, values, rtol=0, atol=0)


def test_int32_mode_rejects_wide_file_keys(tmp_path, rng):
    path = tmp_path / "wide"
    from hps_core.tables import write_table

    write_table(path, np.array([1, 1 << 40], dtype=np.int64), np.zeros((2, 4), np.float32))
    cfg = {"key_dtype": "int32",
           "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": 4}]}},
           "tiers": {"host_memory": {"enabled": True}}}
    with pytest.raises(ValueError, match=str(1 << 40)):
        HierarchicalParameterServer(cfg, progress=False)
