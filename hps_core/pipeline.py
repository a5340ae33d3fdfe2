"""TablePipeline: the lookup of one table on one device, run by the native `torch.classes.hps.LookupPipeline`.

The native object owns the table's state on its device - a dynamic cache (set-associative, LRU/LFU), or a resident
table (a dense row array behind a hash index: static tables, caches whose capacity covers the table, host-mapped
tables) - and runs a whole lookup in one call with the GIL released: find, and for misses the plan, the host-memory
tier's fetch, the lower tiers through a callback, the default vector, the scatter and the insert
(cuda_ext/csrc/pipeline.h). This wrapper is the engine's one door to it: the engine never touches the state.

Example:
    >>> pipe = TablePipeline.dynamic_cache("cpu", dim=4, capacity=1024, policy="lru", default_value=0.0,
    ...                                    max_keys=0, tag="hps_et.m.t")
    >>> pipe.lookup(torch.tensor([[1, 2]])).shape   # misses: the default vector
    torch.Size([1, 2, 4])
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from hps_core import ops
from hps_core.storage import STORAGE_NAMES, check_encodable, storage_code

__all__ = ["TablePipeline", "STAGES", "summarize_latencies"]

# pipeline.h PipelineStat, then the control block (lookup_layout.h Ctrl) as counters() returns them.
_STATS = ("misses_planned", "unique_misses", "source_hits", "lower_tier_keys", "lower_tier_hits", "defaults_planned",
          "async_insert_batches", "stale_inserts_skipped", "updates", "refreshed_keys", "second_level_hits")
_CTRL = {"lookups": 2, "keys": 3, "misses": 4, "inserted": 5, "assigned": 6, "evicted": 7, "refused": 8,
         "second_level_hits": 10}
# pipeline.h PipelineStage: total = the whole call; find = until the misses are known; plan / fetch / apply = the
# miss path's steps (host plan; host map + lower tiers + defaults; scatter + insert launch).
STAGES = ("total", "find", "plan", "fetch", "apply")

_KIND_DYNAMIC, _KIND_RESIDENT, _KIND_PASS_THROUGH = 0, 1, 2
_KIND_NAMES = {_KIND_DYNAMIC: "dynamic_cache", _KIND_RESIDENT: "resident", _KIND_PASS_THROUGH: "pass_through"}
_LOOKUP = None


def _lookup_op():
    global _LOOKUP
    if _LOOKUP is None:
        _LOOKUP = torch.ops.hps.lookup.default
    return _LOOKUP


def summarize_latencies(seconds: torch.Tensor, count: int | None = None) -> dict[str, float]:
    """{count, mean_ms, p50_ms, p90_ms, p99_ms, max_ms} of float64 seconds (the retained window)."""
    n = seconds.numel()
    if n == 0:
        return {"count": 0}
    ms = seconds.numpy() * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"count": int(count if count is not None else n), "mean_ms": float(ms.mean()), "p50_ms": float(p50),
            "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(ms.max())}


class TablePipeline:
    """One table on one device: the native lookup pipeline, and the lower-tier hit counts kept beside it.

    Build with `dynamic_cache(...)`, `resident(...)` or `pass_through(...)`. Every method is safe to call from several threads (the
    native object serialises them); lookups run on the caller's current CUDA stream.
    """

    def __init__(self, native: Any, mode: str) -> None:
        self.native = native
        self.mode = mode  # the table mode it serves: dynamic / static / uvm
        self.handle = int(native.handle())
        self.dim = int(native.dim())
        self.tag = str(native.tag())
        self.device = torch.device(native.device())
        self.kind = _KIND_NAMES[int(native.kind())]
        self.storage = STORAGE_NAMES[int(native.storage())]  # how it keeps its rows (hps_core.storage)
        ops.register_pipeline_dim(self.handle, self.dim)
        self._tier_hits: dict[str, int] = {}
        self._tier_lock = threading.Lock()
        self.second_level: "TablePipeline | None" = None

    @property
    def answers_all(self) -> bool:
        """A resident table that answers every key itself (a key it lacks gets the default vector, no tier asked)."""
        return bool(self.native.answers_all())

    # ------------------------------------------------------------------ construction

    @classmethod
    def dynamic_cache(cls, device: str | torch.device, *, dim: int, capacity: int, policy: str, default_value: float,
                      max_keys: int, tag: str, admission: str = "none", storage: str = "float32") -> "TablePipeline":
        """A set-associative cache of `capacity` rows (rounded up to whole buckets) that learns its misses.
        admission "tinylfu" (LFU only): a frequency sketch of the misses decides which keys may evict
        (hps_core.cache.EmbeddingCache documents the rule; ageing every ADMISSION_WINDOW x slots keys)."""
        if policy not in ops.POLICIES:
            raise ValueError(f"policy must be one of {sorted(ops.POLICIES)}, found {policy!r}")
        if admission not in ("none", "tinylfu"):
            raise ValueError(f"admission must be 'none' or 'tinylfu', found {admission!r}")
        native = torch.classes.hps.LookupPipeline(_KIND_DYNAMIC, str(device), dim, capacity, ops.POLICIES[policy],
                                                  float(default_value), max_keys, True, False, tag,
                                                  storage_code(storage))
        if admission == "tinylfu":
            from hps_core.cache import ADMISSION_WINDOW

            native.set_admission(ADMISSION_WINDOW * int(native.num_slots()))
        return cls(native, "dynamic")

    @classmethod
    def resident(cls, device: str | torch.device, *, dim: int, capacity: int, default_value: float, max_keys: int,
                 tag: str, mode: str, misses_to_tiers: bool, rows_on_host: bool = False,
                 storage: str = "float32") -> "TablePipeline":
        """A resident table of up to `capacity` rows (fill it with load()). misses_to_tiers=False: a key it lacks
        gets the default vector (HPS static); True: the tiers are asked (and the row kept while capacity lasts).
        rows_on_host: the rows stay in pinned host memory, read by the GPU over the bus (HPS uvm).
        storage (hps_core.storage): how the rows are kept - encoded once as they are loaded or fetched, decoded by
        every lookup into its output."""
        native = torch.classes.hps.LookupPipeline(_KIND_RESIDENT, str(device), dim, capacity, ops.POLICY_LRU,
                                                  float(default_value), max_keys, misses_to_tiers, rows_on_host, tag,
                                                  storage_code(storage))
        return cls(native, mode)

    @classmethod
    def pass_through(cls, *, dim: int, default_value: float, max_keys: int, tag: str,
                     storage: str = "float32") -> "TablePipeline":
        """A CPU table without a cache (HPS gpucache false): every key position from the host map, the lower tiers
        or the default vector, natively - nothing stored, no de-duplication; the tiers' stored rows are decoded
        into the output."""
        native = torch.classes.hps.LookupPipeline(_KIND_PASS_THROUGH, "cpu", dim, 0, ops.POLICY_LRU,
                                                  float(default_value), max_keys, True, False, tag,
                                                  storage_code(storage))
        return cls(native, "uncached")

    def connect(self, *, source: int = -1, lower_tiers: int = 0, token: int = 0, hit_rate_threshold: float = 2.0,
                max_pending: int = 1) -> None:
        """Wire the miss path: the host-memory map's handle (-1: none), the lower-tier callback's address (0: none)
        and its token, and HPS's asynchronous insertion (threshold <= 1 starts the insert worker)."""
        self.native.set_source(source)
        self.native.set_lower_tiers(lower_tiers, token)
        if self.kind == "dynamic_cache":
            self.native.set_async(float(hit_rate_threshold), int(max_pending))

    def set_second_level(self, second: "TablePipeline") -> None:
        """Put a resident table of the same table under this dynamic cache (its rows readable by the host: a CPU
        table, or host-mapped rows on a GPU): the cache's misses are read from it before the host map and the lower
        tiers. The two must be closed together (the engine does)."""
        self.native.set_second_level(second.native)
        self.second_level = second

    # ------------------------------------------------------------------ the hot path

    def lookup(self, keys: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """keys int32/int64 of any shape on this device -> keys.shape + (dim,) in `dtype`: float32 (None), or
        bfloat16 / float16 (each row rounded to nearest even as it is written; the table keeps float32)."""
        return _lookup_op()(self.handle, keys, dtype)

    # ------------------------------------------------------------------ state

    def _encodable(self, rows: torch.Tensor) -> torch.Tensor:
        # Rows from table files a compact storage cannot keep (inf / NaN under a row-wise scale, float16 overflow)
        # raise here, naming the table, before any is written. (update() rows are checked once by the engine, before
        # any tier; refresh rows come from the tiers, which hold only rows that passed one of the two.)
        if self.storage != "float32" and rows.dtype == torch.float32:
            check_encodable(rows, self.storage, field=f"{self.tag} rows")
        return rows

    def load(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Resident: append rows (keys int64 (k,) CPU, rows float32 (k, dim) CPU - encoded here - or the table's
        stored rows - kept as they are). Dynamic: insert them."""
        self.native.load(keys, self._encodable(rows))

    def load_like(self, other: "TablePipeline") -> None:
        """Resident: take the index and rows of the same table on another device (host rows are shared)."""
        self.native.load_like(other.native)

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows (cache warm-up)."""
        self.native.insert(keys, self._encodable(rows))

    def update(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        """New rows for distinct keys (int64 (k,) CPU; float32 (k, dim) or stored rows, CPU); returns how many were
        present."""
        return int(self.native.update(keys, rows))

    def export_keys(self, start: int, end: int) -> tuple[torch.Tensor, int]:
        """Keys in slots [start, end) (int64 CPU) and the version they were read at (for assign_if_version)."""
        keys, version = self.native.export_keys(start, end)
        return keys, int(version)

    def assign_if_version(self, keys: torch.Tensor, rows: torch.Tensor, version: int) -> int:
        """Overwrite present keys' rows unless an update came since `version` (then -1)."""
        return int(self.native.assign_if_version(keys, rows, version))

    def fetch_stored(self, keys: torch.Tensor) -> torch.Tensor:
        """The stored rows a miss of these distinct keys (int64 CPU) would fetch now (second level, host map, lower
        tiers, default vector): what refresh assigns."""
        return self.native.fetch_stored(keys)

    def export_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored (key, row): int64 (m,), float32 (m, dim) on this device."""
        keys, rows = self.native.export_all()
        return keys, rows

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """found (n,) bool on the keys' device; no score change."""
        return self.native.contains(keys)

    def size(self) -> int:
        """Keys stored."""
        return int(self.native.size())

    @property
    def num_slots(self) -> int:
        return int(self.native.num_slots())

    @property
    def capacity(self) -> int:
        return int(self.native.capacity())

    def clear(self) -> None:
        self.native.clear()

    def memory_bytes(self) -> int:
        """Bytes of the table's state (rows + index or cache state), where it lives."""
        return int(self.native.memory_bytes())

    def wait_inserts(self) -> None:
        self.native.wait_inserts()

    def close(self) -> None:
        self.native.close()
        ops.unregister_pipeline_dim(self.handle)

    # ------------------------------------------------------------------ statistics

    def add_tier_hits(self, tier: str, hits: int) -> None:
        with self._tier_lock:
            self._tier_hits[tier] = self._tier_hits.get(tier, 0) + int(hits)

    def stats(self, host_tier: str | None) -> dict:
        """Counters and latency percentiles of this (table, device), as HierarchicalParameterServer.stats() gives them.

        Key counts are key positions unless named unique. defaults_served: positions answered with the default
        vector (keys no tier holds; misses of a batch left to the insert worker; keys a static table lacks; misses of
        lookups replayed from a CUDA graph).
        """
        c = self.native.counters().tolist()
        host = dict(zip(_STATS, c[:len(_STATS)]))
        ctrl = {name: c[len(_STATS) + i] for name, i in _CTRL.items()}
        with self._tier_lock:
            tier_hits = dict(self._tier_hits)
        if host_tier is not None and host["source_hits"]:
            tier_hits[host_tier] = tier_hits.get(host_tier, 0) + host["source_hits"]
        keys, misses = ctrl["keys"], ctrl["misses"]
        out = {
            "mode": self.mode,
            "kind": self.kind,
            "lookups": ctrl["lookups"],
            "keys": keys,
            "cache_hits": keys - misses,
            "cache_misses": misses,
            "unique_misses": host["unique_misses"],
            "tier_hits": tier_hits,
            "defaults_served": host["defaults_planned"] + (misses - host["misses_planned"] - ctrl["second_level_hits"]),
            "inserts": ctrl["inserted"],
            "evictions": ctrl["evicted"],
            "refused_inserts": ctrl["refused"],
            "async_insert_batches": host["async_insert_batches"],
            "stale_inserts_skipped": host["stale_inserts_skipped"],
            "updates": host["updates"],
            "refreshed_keys": host["refreshed_keys"],
            # keys read from the second level: distinct keys per call when the CPU reads it, miss positions on the
            # GPU-direct path
            "second_level_hits": host["second_level_hits"] + ctrl["second_level_hits"],
            "hit_rate": (keys - misses) / keys if keys else 0.0,
            "cache_size": self.size(),
            "cache_slots": self.num_slots,
            "cache_capacity": self.capacity,
            "cache_memory_bytes": self.memory_bytes(),
            "latency": {stage: summarize_latencies(self.native.latencies(i)) for i, stage in enumerate(STAGES)},
        }
        if self.second_level is not None:
            out["second_level_memory_bytes"] = self.second_level.memory_bytes()
        return out

    def __repr__(self) -> str:
        return f"TablePipeline({self.tag!r}, {self.device}, {self.kind}, mode={self.mode!r}, dim={self.dim})"
