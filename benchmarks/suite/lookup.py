"""`bench=lookup`: engine lookup keys/s and latency percentiles over keys per call x dim x cache ratio x key
distribution x key dtype x device, with the baselines measured on the same batches in the same run:

- f_embedding: torch.nn.functional.embedding on precomputed row indices, the table on the same device (no key
  hashing at all: the floor of a gather of the same rows);
- numpy_searchsorted (CPU only): a dict-free key -> row lookup, `np.searchsorted` on the sorted keys + `np.take`.

One engine per (dim, cache ratio) holds the table in the host-memory tier; its caches are cleared before each case
and warmed with the case's own batches until `warmup_keys_factor` x cache rows keys went through, so every case
starts from the same state. The hit rate is measured over the timed calls only.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import ZipfSampler, distinct_keys, latency_summary, time_one, write_synthetic_table
from benchmarks.suite.config import LookupBench
from benchmarks.suite.report import save_figure

log = logging.getLogger(__name__)

_DTYPES = {"int32": torch.int32, "int64": torch.int64}
# Keys are drawn below 2^31 so that one table serves int32 and int64 queries alike.
_KEY_HIGH = 2**31 - 1


def _deployment(path: str, cfg: LookupBench, dim: int, ratio: float) -> dict:
    return {
        "key_dtype": "int32" if "int32" in cfg.key_dtypes else "int64",
        "models": {"m": {"tables": [{"name": "t", "path": path, "dim": dim, "max_keys_per_sample": 1}],
                         "max_batch_size": max(cfg.keys_per_call), "deployed_device_list": [0],
                         "cache": {"ratio": ratio, "hit_rate_threshold": cfg.hit_rate_threshold,
                                   "policy": cfg.policy}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": cfg.host_partitions}},
    }


def _distributions(cfg: LookupBench) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = []
    for d in cfg.distributions:
        out += [("uniform", None)] if d == "uniform" else [("zipf", a) for a in cfg.zipf_alphas]
    return out


def _label(dist: str, alpha: float | None) -> str:
    return "uniform" if alpha is None else f"zipf({alpha:g})"


class _Queries:
    """The batches (row indices) of each (distribution, keys per call), drawn on demand and kept: batch i is the
    same for every dim, ratio, dtype and device, so that engine and baselines see exactly the same keys. A case
    walks batches 0, 1, 2, ... (warm-up, then timed calls): a stream, not a replay of a few batches."""

    def __init__(self, cfg: LookupBench) -> None:
        self.cfg = cfg
        self.order = np.random.default_rng(cfg.seed + 1).permutation(cfg.rows)  # popularity rank -> row
        self._samplers: dict[float, ZipfSampler] = {}
        self._pools: dict[tuple, tuple[np.random.Generator, list[np.ndarray]]] = {}

    def batch(self, dist: str, alpha: float | None, n: int, i: int) -> np.ndarray:
        key = (dist, alpha, n)
        if key not in self._pools:
            seed = [self.cfg.seed, n, 0 if alpha is None else int(alpha * 1000) + 1]
            self._pools[key] = (np.random.default_rng(seed), [])
        rng, pool = self._pools[key]
        while len(pool) <= i:
            if alpha is None:
                pool.append(rng.integers(0, self.cfg.rows, n))
            else:
                sampler = self._samplers.setdefault(alpha, ZipfSampler(self.cfg.rows, alpha))
                pool.append(self.order[sampler.sample(rng, n)])
        return pool[i]


class _Baselines:
    """The dict-free references, each timed on the same batch right after the engine call (paired, so that a
    change of load on a shared machine hits both alike): F.embedding on the batch's row ids with the table on the
    device, and on the CPU numpy searchsorted + take on the batch's keys."""

    def __init__(self, cfg: LookupBench, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.cfg, self.keys, self.vectors = cfg, keys, vectors
        self._weight: dict[torch.device, torch.Tensor] = {}
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def calls(self, device: torch.device) -> dict[str, Callable[[np.ndarray], tuple[Callable, tuple]]]:
        """{name: rows -> (fn, args)}: what each baseline runs for a batch given as row indices."""
        out: dict[str, Callable[[np.ndarray], tuple[Callable, tuple]]] = {}
        if "f_embedding" in self.cfg.baselines:
            if device not in self._weight:
                self._weight[device] = torch.from_numpy(self.vectors).to(device)
            w = self._weight[device]
            out["f_embedding"] = lambda rows: (lambda i: torch.nn.functional.embedding(i, w),
                                               (torch.from_numpy(rows).to(device),))
        if "numpy_searchsorted" in self.cfg.baselines and device.type == "cpu":
            if self._sorted is None:
                srt = np.argsort(self.keys, kind="stable")
                self._sorted = (self.keys[srt], self.vectors[srt])
            sk, sr = self._sorted
            out["numpy_searchsorted"] = lambda rows: (lambda q: np.take(sr, np.searchsorted(sk, q), axis=0),
                                                      (self.keys[rows],))
        return out


def _case(hps, cfg: LookupBench, device: torch.device, dtype: str, keys: np.ndarray, vectors: np.ndarray,
          batch, n: int, cache_rows: int, baselines: _Baselines) -> dict[str, Any]:
    """One case; `batch(i)` is the case's i-th batch of row indices (warm-up takes the first ones)."""
    rt = hps.table("m", "t")
    for pipe in rt.caches.values():  # every case starts from an empty cache (a resident table stays whole)
        if pipe.kind == "dynamic_cache":
            pipe.clear()

    def query(i: int) -> torch.Tensor:
        return torch.from_numpy(keys[batch(i)]).to(device=device, dtype=_DTYPES[dtype])

    def lookup(k: torch.Tensor) -> torch.Tensor:
        return hps.lookup("m", "t", k)

    # Warm-up until the cache saw warmup_keys_factor x its rows (at least one call, at most warmup_max_calls).
    warm_calls = max(1, min(cfg.warmup_max_calls, int(np.ceil(cfg.warmup_keys_factor * cache_rows / n))))
    t0 = time.perf_counter()
    for i in range(warm_calls):
        lookup(query(i))
    warm_s = time.perf_counter() - t0
    refs = baselines.calls(device)
    for make in refs.values():  # the baselines' own warm-up (untimed)
        fn, args = make(batch(0))
        fn(*args)
    dev_key = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    before = hps.stats()["models"]["m"]["t"][dev_key]
    times: dict[str, list[float]] = {"engine": [], **{name: [] for name in refs}}
    for i in range(warm_calls, warm_calls + cfg.repeats):
        # Each call's inputs are made (and copied to the device) before its clock starts.
        times["engine"].append(time_one(lookup, (query(i),), device))
        for name, make in refs.items():
            fn, args = make(batch(i))
            times[name].append(time_one(fn, args, device))
        if sum(times["engine"]) >= cfg.case_budget_s and len(times["engine"]) >= cfg.min_repeats:
            break
    after = hps.stats()["models"]["m"]["t"][dev_key]
    hits = after["cache_hits"] - before["cache_hits"]
    total = after["keys"] - before["keys"]
    # What was timed returns the stored rows: check a sample of positions of the next batch (untimed).
    last = warm_calls + len(times["engine"])
    out = lookup(query(last))
    sample = np.random.default_rng(0).integers(0, n, min(n, 4096))
    got = out[torch.from_numpy(sample).to(device)].cpu().numpy()
    equal = bool(np.array_equal(got, vectors[batch(last)[sample]]))
    rate = n / float(np.median(times["engine"]))
    engine = {**latency_summary(times["engine"]), "keys_per_s": rate, "row_gb_s": rate * vectors.shape[1] * 4 / 1e9,
              "hit_rate": hits / max(total, 1), "warmup_calls": warm_calls, "warmup_s": warm_s, "rows_equal": equal}
    base = {name: {**latency_summary(t), "keys_per_s": n / float(np.median(t))}
            for name, t in times.items() if name != "engine"}
    return {"engine": engine, "baselines": base}


def run(cfg: LookupBench, device: torch.device, out_dir: str) -> dict[str, Any]:
    from hps_core.engine import HierarchicalParameterServer

    devices = []
    for d in cfg.devices:
        dev = device if d == "auto" else torch.device(d)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"devices = {cfg.devices!r}: 'cuda' asked for but torch sees no CUDA device")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        if dev not in devices:
            devices.append(dev)
    queries = _Queries(cfg)
    rng = np.random.default_rng(cfg.seed)
    keys = distinct_keys(rng, cfg.rows, _KEY_HIGH)
    cases: list[dict[str, Any]] = []
    setup: list[dict[str, Any]] = []
    specs = list(itertools.product(devices, _distributions(cfg), cfg.keys_per_call, cfg.key_dtypes))
    deadline = time.monotonic() + cfg.max_wall_s if cfg.max_wall_s else math.inf
    skipped = 0
    with tempfile.TemporaryDirectory(prefix="hps_bench_lookup_", dir=os.environ.get("HPS_BENCH_TMP")) as tmp:
        for dim in cfg.dims:
            t0 = time.perf_counter()
            files, vectors = write_synthetic_table(f"{tmp}/t{dim}", keys, dim, seed=cfg.seed + dim)
            write_s = time.perf_counter() - t0
            baselines = _Baselines(cfg, keys, vectors)
            for ratio in cfg.cache_ratios:
                if time.monotonic() > deadline:
                    skipped += len(specs)
                    continue
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # "no CUDA device: served from the CPU"
                    hps = HierarchicalParameterServer(_deployment(str(files.path), cfg, dim, ratio), progress=False)
                setup.append({"dim": dim, "cache_ratio": ratio, "table_write_s": write_s,
                              "engine_start_and_load_s": time.perf_counter() - t0})
                try:
                    for dev, (dist, alpha), n, dtype in specs:
                        if time.monotonic() > deadline:
                            skipped += 1
                            continue

                        def batch(i: int, dist=dist, alpha=alpha, n=n) -> np.ndarray:
                            return queries.batch(dist, alpha, n, i)

                        res = _case(hps, cfg, dev, dtype, keys, vectors, batch, n, max(1, int(ratio * cfg.rows)),
                                    baselines)
                        r = res["engine"]
                        case = {"device": str(dev), "dim": dim, "cache_ratio": ratio,
                                "distribution": _label(dist, alpha), "keys_per_call": n, "key_dtype": dtype, **res}
                        cases.append(case)
                        log.info("lookup %s dim %d ratio %g %s n %d %s: %.2f M keys/s, p50 %.3f ms, hit rate %.3f",
                                 dev, dim, ratio, case["distribution"], n, dtype, r["keys_per_s"] / 1e6, r["p50_ms"],
                                 r["hit_rate"])
                    # counters and per-stage latency over all cases of this engine (dim, ratio)
                    setup[-1]["engine_stats"] = hps.stats()["models"]["m"]["t"]
                finally:
                    hps.close()
            del baselines, vectors, files
    notes = []
    if skipped:
        notes.append(f"**stopped early**: max_wall_s = {cfg.max_wall_s} s reached, {skipped} cases not run")
    return {"results": {"cases": cases, "setup": setup, "table_rows": cfg.rows, "cases_not_run": skipped},
            "tables": [_table(cases)],
            "notes": notes + [
                "keys/s = keys per call / median call time (GB/s: the rows returned, keys/s x dim x 4 B); "
                "latency percentiles over the timed calls "
                "(CUDA events with a sync before each call on GPU, perf_counter on CPU).",
                "hit rate: cache hits / keys over the timed calls, after a warm-up of the same case.",
                "f_embedding: F.embedding on the batch's precomputed row indices, table on the same device; numpy: "
                "searchsorted on sorted keys + take (CPU only). Each is timed on the same batch right after the "
                "engine call (paired).",
                f"cache policy {cfg.policy}, hit_rate_threshold {cfg.hit_rate_threshold} "
                "(> 1: misses inserted synchronously).",
            ]}


def _table(cases: list[dict[str, Any]]) -> dict[str, Any]:
    cols = ["device", "dim", "cache", "keys", "keys/call", "dtype", "M keys/s", "GB/s", "p50 ms", "p99 ms", "hit rate",
            "F.embedding M keys/s", "vs F.embedding", "numpy M keys/s", "rows ok"]
    rows = []
    for c in cases:
        e, b = c["engine"], c["baselines"]
        fe = b.get("f_embedding")
        npb = b.get("numpy_searchsorted")
        rows.append([c["device"], c["dim"], f"{c['cache_ratio']:g}", c["distribution"], f"{c['keys_per_call']:,}",
                     c["key_dtype"], f"{e['keys_per_s'] / 1e6:.2f}", f"{e['row_gb_s']:.2f}", f"{e['p50_ms']:.3f}",
                     f"{e['p99_ms']:.3f}",
                     f"{e['hit_rate']:.3f}", f"{fe['keys_per_s'] / 1e6:.2f}" if fe else "",
                     f"{e['keys_per_s'] / fe['keys_per_s']:.2f}x" if fe else "",
                     f"{npb['keys_per_s'] / 1e6:.2f}" if npb else "", "yes" if e["rows_equal"] else "**NO**"])
    return {"title": "Engine lookup", "columns": cols, "rows": rows}


def plot(results: dict[str, Any], out_dir: str, plt, cfg: Any = None, device_label: str = "") -> list[str]:
    cases = results["cases"]
    devices = sorted({c["device"] for c in cases})
    dims = sorted({c["dim"] for c in cases})
    dists = list(dict.fromkeys(c["distribution"] for c in cases))
    files = []
    for what, ylabel, fname in (("keys_per_s", "M keys/s (median call)", "lookup_throughput.png"),
                                ("p99_ms", "p99 latency per call (ms)", "lookup_latency_p99.png")):
        fig, axes = plt.subplots(len(dists), len(dims) * len(devices), squeeze=False,
                                 figsize=(5 * len(dims) * len(devices), 3.8 * len(dists)))
        for r, dist in enumerate(dists):
            for ci, (dev, dim) in enumerate((d, m) for d in devices for m in dims):
                ax = axes[r][ci]
                sel = [c for c in cases if c["device"] == dev and c["dim"] == dim and c["distribution"] == dist]
                for ratio in sorted({c["cache_ratio"] for c in sel}):
                    for dtype, style in (("int64", "-o"), ("int32", ":x")):
                        pts = sorted((c["keys_per_call"], c["engine"][what]) for c in sel
                                     if c["cache_ratio"] == ratio and c["key_dtype"] == dtype)
                        if pts:
                            x, y = zip(*pts)
                            y = [v / 1e6 for v in y] if what == "keys_per_s" else y
                            ax.plot(x, y, style, label=f"engine, cache {ratio:g}, {dtype}")
                for bname, style, blabel in (("f_embedding", "--s", "F.embedding (row ids known)"),
                                             ("numpy_searchsorted", "--^", "numpy searchsorted + take")):
                    # paired with every case: the median over the cases of one keys-per-call value
                    base: dict[int, list[float]] = {}
                    for c in sel:
                        if bname in c["baselines"]:
                            base.setdefault(c["keys_per_call"], []).append(c["baselines"][bname][what])
                    if base:
                        x, y = zip(*sorted((k, float(np.median(v))) for k, v in base.items()))
                        y = [v / 1e6 for v in y] if what == "keys_per_s" else y
                        ax.plot(x, y, style, color="0.5" if bname != "f_embedding" else "k", label=blabel)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{dev}, dim {dim}, {dist}", fontsize=9)
                ax.set_xlabel("keys per call")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=6)
        files.append(save_figure(fig, plt, out_dir, fname))
    return files
