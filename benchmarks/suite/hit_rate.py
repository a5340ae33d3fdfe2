"""`bench=hit_rate`: hit rate vs cache size of the real cache's LRU, LFU and LFU with TinyLFU-style admission
(hps_core.cache.EmbeddingCache: set-associative buckets of 32 slots) on Zipf traces, against the offline optimum on
the same trace.

Per (alpha, cache ratio) one trace of `trace_keys` keys is replayed through each policy the way the engine drives the
cache: `find` a batch of `batch_keys` keys, then `insert_or_assign` the batch's distinct misses. The references,
computed in numpy/Python on the same trace with the same number of slots (`cache.num_slots`):

- Belady (MIN with bypass): on a miss, keep the `slots` keys whose next use is soonest, the new key included (a key
  never used again, or used after all cached ones, is not inserted). This is the best hit rate any cache of that
  size can reach when keys are served one at a time.
- exact LRU, fully associative (optional): what the 32-way buckets cost relative to a perfect LRU.

Hit rates count key positions over the whole trace, from an empty cache (compulsory misses included for all).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from benchmarks.common import ZipfSampler
from benchmarks.suite.config import HitRateBench
from benchmarks.suite.report import save_figure

log = logging.getLogger(__name__)


def next_use(trace: np.ndarray) -> np.ndarray:
    """next_use[i] = the position of the next occurrence of trace[i], or len(trace) + i when there is none
    (distinct "never" values keep the simulation's comparisons strict)."""
    n = trace.size
    order = np.argsort(trace, kind="stable")  # positions grouped by key, increasing within a key
    nxt = np.empty(n, dtype=np.int64)
    same = trace[order[1:]] == trace[order[:-1]]
    nxt[order[:-1]] = np.where(same, order[1:], n + order[:-1])
    if n:
        nxt[order[-1]] = n + order[-1]
    return nxt


def belady_hits(trace: np.ndarray, slots: int) -> int:
    """Hits of Belady's MIN (with bypass) on `trace` with `slots` slots, fully associative.

    A max-heap of (next use, key) over the cached keys finds the eviction victim; entries made stale by a hit are
    skipped lazily (a cached key's live next use is the one stored in `cached`).
    """
    nxt = next_use(trace).tolist()
    keys = trace.tolist()
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key)
    hits = 0
    for k, nu in zip(keys, nxt):
        if k in cached:
            hits += 1
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
            continue
        if len(cached) < slots:
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
            continue
        while True:  # drop stale entries until the top is a live (key, next use)
            neg, victim = heap[0]
            if cached.get(victim) == -neg:
                break
            heapq.heappop(heap)
        if -neg > nu:  # the victim is needed later than the new key: swap them; otherwise bypass
            heapq.heappop(heap)
            del cached[victim]
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
        if len(heap) > 4 * slots + 1024:  # keep the heap small: rebuild from the live entries
            heap = [(-v, key) for key, v in cached.items()]
            heapq.heapify(heap)
    return hits


def exact_lru_hits(trace: np.ndarray, slots: int) -> int:
    """Hits of a fully associative LRU with `slots` slots, keys served one at a time."""
    lru: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in trace.tolist():
        if k in lru:
            hits += 1
            lru.move_to_end(k)
        else:
            lru[k] = None
            if len(lru) > slots:
                lru.popitem(last=False)
    return hits


def cache_hits(trace: np.ndarray, capacity: int, policy: str, batch: int, dim: int) -> tuple[int, int, dict]:
    """(hits, num_slots, insert counters) of EmbeddingCache(capacity, policy) replaying `trace` in batches."""
    from hps_core.cache import EmbeddingCache

    if policy == "tinylfu":  # LFU with the admission sketch
        cache = EmbeddingCache(capacity, dim, device="cpu", policy="lfu", admission="tinylfu")
    else:
        cache = EmbeddingCache(capacity, dim, device="cpu", policy=policy)
    t = torch.from_numpy(trace)
    hits = 0
    counts = {"inserted": 0, "evicted": 0, "refused": 0}
    for s in range(0, t.numel(), batch):
        q = t[s:s + batch]
        _, found = cache.find(q)
        hits += int(found.sum())
        miss = torch.unique(q[~found])
        if miss.numel():
            c = cache.insert_or_assign(miss, torch.zeros(miss.numel(), dim))
            for k in counts:
                counts[k] += c[k]
    return hits, cache.num_slots, counts


SLOT_OVERHEAD_BYTES = 13  # a slot's key (8), digest (1) and score (4), beside its row


def equal_bytes_hit_rates(trace: np.ndarray, capacity: int, cfg: HitRateBench) -> dict[str, Any]:
    """Hit rates (lru, tinylfu) of caches that take the bytes of a float32 cache of `capacity` rows of
    cfg.equal_bytes_dim, one per storage: the slots those bytes buy. Which keys stay cached does not depend on the
    rows' values, so each is replayed with the same EmbeddingCache ops at its slot count."""
    from hps_core.storage import bytes_per_row

    dim = cfg.equal_bytes_dim
    budget = capacity * (bytes_per_row("float32", dim) + SLOT_OVERHEAD_BYTES)
    out: dict[str, Any] = {"dim": dim, "bytes": budget}
    for storage in ["float32"] + [s for s in cfg.equal_bytes_storages if s != "float32"]:
        cap = budget // (bytes_per_row(storage, dim) + SLOT_OVERHEAD_BYTES)
        out[storage] = {"capacity": int(cap)}
        for policy in ("lru", "tinylfu"):
            hits, slots, _ = cache_hits(trace, int(cap), policy, cfg.batch_keys, cfg.dim)
            out[storage][policy] = hits / trace.size
            out[storage]["slots"] = slots
    return out


def run(cfg: HitRateBench, device: torch.device, out_dir: str) -> dict[str, Any]:
    # The real cache is driven on the CPU: hit rates do not depend on the device (CPU and CUDA ops are twins,
    # checked bit for bit by the parity tests).
    order = np.random.default_rng(cfg.seed + 1).permutation(cfg.rows).astype(np.int64)  # rank -> key
    points: list[dict[str, Any]] = []
    for alpha in cfg.zipf_alphas:
        rng = np.random.default_rng([cfg.seed, int(alpha * 1000)])
        trace = order[ZipfSampler(cfg.rows, alpha).sample(rng, cfg.trace_keys)]
        distinct = int(np.unique(trace).size)
        for ratio in cfg.cache_ratios:
            capacity = max(1, int(ratio * cfg.rows))
            p: dict[str, Any] = {"zipf_alpha": alpha, "cache_ratio": ratio, "capacity": capacity,
                                 "trace_keys": int(trace.size), "distinct_keys": distinct, "hit_rate": {},
                                 "seconds": {}}
            for policy in cfg.policies:
                t0 = time.perf_counter()
                hits, slots, counts = cache_hits(trace, capacity, policy, cfg.batch_keys, cfg.dim)
                p["hit_rate"][policy] = hits / trace.size
                p["seconds"][policy] = time.perf_counter() - t0
                p[f"{policy}_inserts"] = counts
                p["slots"] = slots
            slots = p.get("slots", capacity)
            t0 = time.perf_counter()
            p["hit_rate"]["belady"] = belady_hits(trace, slots) / trace.size
            p["seconds"]["belady"] = time.perf_counter() - t0
            if cfg.fully_associative_lru:
                t0 = time.perf_counter()
                p["hit_rate"]["exact_lru"] = exact_lru_hits(trace, slots) / trace.size
                p["seconds"]["exact_lru"] = time.perf_counter() - t0
            # The best any cache of this size could do with unlimited size: every key but its first use hits.
            p["hit_rate"]["infinite_cache"] = 1 - distinct / trace.size
            if any(abs(alpha - a) < 1e-9 for a in cfg.equal_bytes_alphas):
                p["equal_bytes"] = equal_bytes_hit_rates(trace, capacity, cfg)
            points.append(p)
            log.info("hit_rate alpha %g ratio %g: %s", alpha, ratio,
                     ", ".join(f"{k} {v:.4f}" for k, v in p["hit_rate"].items()))
    tables = [_table(points, cfg)]
    eq = [p for p in points if "equal_bytes" in p]
    if eq:
        storages = [k for k in eq[0]["equal_bytes"] if k not in ("dim", "bytes")]
        tables.append({
            "title": f"Equal HBM bytes: caches of float32 vs compact rows (dim {cfg.equal_bytes_dim})",
            "columns": ["zipf alpha", "float32 cache ratio", "bytes"] + [
                f"{s} {pol} (slots)" for s in storages for pol in ("lru", "tinylfu")],
            "rows": [[f"{p['zipf_alpha']:g}", f"{p['cache_ratio']:g}", f"{p['equal_bytes']['bytes']:,}"] + [
                f"{p['equal_bytes'][s][pol]:.4f} ({p['equal_bytes'][s]['slots']:,})" for s in storages
                for pol in ("lru", "tinylfu")] for p in eq],
        })
    return {"results": {"points": points, "rows": cfg.rows, "batch_keys": cfg.batch_keys},
            "tables": tables,
            "notes": [
                f"Trace: {cfg.trace_keys:,} keys per alpha over {cfg.rows:,} keys (Zipf, random rank -> key); the "
                f"cache finds {cfg.batch_keys} keys per call, then inserts the call's distinct misses.",
                "Belady = MIN with bypass (furthest next use), fully associative, same slot count as the cache: "
                "the optimum for keys served one at a time. exact LRU = fully associative LRU, same slots.",
                "A batched cache is at a disadvantage against this bound (repeats of a missed key within one call "
                "all miss) but can, in principle, gain from inserting a batch's misses after its hits; with calls "
                "much smaller than the cache that effect is negligible.",
            ]}


def _table(points: list[dict[str, Any]], cfg: HitRateBench) -> dict[str, Any]:
    refs = ["belady"] + (["exact_lru"] if cfg.fully_associative_lru else [])
    cols = ["zipf alpha", "cache ratio", "slots"] + [f"{p} (32-way)" for p in cfg.policies] + refs + \
        [f"{p} / belady" for p in cfg.policies] + ["infinite cache"]
    rows = []
    for p in points:
        h = p["hit_rate"]
        rows.append([f"{p['zipf_alpha']:g}", f"{p['cache_ratio']:g}", f"{p['slots']:,}"]
                    + [f"{h[x]:.4f}" for x in cfg.policies + refs]
                    + [f"{h[x] / h['belady']:.3f}" if h["belady"] else "" for x in cfg.policies]
                    + [f"{h['infinite_cache']:.4f}"])
    return {"title": "Hit rate vs cache size", "columns": cols, "rows": rows}


def plot(results: dict[str, Any], out_dir: str, plt, cfg: Any = None, device_label: str = "") -> list[str]:
    points = results["points"]
    alphas = list(dict.fromkeys(p["zipf_alpha"] for p in points))
    fig, axes = plt.subplots(2, len(alphas), squeeze=False, figsize=(5 * len(alphas), 7.5))
    styles = {"belady": ("-s", "k", "Belady (offline optimum)"), "lru": ("-o", "C0", "LRU (cache, 32-way)"),
              "lfu": ("-o", "C1", "LFU (cache, 32-way)"), "exact_lru": (":", "C0", "exact LRU (fully assoc.)"),
              "infinite_cache": ("--", "0.6", "infinite cache")}
    for i, alpha in enumerate(alphas):
        sel = sorted((p for p in points if p["zipf_alpha"] == alpha), key=lambda p: p["cache_ratio"])
        x = [p["cache_ratio"] for p in sel]
        ax, gap = axes[0][i], axes[1][i]
        for name, (style, color, label) in styles.items():
            if name in sel[0]["hit_rate"]:
                ax.plot(x, [p["hit_rate"][name] for p in sel], style, color=color, label=label)
                if name not in ("belady", "infinite_cache"):
                    gap.plot(x, [p["hit_rate"]["belady"] - p["hit_rate"][name] for p in sel], style, color=color,
                             label=label)
        ax.set_title(f"Zipf alpha {alpha:g}")
        ax.set_ylabel("hit rate")
        gap.set_ylabel("Belady hit rate - policy hit rate")
        for a in (ax, gap):
            a.set_xscale("log")
            a.set_xlabel("cache rows / key universe")
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=7)
    return [save_figure(fig, plt, out_dir, "hit_rate.png")]
