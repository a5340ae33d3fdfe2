"""`bench=tiers`: fetch rates of the storage tiers side by side: host-memory map, a local Redis Cluster (started
here on free loopback ports, stopped by PID), RocksDB. Every tier holds the same rows (loaded from the same table
files through its own `load`, encoded to each storage of `storages`) and answers the same batches of random
existing keys; the rows it returns are checked byte for byte against the encoded table.

Timed: `tier.fetch(tag, keys)` with int64 CPU keys, as the engine calls it. Batches rotate through the tiers (one
batch per tier in turn) so that load changes on a shared machine hit all tiers alike. A tier that cannot run here
(redis-server missing) is skipped with the reason recorded.
"""

from __future__ import annotations

import itertools
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import distinct_keys, latency_summary, redis_fixture, write_synthetic_table
from benchmarks.suite.config import TiersBench
from benchmarks.suite.report import save_figure
from hps_core.storage import encode_rows

log = logging.getLogger(__name__)

LABELS = {"host_memory": "host memory (C++ map)", "redis_cluster": "Redis Cluster (local)", "rocksdb": "RocksDB"}


def _open_tiers(cfg: TiersBench, work: pathlib.Path, stack, skipped: dict[str, str]) -> dict[str, Any]:
    tiers: dict[str, Any] = {}
    if "host_memory" in cfg.backends:
        from hps_core.tiers.host_memory import HostMemoryTier

        tiers["host_memory"] = stack.enter_context(HostMemoryTier(max_batch_size=max(cfg.batch_keys)))
    if "redis_cluster" in cfg.backends:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            skipped["redis_cluster"] = "redis-server/redis-cli not installed (apt-get install redis-server)"
        else:
            try:
                from hps_core.tiers.redis_cluster import RedisClusterTier
            except ImportError as exc:
                skipped["redis_cluster"] = f"Redis tier not importable: {exc}"
            else:
                cluster = stack.enter_context(redis_fixture().LocalRedisCluster(work / "redis", cfg.redis_nodes))
                tiers["redis_cluster"] = stack.enter_context(RedisClusterTier(
                    cluster.addresses, num_partitions=cfg.redis_partitions, num_node_connections=4))
                tiers["redis_cluster"].bench_info = {"nodes": cfg.redis_nodes, "addresses": cluster.addresses}
    if "rocksdb" in cfg.backends:
        from hps_core.tiers.rocksdb import RocksDBTier

        threads = cfg.rocksdb_threads or (os.cpu_count() or 1)
        tiers["rocksdb"] = stack.enter_context(RocksDBTier(work / "rocksdb", num_threads=threads))
    return tiers


def run(cfg: TiersBench, device: torch.device, out_dir: str) -> dict[str, Any]:
    import contextlib

    rng = np.random.default_rng(cfg.seed)
    keys = distinct_keys(rng, cfg.rows, 2**62, -(2**62))
    skipped: dict[str, str] = {}
    points: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    work = pathlib.Path(tempfile.mkdtemp(prefix="hps_bench_tiers_"))
    try:
        with contextlib.ExitStack() as stack:
            tiers = _open_tiers(cfg, work, stack, skipped)
            for dim, storage in itertools.product(cfg.dims, cfg.storages):
                files, vectors = write_synthetic_table(work / f"t{dim}", keys, dim, seed=cfg.seed + dim)
                stored = encode_rows(torch.from_numpy(np.ascontiguousarray(vectors)), storage).view(torch.uint8)
                tag = f"hps_et.bench.t{dim}_{storage}"
                for name, tier in tiers.items():
                    tier.create_table(tag, dim, storage)
                    t0 = time.perf_counter()
                    loaded = tier.load(tag, files, progress=False, storage=storage)  # encodes as it loads
                    dt = time.perf_counter() - t0
                    loads.append({"tier": name, "dim": dim, "storage": storage, "rows": loaded, "seconds": dt,
                                  "rows_per_s": loaded / dt})
                    # One pass over every key (untimed): RocksDB's block cache and the OS page cache start warm,
                    # as in a server that has been running, so the figure is the fetch path, not the first read.
                    for s in range(0, cfg.rows, 65536):
                        tier.fetch(tag, torch.from_numpy(keys[s:s + 65536]))
                for n in cfg.batch_keys:
                    brng = np.random.default_rng([cfg.seed, dim, n])
                    batches = [brng.integers(0, cfg.rows, n) for _ in range(cfg.batches + cfg.warmup)]
                    qs = [torch.from_numpy(keys[b]) for b in batches]
                    # Check what is timed: every tier returns the stored rows of the first batch.
                    equal = {}
                    for name, tier in tiers.items():
                        values, found = tier.fetch(tag, qs[0])
                        equal[name] = bool(found.all()) and torch.equal(values.view(torch.uint8),
                                                                        stored[torch.from_numpy(batches[0])])
                    times: dict[str, list[float]] = {name: [] for name in tiers}
                    for i, q in enumerate(qs):
                        for name, tier in tiers.items():
                            t0 = time.perf_counter()
                            tier.fetch(tag, q)
                            if i >= cfg.warmup:
                                times[name].append(time.perf_counter() - t0)
                    for name in tiers:
                        t = np.asarray(times[name])
                        points.append({"tier": name, "dim": dim, "storage": storage, "batch_keys": n,
                                       **latency_summary(t),
                                       "keys_per_s": n / float(np.median(t)), "rows_equal": equal[name]})
                        log.info("tiers %s dim %d %s batch %d: %.0f K keys/s", name, dim, storage, n,
                                 points[-1]["keys_per_s"] / 1e3)
                for tier in tiers.values():
                    tier.erase(tag, torch.from_numpy(keys))  # free the memory before the next dim
                del vectors, files, stored
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"results": {"points": points, "loads": loads, "skipped": skipped, "rows": cfg.rows},
            "tables": [_table(points), _load_table(loads)],
            "notes": [f"{cfg.rows:,} rows per table (random int64 keys), batches of random existing keys; "
                      f"median over {cfg.batches} timed fetches per tier after {cfg.warmup} warm-up fetches, "
                      "tiers rotated batch by batch.",
                      f"Redis Cluster: {cfg.redis_nodes} masters on loopback, started by the benchmark, "
                      f"{cfg.redis_partitions} partitions per table. Every tier gets one untimed pass over all keys "
                      "after its load (RocksDB's block cache, 1 GiB, holds the whole table then)."]
            + [f"skipped {k}: {v}" for k, v in skipped.items()]}


def _table(points: list[dict[str, Any]]) -> dict[str, Any]:
    cols = ["tier", "dim", "storage", "keys/fetch", "K keys/s", "p50 ms", "p99 ms", "rows ok"]
    rows = [[LABELS[p["tier"]], p["dim"], p["storage"], f"{p['batch_keys']:,}", f"{p['keys_per_s'] / 1e3:,.0f}",
             f"{p['p50_ms']:.3f}", f"{p['p99_ms']:.3f}", "yes" if p["rows_equal"] else "**NO**"] for p in points]
    return {"title": "Tier fetch", "columns": cols, "rows": rows}


def _load_table(loads: list[dict[str, Any]]) -> dict[str, Any]:
    cols = ["tier", "dim", "storage", "rows", "load s", "K rows/s"]
    rows = [[LABELS[x["tier"]], x["dim"], x["storage"], f"{x['rows']:,}", f"{x['seconds']:.2f}", f"{x['rows_per_s'] / 1e3:,.0f}"]
            for x in loads]
    return {"title": "Tier bulk load (tier.load from table files)", "columns": cols, "rows": rows}


def plot(results: dict[str, Any], out_dir: str, plt, cfg: Any = None, device_label: str = "") -> list[str]:
    points = results["points"]
    if not points:
        return []
    tiers = list(dict.fromkeys(p["tier"] for p in points))
    groups = list(dict.fromkeys((p["dim"], p["storage"], p["batch_keys"]) for p in points))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(tiers) / 2), 4.5))
    width = 0.8 / len(tiers)
    for j, tier in enumerate(tiers):
        ys = [next((p["keys_per_s"] for p in points
                    if p["tier"] == tier and (p["dim"], p["storage"], p["batch_keys"]) == g),
                   np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, ys, width, label=LABELS[tier])
    ax.set_xticks(np.arange(len(groups)) + width * (len(tiers) - 1) / 2)
    ax.set_xticklabels([f"dim {d} {s}\n{n:,} keys" for d, s, n in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("keys/s fetched (median batch)")
    ax.set_title("Tier fetch rates, same rows, same batches")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return [save_figure(fig, plt, out_dir, "tiers.png")]
