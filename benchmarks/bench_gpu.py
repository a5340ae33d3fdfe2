"""GPU benchmarks of the issue-4 workloads, each with its baseline measured in the same run.

    python -m benchmarks.bench_gpu --out results.json [--only p1,p2,p3,p4,mem] [--quick]

P1  hit path: dim 128 fp32, 3,407,872 keys per call (DLRM batch 131072 x 26), all keys cached;
    baseline torch.nn.functional.embedding on precomputed row indices (no hashing).
P2  HPS profiler workload: 2,000 keys per query, power law alpha 1.2 over 630,000 rows, dim 16, cache 90% of rows,
    engine lookups end to end (host tier below): mean / p99 latency per lookup and hit rate.
P3  miss path: useful row bytes per second fetched from pinned host memory (host-mapped gather; engine tier path).
P4  10% cache, Zipf alpha 1.05, 32.7 M x 128 table in the host tier, 3.4 M keys per call: keys/s and hit rate.
MEM GPU memory of a cache of N rows vs N x row bytes.

Times come from CUDA events (median of repeats after warm-up); host-side end-to-end latencies use
perf_counter around a synchronised call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from benchmarks.common import (DLRM_KEYS, commit, cpu_model, cuda_time_ms, gpu_info, write_synthetic_table,
                               zipf_ranks)


def env_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
    }
    info.update(gpu_info())
    return info


def unique_keys(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """n distinct random int64 keys spread over the whole int64 range."""
    keys = torch.randint(-(2**62), 2**62, (int(n * 1.05) + 16,), generator=gen, dtype=torch.int64)
    keys = torch.unique(keys)
    return keys[torch.randperm(keys.numel(), generator=gen)[:n]].to(device)


def bench_p1(quick: bool) -> dict:
    from hps_core.cache import EmbeddingCache

    dev = torch.device("cuda")
    dim, n = 128, DLRM_KEYS
    rows = 4_000_000 if not quick else 500_000
    gen = torch.Generator().manual_seed(1)
    keys = unique_keys(rows, gen, dev)
    table = torch.randn(rows, dim, device=dev)
    cache = EmbeddingCache(rows * 2, dim, device=dev)  # load 0.5: bucket overflow (refusal) is negligible
    for s in range(0, rows, 1 << 20):
        cache.insert_or_assign(keys[s:s + (1 << 20)], table[s:s + (1 << 20)])
    resident = int(cache.contains(keys).sum())
    idx_sets = [torch.randint(0, rows, (n,), device=dev) for _ in range(4)]
    query_sets = [keys[i] for i in idx_sets]
    it = iter(range(1 << 30))

    def find():
        k = query_sets[next(it) % 4]
        return cache.find(k)

    def emb():
        return torch.nn.functional.embedding(idx_sets[next(it) % 4], table)

    # correctness of what is timed: every query key resident -> found, values equal the table rows
    out, found = cache.find(query_sets[0])
    ok_rows = found & (out == table[idx_sets[0]]).all(dim=1)
    t_find = cuda_time_ms(find)
    t_emb = cuda_time_ms(emb)
    useful = n * dim * 4 * 2  # row bytes read + written
    res = {
        "keys_per_call": n, "dim": dim, "rows_cached": rows, "cache_slots": cache.num_slots, "resident": resident,
        "found_fraction": float(found.float().mean()), "rows_equal_fraction": float(ok_rows.float().mean()),
        "find": t_find, "find_gkeys_s": n / t_find["median_ms"] / 1e6, "find_row_gbs": useful / t_find["median_ms"] / 1e6,
        "f_embedding": t_emb, "f_embedding_gkeys_s": n / t_emb["median_ms"] / 1e6,
        "speedup_vs_f_embedding": t_emb["median_ms"] / t_find["median_ms"],
    }
    # small batches (per-call overhead): 26,624 keys = batch 1024 x 26
    small = [k[:26624].contiguous() for k in query_sets]
    small_idx = [i[:26624].contiguous() for i in idx_sets]
    res["find_26624"] = cuda_time_ms(lambda: cache.find(small[next(it) % 4]), repeat=50)
    res["f_embedding_26624"] = cuda_time_ms(
        lambda: torch.nn.functional.embedding(small_idx[next(it) % 4], table), repeat=50)
    return res


def _engine(tmp: str, rows: int, dim: int, ratio: float, keys_per_call: int, threshold: float = 1.0,
            key_range: int = 1 << 40, policy: str = "lru", seed: int = 0):
    from hps_core.engine import HierarchicalParameterServer

    rng = np.random.default_rng(seed)
    keys = rng.choice(key_range, size=rows, replace=False).astype(np.int64) if rows < 5_000_000 else (
        np.random.default_rng(seed).permutation(rows).astype(np.int64) * 7919 + 13)
    path = os.path.join(tmp, f"t_{rows}_{dim}")
    _, vectors = write_synthetic_table(path, keys, dim, seed)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": path, "dim": dim, "max_keys_per_sample": keys_per_call}],
                         "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"ratio": ratio, "hit_rate_threshold": threshold, "policy": policy}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": 16}},
    }
    return HierarchicalParameterServer(cfg, progress=False), keys, vectors


def bench_p2(quick: bool) -> dict:
    """Synchronous insertion (hit_rate_threshold 1.0: exact results, every miss fetched) and, for reference, HPS's
    default threshold 0.9 (a batch whose key-position hit rate is >= 0.9 gets defaults for its misses and the
    insert worker fetches them)."""
    out = {"sync_threshold_1.0": _p2_run(quick, 1.0)}
    out["hps_default_threshold_0.9"] = _p2_run(quick, 0.9)
    return out


def _p2_run(quick: bool, threshold: float) -> dict:
    rows, dim, n = 630_000, 16, 2000
    iters, warm = (1000, 100) if not quick else (100, 20)
    with tempfile.TemporaryDirectory() as tmp:
        hps, keys, vectors = _engine(tmp, rows, dim, 0.9, n, threshold=threshold)
        rng = np.random.default_rng(7)
        order = rng.permutation(rows)  # popularity rank -> row
        queries = [torch.from_numpy(keys[order[zipf_ranks(rng, 1.2, n, rows)]]).cuda() for _ in range(iters + warm)]
        rt = hps.table("m", "t")
        cache = rt.caches[torch.device("cuda", 0)].cache
        lat, uniq_hits, uniq_total = [], 0, 0
        for i, q in enumerate(queries):
            if i >= warm:
                u = torch.unique(q)
                uniq_hits += int(cache.contains(u).sum())
                uniq_total += u.numel()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hps.lookup("m", "t", q)
            torch.cuda.synchronize()
            if i >= warm:
                lat.append(time.perf_counter() - t0)
        # correctness on the last query (exact only with synchronous insertion)
        sorter = np.argsort(keys)
        pos = sorter[np.searchsorted(keys, q.cpu().numpy(), sorter=sorter)]
        want = torch.from_numpy(vectors[pos])
        equal = bool(torch.equal(out.cpu(), want))
        hps.wait_for_inserts()
        s = hps.stats()["models"]["m"]["t"]["cuda:0"]
        hps.close()
    ms = np.array(lat) * 1e3
    return {"keys_per_query": n, "rows": rows, "dim": dim, "cache_ratio": 0.9, "iterations": len(lat),
            "hit_rate_threshold": threshold, "defaults_served": s["defaults_served"],
            "mean_ms": float(ms.mean()), "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "hit_rate_unique_keys": uniq_hits / max(uniq_total, 1), "hit_rate_positions": s["hit_rate"],
            "last_query_equal": equal, "stage_latency": s["latency"],
            "hps_published": {"mean_ms": 0.231, "hit_rate": 0.844}}


def bench_p3(quick: bool) -> dict:
    """Miss path: rows fetched from host memory into the GPU."""
    res = {}
    dim = 128
    rows = 8_000_000 if not quick else 1_000_000
    n = DLRM_KEYS if not quick else 500_000
    try:
        from hps_core.table_modes import gather_rows

        host = torch.empty(rows, dim).pin_memory()
        host.uniform_()
        idx = [torch.randint(0, rows, (n,), device="cuda") for _ in range(4)]
        it = iter(range(1 << 30))
        want = host[idx[0].cpu()]
        for strategy in ("zero_copy", "staged", "auto"):
            ok = bool(torch.equal(gather_rows(host, idx[0], strategy).cpu(), want))
            t = cuda_time_ms(lambda: gather_rows(host, idx[next(it) % 4], strategy))
            res[f"host_mapped_gather_{strategy}"] = {"rows": n, "dim": dim, "time": t, "equal": ok,
                                                    "useful_gbs": n * dim * 4 / t["median_ms"] / 1e6,
                                                    "cpu_threads": torch.get_num_threads()}
        # the same zero-copy kernel on consecutive rows: separates "random rows" from "zero-copy reads" as the limit
        seq = torch.arange(n, device="cuda") % rows
        t = cuda_time_ms(lambda: gather_rows(host, seq, "zero_copy"))
        res["host_mapped_gather_consecutive_rows_zero_copy"] = {"time": t,
                                                                "useful_gbs": n * dim * 4 / t["median_ms"] / 1e6}
        # baseline in the same run: pinned H2D copy of the same bytes, contiguous
        staging = torch.empty(n, dim).pin_memory()
        dst = torch.empty(n, dim, device="cuda")
        tc = cuda_time_ms(lambda: dst.copy_(staging, non_blocking=True))
        res["pinned_h2d_copy_baseline"] = {"time": tc, "gbs": n * dim * 4 / tc["median_ms"] / 1e6}
    except Exception:  # noqa: BLE001 - reported, the rest still runs
        res["host_mapped_error"] = traceback.format_exc()
    # tier path: every key a cache miss, rows come from the host tier
    with tempfile.TemporaryDirectory() as tmp:
        trows = 2_000_000 if not quick else 200_000
        tn = 262_144 if not quick else 50_000
        hps, keys, vectors = _engine(tmp, trows, dim, 0.0001, tn, threshold=2.0)
        rng = np.random.default_rng(3)
        qs = [torch.from_numpy(rng.choice(keys, tn)).cuda() for _ in range(6)]
        for q in qs[:2]:
            hps.lookup("m", "t", q)
        torch.cuda.synchronize()
        # the miss path's host half alone: planning only (no source) and planning + host-map fetch
        none_found = torch.zeros(tn, dtype=torch.bool, device="cuda")
        handle = hps.tiers[0].map_handle(hps.table("m", "t").tag)
        split = {}
        for name, src in (("plan_only", -1), ("plan_and_fetch", handle)):
            times = []
            for q in qs[2:]:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.ops.hps.collect_misses(q, none_found, dim, src)
                times.append(time.perf_counter() - t0)
            split[f"{name}_ms"] = float(np.median(times) * 1e3)
        t0 = time.perf_counter()
        for q in qs[2:]:
            hps.lookup("m", "t", q)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 4
        s = hps.stats()["models"]["m"]["t"]["cuda:0"]
        hps.close()
    res["tier_path"] = {"keys_per_call": tn, "dim": dim, "ms_per_call": dt * 1e3, "collect_misses_split": split,
                        "useful_gbs": tn * dim * 4 / dt / 1e9, "hit_rate": s["hit_rate"],
                        "stage_latency": s["latency"]}
    return res


def bench_p4(quick: bool) -> dict:
    rows = 32_709_138 if not quick else 2_000_000
    dim, n = 128, DLRM_KEYS if not quick else 200_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("HPS_BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        hps, keys, _ = _engine(tmp, rows, dim, 0.1, n, threshold=1.0)
        setup_s = time.perf_counter() - t0
        rng = np.random.default_rng(11)
        batches = 8 if not quick else 4
        qs = [torch.from_numpy(keys[zipf_ranks(rng, 1.05, n, rows)]).cuda() for _ in range(batches)]
        for q in qs[:3]:
            hps.lookup("m", "t", q)  # warm the cache
        torch.cuda.synchronize()
        before = hps.stats()["models"]["m"]["t"]["cuda:0"]
        t0 = time.perf_counter()
        for q in qs[3:]:
            hps.lookup("m", "t", q)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / (batches - 3)
        after = hps.stats()["models"]["m"]["t"]["cuda:0"]
        hps.close()
    hits = after["cache_hits"] - before["cache_hits"]
    total = after["keys"] - before["keys"]
    return {"rows": rows, "dim": dim, "keys_per_call": n, "cache_ratio": 0.1, "setup_s": setup_s,
            "ms_per_call": dt * 1e3, "keys_per_s": n / dt, "hit_rate": hits / max(total, 1),
            "stage_latency": after["latency"]}


def bench_mem(quick: bool) -> dict:
    from hps_core.cache import EmbeddingCache

    out = []
    for rows, dim in [(1_000_000, 16), (1_000_000, 128), (10_000_000, 128)]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache = EmbeddingCache(rows, dim, device="cuda")
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - before
        out.append({"rows": rows, "dim": dim, "slots": cache.num_slots, "bytes": used,
                    "rows_x_row_bytes": rows * dim * 4,
                    "overhead_bytes_per_slot": (used - cache.num_slots * dim * 4) / cache.num_slots})
        del cache
    return {"caches": out}


BENCHES = {"p1": bench_p1, "p2": bench_p2, "p3": bench_p3, "p4": bench_p4, "mem": bench_mem}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_results.json")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    results = {"env": env_info(), "quick": args.quick}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = BENCHES[name](args.quick)
        except Exception:  # noqa: BLE001 - one failure must not lose the other numbers
            results[name] = {"error": traceback.format_exc()}
        results[name]["wall_s"] = time.perf_counter() - t0
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"[{name}] {json.dumps(results[name], default=str)[:1500]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
