"""Multi-device deployment (issue 8): one cache per (table, device), tiers shared by every device and model.

Everything is real: table files written with hps_core.tables.write_table, the engine with its host-memory (and, for
some runs, RocksDB) tier, lookups from one thread per device started together by a barrier, results compared with a
vectorised numpy reference of the files.

Device pairs (the two "device entries" of one table):
  cuda:0 + cuda:1   a machine with >= 2 GPUs; deployed_device_list [0, 1].
  cpu + cuda:0      a machine with one GPU; deployed_device_list [0], and CPU keys get a CPU cache of their own on first
                    use, so one table has two independent device entries - the same engine code as two GPUs (per-device
                    cache, lock, stats, streams), less the GPU-to-GPU part.
  cpu-only          no GPU; deployed_device_list [0, 1] is served from the CPU (one warning): one shared entry, two
                    threads on it. Only the tests where one entry makes sense take this pair.
The pairs a machine cannot form skip with the reason; the GPU pairs are marked `cuda`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer

from engine_refs import make_table

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()
GPUS = torch.cuda.device_count() if not NO_CUDA else 0

CPU_ONLY = pytest.param(("cpu", "cpu"), id="cpu-only",
                        marks=pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible: ordinals map to GPUs"))
CPU_AND_GPU = pytest.param(("cpu", "cuda:0"), id="cpu+cuda0",
                           marks=[pytest.mark.cuda, pytest.mark.skipif(NO_CUDA, reason="CUDA is not available")])
TWO_GPUS = pytest.param(("cuda:0", "cuda:1"), id="cuda0+cuda1",
                        marks=[pytest.mark.cuda, pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, {GPUS} visible")])
TWO_ENTRIES = [CPU_AND_GPU, TWO_GPUS]  # two independent device entries of one table
ALL_PAIRS = [CPU_ONLY, *TWO_ENTRIES]

# model -> ([(table, rows, dim, default value)], cache ratio, policy). ranking's small caches evict under the
# concurrent load; retrieval's hold the whole table, so residency is exact.
MODELS = {
    "ranking": ([("user", 1200, 16, 0.0), ("item", 3000, 32, -1.0), ("category", 300, 8, 0.5)], 0.2, "lru"),
    "retrieval": ([("query_token", 2000, 24, 0.25), ("document", 1500, 64, 0.0)], 1.0, "lfu"),
}
# A cache ratio of 1.0 makes retrieval's tables resident (every key held on every device from the start); the tests
# of per-device cache contents use a learning cache instead, large enough that the keys they look up never evict.
LEARNING = {"retrieval": 0.9}


class VecRef:
    """The rows a lookup must return: the table's row for a known key, its default vector otherwise (vectorised)."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, default: float) -> None:
        order = np.argsort(keys)
        self.keys, self.rows = keys[order].copy(), vectors[order].copy()
        self.dim = vectors.shape[1]
        self.default = np.float32(default)

    def lookup(self, keys) -> np.ndarray:
        q = np.asarray(keys, dtype=np.int64)
        flat = q.reshape(-1)
        pos = np.searchsorted(self.keys, flat).clip(0, self.keys.size - 1)
        hit = self.keys[pos] == flat
        out = np.full((flat.size, self.dim), self.default, dtype=np.float32)
        out[hit] = self.rows[pos[hit]]
        return out.reshape(*q.shape, self.dim)

    def update(self, keys, rows) -> None:
        keys = np.concatenate([self.keys, np.asarray(keys, dtype=np.int64)])
        rows = np.concatenate([self.rows, np.asarray(rows, dtype=np.float32)])
        # last occurrence wins: unique over the reversed arrays keeps the first of each, i.e. the last written
        uniq, first = np.unique(keys[::-1], return_index=True)
        self.keys, self.rows = uniq, rows[::-1][first]


def devices_of(pair) -> tuple[torch.device, torch.device]:
    return torch.device(pair[0]), torch.device(pair[1])


def deployed_list(pair) -> list[int]:
    """deployed_device_list for a pair: the GPU ordinals in it; [0, 1] on a CPU-only machine (served from the CPU)."""
    ordinals = sorted({torch.device(d).index for d in pair if torch.device(d).type == "cuda"})
    return ordinals or [0, 1]


def deployment(tmp_path, rng, device_list, tiers=("host_memory",), mode="dynamic", ratios=None):
    """Both models of MODELS on `device_list`, caches of type `mode` (`ratios`: model -> cache ratio overrides).

    Returns (config dict, {(model, table): VecRef}).
    """
    refs, models = {}, {}
    for model, (tables, ratio, policy) in MODELS.items():
        ratio = (ratios or {}).get(model, ratio)
        tcfgs = []
        for name, rows, dim, default in tables:
            path = tmp_path / "tables" / model / name
            keys, vectors = make_table(path, rows, dim, rng)
            refs[(model, name)] = VecRef(keys, vectors, default)
            tcfgs.append({"name": name, "path": str(path), "dim": dim, "max_keys_per_sample": 64,
                          "default_value": default})
        models[model] = {"tables": tcfgs, "max_batch_size": 64, "deployed_device_list": list(device_list),
                         # > 1: inserts are synchronous, so every lookup is exact (no defaults for async misses)
                         "cache": {"ratio": ratio, "policy": policy, "hit_rate_threshold": 1.1, "type": mode}}
    host = {"enabled": True, "num_partitions": 4}
    if "rocksdb" in tiers:
        # RocksDB holds the tables; host memory keeps <= 4 x 150 rows per table and is refilled from RocksDB by
        # both devices' misses at once (cache_missed_embeddings).
        host.update(overflow_margin=150, overflow_policy="evict_least_used", cache_missed_embeddings=True)
    cfg = {"key_dtype": "int64", "models": models,
           "tiers": {"host_memory": host,
                     "rocksdb": {"enabled": "rocksdb" in tiers, "path": str(tmp_path / "rocksdb")}}}
    return cfg, refs


def make_engine(cfg) -> HierarchicalParameterServer:
    """The engine; without CUDA it must say (once) that the deployed ordinals are served from the CPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hps = HierarchicalParameterServer(cfg, progress=False)
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning) and "no CUDA device" in str(w.message)]
    if NO_CUDA:
        first = next(iter(cfg["models"]))
        assert len(fallback) == 1, [str(w.message) for w in caught]
        assert (f"deployed_device_list {cfg['models'][first]['deployed_device_list']} of model {first!r} "
                "is served from the CPU") in str(fallback[0].message)
    else:
        assert not fallback
    return hps


def run_per_device(jobs, timeout: float = 300) -> list:
    """Run fn(device) for each (device, fn) in `jobs`, one thread each, all released together by a barrier.

    A GPU thread makes its device current and issues its work on a stream of its own, as a server's per-GPU
    worker does. Returns the results in job order; re-raises the first failure with its traceback.
    """
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def body(i, device, fn):
        try:
            stream = None
            if device.type == "cuda":
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
            barrier.wait(timeout=120)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                results[i] = fn(device)
            if stream is not None:
                stream.synchronize()
        except BaseException:  # noqa: BLE001 - reported to the test thread
            errors.append(f"job {i} on {device}:\n{traceback.format_exc()}")
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i, d, fn), daemon=True) for i, (d, fn) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a per-device thread did not finish within {timeout} s"
    assert not errors, errors[0]
    return results


def key_pools(refs, rng, tables):
    """Per table: keys only device 0 asks for, keys only device 1 asks for, and keys both ask for."""
    pools = {}
    for key in tables:
        known = refs[key].keys.copy()
        rng.shuffle(known)
        a, b = int(known.size * 0.4), int(known.size * 0.8)
        pools[key] = (np.concatenate([known[:a], known[b:]]), known[a:])  # device 0, device 1 (overlap known[b:])
    return pools


def contains(cr, keys: np.ndarray) -> np.ndarray:
    return cr.contains(torch.from_numpy(keys).to(cr.device)).cpu().numpy()


def cached_rows(cr) -> dict[int, np.ndarray]:
    keys, values = cr.export_all()
    return dict(zip(keys.cpu().tolist(), values.cpu().numpy()))


# ------------------------------------------------------------------------------------------------ (a) concurrency


@pytest.mark.parametrize("tiers", [("host_memory",), ("host_memory", "rocksdb")], ids=["host", "host+rocksdb"])
@pytest.mark.parametrize("pair", ALL_PAIRS)
def test_concurrent_lookups_one_thread_per_device(tmp_path, rng, pair, tiers):
    """One thread per device, started together, several hundred batches each over the three ranking tables (keys of
    its own plus keys both ask for, 5% unknown keys): every result equals the numpy reference; afterwards the same
    keys from the CPU engine equal the device results; each device's counters count exactly its own lookups."""
    dev = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair), tiers)
    tables = [("ranking", name) for name, *_ in MODELS["ranking"][0]]
    pools = key_pools(refs, rng, tables)
    plan = [(300, (25, 8)), (240, (16, 10))]  # (batches, key shape) per device: unequal, so counters can't swap

    def worker(i):
        batches, shape = plan[i]
        g = np.random.default_rng(100 + i)

        def run(device):
            counts = {t: [0, 0] for t in tables}
            bad, sample = [], []
            for b in range(batches):
                model, name = tables[b % len(tables)]
                q = g.choice(pools[(model, name)][i], size=shape)
                unknown = g.random(shape) < 0.05
                q[unknown] = g.integers(-(1 << 62), 1 << 62, size=int(unknown.sum()))
                out = hps.lookup(model, name, torch.from_numpy(q).to(device))
                if out.device != device or out.shape != (*shape, refs[(model, name)].dim):
                    bad.append((b, model, name, str(out.device), tuple(out.shape)))
                elif not np.array_equal(out.cpu().numpy(), refs[(model, name)].lookup(q)):
                    bad.append((b, model, name, "rows differ from the reference"))
                counts[(model, name)][0] += 1
                counts[(model, name)][1] += q.size
                if b % 30 == 0:
                    sample.append((model, name, q, out))
            return counts, bad, sample
        return run

    with make_engine(cfg) as hps:
        results = run_per_device([(dev[0], worker(0)), (dev[1], worker(1))])
        for i, (counts, bad, _) in enumerate(results):
            assert not bad, f"device {dev[i]}: {len(bad)} wrong batches, first {bad[:3]}"
        stats = hps.stats()["models"]["ranking"]
        for t in tables:
            want = {}
            for i, (counts, _, _) in enumerate(results):
                w = want.setdefault(str(dev[i]), [0, 0])
                w[0] += counts[t][0]
                w[1] += counts[t][1]
            s = stats[t[1]]
            assert set(want) <= set(s), (t, sorted(s))
            for d, (lookups, keys) in want.items():
                assert (s[d]["lookups"], s[d]["keys"]) == (lookups, keys), (t, d, s[d])
                assert s[d]["cache_hits"] + s[d]["cache_misses"] == keys
                assert s[d]["cache_hits"] > 0 and s[d]["evictions"] > 0  # repeats hit; a 20% cache evicts
        # The CPU engine (CPU keys) answers the same keys with the same rows.
        for _, _, sample in results:
            for model, name, q, out in sample:
                np.testing.assert_array_equal(hps.lookup(model, name, torch.from_numpy(q)).numpy(), out.cpu().numpy())


# ------------------------------------------------------------------------------------------------ (b) independence


@pytest.mark.parametrize("pair", TWO_ENTRIES)
def test_caches_are_independent_per_device(tmp_path, rng, pair):
    """Keys looked up on one device only are resident there and nowhere else; keys looked up on both are in both."""
    a, b = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair), ratios=LEARNING)
    known = refs[("retrieval", "document")].keys.copy()
    rng.shuffle(known)
    k_a, k_b, k_both = known[:100], known[100:200], known[200:260]
    with make_engine(cfg) as hps:
        rt = hps.table("retrieval", "document")
        hps.lookup("retrieval", "document", torch.from_numpy(k_b).to(b))
        hps.lookup("retrieval", "document", torch.from_numpy(k_a).to(a))
        for d in (a, b):
            out = hps.lookup("retrieval", "document", torch.from_numpy(k_both).to(d))
            np.testing.assert_array_equal(out.cpu().numpy(), refs[("retrieval", "document")].lookup(k_both))
        assert set(rt.caches) >= {a, b}
        ca, cb = rt.caches[a], rt.caches[b]
        assert ca is not cb and ca.native is not cb.native
        assert ca.device == a and cb.device == b
        assert contains(ca, k_a).all() and contains(ca, k_both).all() and not contains(ca, k_b).any()
        assert contains(cb, k_b).all() and contains(cb, k_both).all() and not contains(cb, k_a).any()
        assert ca.size() == cb.size() == 160  # nothing else got in
        # The other tables' caches saw none of it.
        for name in ("query_token",):
            for cr in hps.table("retrieval", name).caches.values():
                assert cr.size() == 0
        for name, *_ in MODELS["ranking"][0]:
            for cr in hps.table("ranking", name).caches.values():
                assert cr.size() == 0


# ------------------------------------------------------------------------------------------------ (c) update


@pytest.mark.parametrize("pair", TWO_ENTRIES)
def test_update_reaches_every_device(tmp_path, rng, pair):
    """update() writes the tiers and assigns the new rows in every device's cache that holds the key (and inserts
    them nowhere); afterwards both devices return the new rows, un-updated keys keep their old rows."""
    a, b = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair), ("host_memory", "rocksdb"), ratios=LEARNING)
    ref = refs[("retrieval", "document")]
    known = ref.keys.copy()
    rng.shuffle(known)
    k_a, k_b, k_both, cold = known[:100], known[100:200], known[200:260], known[300:330]
    fresh = np.array([1 << 50, (1 << 50) + 1, -(1 << 50)], dtype=np.int64)  # not in the table
    upd = np.concatenate([k_a[:30], k_b[:30], k_both[:30], cold, fresh])
    new = rng.standard_normal((upd.size, ref.dim)).astype(np.float32)
    with make_engine(cfg) as hps:
        rt = hps.table("retrieval", "document")
        hps.lookup("retrieval", "document", torch.from_numpy(np.concatenate([k_a, k_both])).to(a))
        hps.lookup("retrieval", "document", torch.from_numpy(np.concatenate([k_b, k_both])).to(b))
        old = ref.lookup(known[:300])
        hps.update("retrieval", "document", torch.from_numpy(upd), torch.from_numpy(new))
        ref.update(upd, new)
        want = dict(zip(upd.tolist(), new))
        # The caches, before any lookup can re-fill them: new rows where the key was resident, no new residents.
        for cr, mine, other in ((rt.caches[a], k_a, k_b), (rt.caches[b], k_b, k_a)):
            rows = cached_rows(cr)
            for k in np.concatenate([mine[:30], k_both[:30]]).tolist():
                np.testing.assert_array_equal(rows[k], want[k], err_msg=f"{cr.device}: key {k} kept its old row")
            for k in np.concatenate([mine[30:], k_both[30:]]).tolist():
                np.testing.assert_array_equal(rows[k], ref.lookup([k])[0])  # untouched rows unchanged
            assert not contains(cr, np.concatenate([other, cold, fresh])).any()  # update assigns, never inserts
            assert cr.stats(None)["updates"] == 1 and cr.size() == 160
        for tier in hps.tiers:  # every row a tier holds is the new one; RocksDB (no overflow) holds them all
            values, found = tier.fetch(rt.tag, torch.from_numpy(upd))
            assert bool(found.any()) and (tier.name != "rocksdb" or bool(found.all())), tier.name
            np.testing.assert_array_equal(values.numpy()[found.numpy()], new[found.numpy()], err_msg=tier.name)
        assert [t.name for t in hps.tiers] == ["host_memory", "rocksdb"]
        # Lookups on both devices (and the CPU engine) see the new rows; the others are unchanged.
        for d in (a, b, torch.device("cpu")):
            out = hps.lookup("retrieval", "document", torch.from_numpy(upd).to(d))
            np.testing.assert_array_equal(out.cpu().numpy(), new, err_msg=str(d))
            rest = np.setdiff1d(known[:300], upd)
            out = hps.lookup("retrieval", "document", torch.from_numpy(rest).to(d))
            np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(rest))
        assert not np.array_equal(old, ref.lookup(known[:300]))  # the update did change rows


@pytest.mark.parametrize("pair", ALL_PAIRS)
def test_updates_during_lookups_on_every_device(tmp_path, rng, pair):
    """One reader thread per device and a writer updating rows whose every element is a version number: no device
    ever returns a torn row; once the writer is done, every device returns the last rows and every cache holds them."""
    a, b = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair))
    keys = refs[("ranking", "item")].keys[:300].copy()
    dim = refs[("ranking", "item")].dim
    versions = 40
    stop = threading.Event()
    with make_engine(cfg) as hps:
        hps.update("ranking", "item", torch.from_numpy(keys), torch.zeros(keys.size, dim))

        def reader(seed):
            def run(device):
                g = np.random.default_rng(seed)
                dev_keys = torch.from_numpy(keys).to(device)
                n = 0
                while not stop.is_set() or n < 20:
                    out = hps.lookup("ranking", "item", dev_keys[torch.from_numpy(g.integers(0, keys.size, 200))
                                                                 .to(device)])
                    lo, hi = out.min(dim=1).values, out.max(dim=1).values
                    assert torch.equal(lo, hi), f"torn row on {device}"
                    assert 0 <= float(lo.min()) and float(hi.max()) <= versions
                    n += 1
                return n
            return run

        def writer(_device):
            g = np.random.default_rng(7)
            for v in range(1, versions + 1):
                sel = keys[g.choice(keys.size, 150, replace=False)]
                hps.update("ranking", "item", torch.from_numpy(sel), torch.full((150, dim), float(v)))
            stop.set()

        reads = run_per_device([(a, reader(1)), (b, reader(2)), (torch.device("cpu"), writer)])
        assert reads[0] >= 20 and reads[1] >= 20
        last, _ = hps.tiers[0].fetch("hps_et.ranking.item", torch.from_numpy(keys))
        assert float(last.max()) > 0
        rt = hps.table("ranking", "item")
        for d in (a, b):
            out = hps.lookup("ranking", "item", torch.from_numpy(keys).to(d))
            np.testing.assert_array_equal(out.cpu().numpy(), last.numpy(), err_msg=str(d))
        by_key = dict(zip(keys.tolist(), last.numpy()))
        for d in {a, b}:
            for k, row in cached_rows(rt.caches[d]).items():
                if k in by_key:
                    np.testing.assert_array_equal(row, by_key[k], err_msg=f"{d}: cached key {k}")


@pytest.mark.parametrize("mode", ["static", "uvm"])
@pytest.mark.parametrize("pair", ALL_PAIRS)
def test_static_and_host_mapped_tables_on_every_device(tmp_path, rng, pair, mode):
    """static (the whole table on each device) and uvm (one pinned host copy read by every device): concurrent
    per-device lookups equal the reference, and an update reaches every device."""
    a, b = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair), mode=mode)
    ref = refs[("ranking", "item")]
    with make_engine(cfg) as hps:
        def run(device):
            g = np.random.default_rng(device.index or 0)
            for _ in range(100):
                q = g.choice(ref.keys, size=(20, 10))
                q[0, :3] = [5, -5, 1 << 62]  # unknown keys: the default row
                out = hps.lookup("ranking", "item", torch.from_numpy(q).to(device))
                assert out.device == device
                np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
        run_per_device([(a, run), (b, run)])
        rt = hps.table("ranking", "item")
        assert {a, b} <= set(rt.caches) and all(cr.device == d for d, cr in rt.caches.items())
        if mode == "uvm":  # one pinned host copy of the rows, whatever the number of GPUs
            gpus = [cr for cr in rt.caches.values() if cr.device.type == "cuda"]
            assert len({cr.native.rows_ptr() for cr in gpus}) == min(len(gpus), 1)
        upd = ref.keys[:64]
        new = rng.standard_normal((64, ref.dim)).astype(np.float32)
        hps.update("ranking", "item", torch.from_numpy(upd), torch.from_numpy(new))
        for d in (a, b):
            out = hps.lookup("ranking", "item", torch.from_numpy(upd).to(d))
            np.testing.assert_array_equal(out.cpu().numpy(), new, err_msg=str(d))


# ------------------------------------------------------------------------------------------------ (d) stats


@pytest.mark.parametrize("pair", TWO_ENTRIES)
def test_stats_report_each_device_separately(tmp_path, rng, pair):
    """stats() has one entry per device; a lookup on one device moves only that device's counters, and each
    entry's counters agree with what was asked of that device."""
    a, b = devices_of(pair)
    cfg, refs = deployment(tmp_path, rng, deployed_list(pair), ratios=LEARNING)
    ref = refs[("retrieval", "query_token")]
    known = ref.keys.copy()
    rng.shuffle(known)
    x = np.concatenate([known[:50], np.arange(10, dtype=np.int64) + (1 << 45)])  # 50 known, 10 unknown keys
    y = known[50:80]
    with make_engine(cfg) as hps:
        hps.lookup("retrieval", "query_token", torch.from_numpy(x).to(a))
        hps.lookup("retrieval", "query_token", torch.from_numpy(y).to(b))
        s1 = hps.stats()["models"]["retrieval"]["query_token"]
        hps.lookup("retrieval", "query_token", torch.from_numpy(x).to(a))  # all hits now
        s2 = hps.stats()["models"]["retrieval"]["query_token"]
        sa, sb = s1[str(a)], s1[str(b)]
        assert (sa["lookups"], sa["keys"], sa["cache_hits"], sa["cache_misses"], sa["unique_misses"]) == (1, 60, 0, 60,
                                                                                                          60)
        assert sum(sa["tier_hits"].values()) == 50 and sa["defaults_served"] == 10
        assert sa["inserts"] == sa["cache_size"] == 60 and sa["evictions"] == 0  # misses, default rows included
        assert (sb["lookups"], sb["keys"], sb["cache_misses"], sum(sb["tier_hits"].values())) == (1, 30, 30, 30)
        assert sb["inserts"] == sb["cache_size"] == 30 and sb["defaults_served"] == 0
        assert s2[str(b)]["lookups"] == 1 and s2[str(b)]["keys"] == 30  # a's lookup left b alone
        sa2 = s2[str(a)]
        assert (sa2["lookups"], sa2["keys"], sa2["cache_hits"], sa2["cache_misses"]) == (2, 120, 60, 60)
        assert sa2["hit_rate"] == 0.5 and sa2["inserts"] == 60
        for d in (a, b):
            entry = s2[str(d)]
            assert entry["mode"] == "dynamic" and entry["cache_size"] <= entry["cache_slots"]
            assert entry["cache_memory_bytes"] >= entry["cache_slots"] * ref.dim * 4


# ------------------------------------------------------------------------------------------------ (e) bad ordinal


@pytest.mark.cuda
@pytest.mark.skipif(NO_CUDA, reason="CUDA is not available (without a GPU every ordinal is served from the CPU)")
def test_deploying_on_a_missing_gpu_raises(tmp_path, rng):
    """A deployed_device_list naming a GPU that does not exist fails at start, naming the model and the ordinal."""
    cfg, _ = deployment(tmp_path, rng, [0])
    cfg["models"]["retrieval"]["deployed_device_list"] = [0, GPUS]
    with pytest.raises(ValueError, match=rf"models\.retrieval\.deployed_device_list: device {GPUS} does not exist "
                                         rf"\({GPUS} CUDA devices visible\)"):
        HierarchicalParameterServer(cfg, progress=False)
    # Nothing half-built is left behind: the same deployment on existing devices starts and serves.
    cfg["models"]["retrieval"]["deployed_device_list"] = [0]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        assert set(hps.table("retrieval", "document").caches) == {torch.device("cuda", 0)}


@pytest.mark.cuda
@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs, {GPUS} visible")
def test_lookup_on_a_gpu_the_model_is_not_deployed_on_raises(tmp_path, rng):
    """Keys on cuda:1 for a model deployed on [0] only: an error naming the device, no cache made there."""
    cfg, refs = deployment(tmp_path, rng, [0])
    keys = torch.from_numpy(refs[("ranking", "user")].keys[:8].copy())
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        with pytest.raises(ValueError,
                           match=r"model 'ranking' is not deployed on cuda:1 \(deployed_device_list \[0\]\)"):
            hps.lookup("ranking", "user", keys.to("cuda:1"))
        assert set(hps.table("ranking", "user").caches) == {torch.device("cuda", 0)}
        np.testing.assert_array_equal(hps.lookup("ranking", "user", keys.cuda(0)).cpu().numpy(),
                                      refs[("ranking", "user")].lookup(keys.numpy()))


# ------------------------------------------------------------------------------------------------ conf/two_gpu.yaml


def _compose_two_gpu(tmp_path, monkeypatch, rng, overrides=()):
    """conf/two_gpu.yaml composed with HPS_DATA_DIR=tmp_path, its table files written there; returns (cfg, refs)."""
    from hydra import compose, initialize_config_dir

    from hps_core.config import load_config, register_configs

    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path))
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = load_config(compose(config_name="two_gpu", overrides=list(overrides)))
    refs = {}
    for model, m in cfg.models.items():
        for t in m.tables:
            assert t.path.startswith(str(tmp_path))
            keys, vectors = make_table(t.path, 500, t.dim, rng)
            refs[(model, t.name)] = VecRef(keys, vectors, t.default_value)
    return cfg, refs


def test_two_gpu_config_composes_like_the_overrides(monkeypatch, tmp_path):
    """conf/two_gpu.yaml == the default config with the demo model swapped for the two two-GPU models."""
    from hydra import compose, initialize_config_dir

    from hps_core.config import load_config, register_configs

    monkeypatch.setenv("HPS_DATA_DIR", str(tmp_path))
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        whole = load_config(compose(config_name="two_gpu"))
        by_overrides = load_config(compose(config_name="config", overrides=[
            "~model@models.demo", "+model@models.ranking=two_gpu_ranking",
            "+model@models.retrieval=two_gpu_retrieval"]))
    assert whole == by_overrides
    assert list(whole.models) == ["ranking", "retrieval"]
    assert [len(m.tables) for m in whole.models.values()] == [3, 2]
    assert all(m.deployed_device_list == [0, 1] for m in whole.models.values())
    assert whole.models["ranking"].tables[1].path == f"{tmp_path}/ranking/item"


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is visible (the GPU variant below covers it)")
def test_two_gpu_config_on_a_cpu_only_machine(tmp_path, monkeypatch, rng):
    cfg, refs = _compose_two_gpu(tmp_path, monkeypatch, rng)
    with pytest.warns(RuntimeWarning, match=r"deployed_device_list \[0, 1\] of model 'ranking' is served from the CPU"):
        hps = HierarchicalParameterServer(cfg, progress=False)
    with hps:
        for (model, name), ref in refs.items():
            assert set(hps.table(model, name).caches) == {torch.device("cpu")}
            q = np.concatenate([ref.keys[:40], ref.keys[:10], [7, -7]])
            np.testing.assert_array_equal(hps.lookup(model, name, torch.from_numpy(q)).numpy(), ref.lookup(q))
        assert all(list(t) == ["cpu"] for m in hps.stats()["models"].values() for t in m.values())


@pytest.mark.cuda
@pytest.mark.skipif(NO_CUDA, reason="CUDA is not available")
def test_two_gpu_config_on_gpus(tmp_path, monkeypatch, rng):
    """>= 2 GPUs: every table has a cache on cuda:0 and cuda:1, both serve the reference rows. One GPU: the config
    is refused naming ordinal 1, and the one-GPU override ([0]) serves."""
    overrides = [] if GPUS >= 2 else ["models.ranking.deployed_device_list=[0]",
                                      "models.retrieval.deployed_device_list=[0]"]
    if GPUS < 2:
        cfg, _ = _compose_two_gpu(tmp_path, monkeypatch, rng)
        with pytest.raises(ValueError, match=r"models\.ranking\.deployed_device_list: device 1 does not exist"):
            HierarchicalParameterServer(cfg, progress=False)
    cfg, refs = _compose_two_gpu(tmp_path / "run", monkeypatch, rng, overrides)
    devices = [torch.device("cuda", i) for i in range(min(GPUS, 2))]
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for (model, name), ref in refs.items():
            assert set(hps.table(model, name).caches) == set(devices)
            q = np.concatenate([ref.keys[:40], ref.keys[:10], [7, -7]])
            for d in devices:
                out = hps.lookup(model, name, torch.from_numpy(q).to(d))
                assert out.device == d
                np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q))
