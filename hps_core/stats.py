"""Counters and latency recorders of the engine's uncached lookups (HPS gpucache false); cached lookups count in
their native pipeline (hps_core.pipeline)."""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np


class LatencyRecorder:
    """Keeps the most recent `capacity` durations (seconds) of one stage; percentiles on demand.

    Appends are O(1) and lock-protected, so many lookup threads can record at once.
    """

    def __init__(self, capacity: int = 8192) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._buf[self._count % self._buf.size] = seconds
            self._count += 1

    @contextmanager
    def time(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(time.perf_counter() - start)

    def summary(self) -> dict[str, float]:
        """{count, mean_ms, p50_ms, p90_ms, p99_ms, max_ms} over the retained window."""
        with self._lock:
            n = min(self._count, self._buf.size)
            window = self._buf[:n].copy()
            count = self._count
        if n == 0:
            return {"count": 0}
        ms = window * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {
            "count": count,
            "mean_ms": float(ms.mean()),
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "max_ms": float(ms.max()),
        }


# Stages of an uncached lookup (HPS gpucache false); cached lookups report the native pipeline's stages
# (hps_core.pipeline.STAGES).
STAGES = ("total", "tiers")


@dataclasses.dataclass
class TableStats:
    """Counters of one (model, table, device). Key counts are key positions unless named `unique`."""

    lookups: int = 0
    keys: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    unique_misses: int = 0
    tier_hits: dict[str, int] = dataclasses.field(default_factory=dict)
    defaults_served: int = 0  # key positions answered with the table's default vector
    inserts: int = 0
    evictions: int = 0
    refused_inserts: int = 0
    async_insert_batches: int = 0
    stale_inserts_skipped: int = 0  # inserts dropped because an update raced them
    updates: int = 0
    refreshed_keys: int = 0
    latency: dict[str, LatencyRecorder] = dataclasses.field(
        default_factory=lambda: {stage: LatencyRecorder() for stage in STAGES}
    )
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + int(value))

    def add_tier_hits(self, tier: str, hits: int) -> None:
        with self.lock:
            self.tier_hits[tier] = self.tier_hits.get(tier, 0) + int(hits)

    def as_dict(self) -> dict:
        with self.lock:
            out = {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("latency", "lock", "tier_hits")
            }
            out["tier_hits"] = dict(self.tier_hits)
        out["hit_rate"] = out["cache_hits"] / out["keys"] if out["keys"] else 0.0
        out["latency"] = {stage: rec.summary() for stage, rec in self.latency.items()}
        return out
