"""The host-memory tier: one partitioned C++ hash map per table tag (HPS's "volatile DB" hash map).

The map itself is `torch.classes.hps.HostHashMap` (cuda_ext/csrc/cpu/host_map_cpu.cpp): int64 keys -> stored rows
(the table's storage, hps_core.storage: float32 rows, or compact rows with their row-wise scale, kept as bytes),
split over `num_partitions` partitions with their own reader/writer lock, at most `overflow_margin` entries per
partition (pruned to `overflow_margin * overflow_resolution_target` by the overflow policy when full), about
1.1-1.3x the raw key + stored-row bytes in memory (an int8 table of dim 128: ~0.27x a float32 one's rows). Calls release the GIL, so several Python threads can fetch at once.

This wrapper adds what the Tier interface asks for: per-tag tables, chunking by `max_batch_size`, argument checks
that raise before anything changes, bulk loading (and encoding) of table files, and counters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hps_core._loader import load_extension
from hps_core.config import MAX_INT64, OVERFLOW_POLICIES
from hps_core.storage import STORAGE_NAMES, bytes_per_row, row_dtype, stored_width, to_stored
from hps_core.tiers.base import (Tier, TierStats, check_int, check_keys, check_storage, check_storage_match,
                                 check_table_files, check_values)

if TYPE_CHECKING:  # pragma: no cover
    from hps_core.tables import TableFiles

logger = logging.getLogger(__name__)

__all__ = ["HostMemoryTier", "NO_OVERFLOW_LIMIT"]

# The HostHashMap constructor's number of each overflow policy (its canonical name: config.OVERFLOW_POLICIES).
_POLICY_CODES = {"evict_random": 0, "evict_least_used": 1, "evict_oldest": 2}
# HPS's default overflow_margin is 2^64 - 1 ("no limit"); the map takes int64, so "no limit" is INT64_MAX.
NO_OVERFLOW_LIMIT = MAX_INT64
_MAX_PARTITIONS = 4096


@dataclasses.dataclass
class _Table:
    dim: int
    storage: str  # hps_core.storage name: how the map keeps the rows
    map: Any  # torch.classes.hps.HostHashMap; it locks itself
    handle: int  # map.handle(), kept: a method call on the map costs microseconds
    stats: TierStats = dataclasses.field(default_factory=TierStats)


class HostMemoryTier(Tier):
    """Partitioned in-memory hash maps (one per table tag) on the CPU; the first tier below the caches.

    Args:
        num_partitions: partitions per table, in [1, 4096]; None = min(16, CPU count) as HPS. A key's partition
            comes from its hash, so this must not change while data is kept elsewhere with the same layout.
        overflow_margin: max entries per partition; None = no limit (HPS default 2^64 - 1).
        overflow_policy: which rows go when a partition is full: "evict_random"/"random",
            "evict_least_used"/"least_used" (fewest fetch hits since last written), "evict_oldest"/"oldest"
            (least recently fetched or written).
        overflow_resolution_target: a full partition is pruned to overflow_margin * target entries, 0 < t < 1.
        allocation_rate: largest value page in bytes (pages grow with the table up to this); >= one row.
        max_batch_size: keys per native call; larger requests are chunked.
        seed: seeds evict_random (reproducible evictions).
        cache_missed_embeddings: HPS's flag, kept for the engine (copy rows found below into this tier).

    Example:
        >>> tier = HostMemoryTier(num_partitions=4, overflow_margin=1_000_000)
        >>> tier.create_table("hps_et.model.t0", dim=16)
        >>> tier.insert("hps_et.model.t0", torch.tensor([3, 7]), torch.ones(2, 16))
        2
        >>> values, found = tier.fetch("hps_et.model.t0", torch.tensor([3, 5]))  # float32 (2, 16), bool (2,)
        >>> found.tolist()
        [True, False]
        >>> tier.create_table("hps_et.model.t1", dim=16, storage="int8")   # rows (n, 24) int8: 16 codes + scale, bias
    """

    name = "host_memory"
    native_map = True
    can_drop_tables = True

    def __init__(
        self,
        num_partitions: int | None = None,
        overflow_margin: int | None = None,
        overflow_policy: str = "evict_random",
        overflow_resolution_target: float = 0.8,
        allocation_rate: int = 256 << 20,
        max_batch_size: int = 65536,
        seed: int = 0,
        cache_missed_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if num_partitions is None:
            num_partitions = max(1, min(16, os.cpu_count() or 1))
        self.num_partitions = check_int(num_partitions, "num_partitions", 1, _MAX_PARTITIONS)
        if overflow_margin is None:
            overflow_margin = NO_OVERFLOW_LIMIT
        self.overflow_margin = check_int(overflow_margin, "overflow_margin", 1, NO_OVERFLOW_LIMIT)
        if not isinstance(overflow_policy, str):
            raise TypeError(f"overflow_policy must be a str, got {type(overflow_policy).__name__} {overflow_policy!r}")
        policy = overflow_policy.strip().lower()
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow_policy must be one of {sorted(OVERFLOW_POLICIES)}, got {overflow_policy!r}")
        self.overflow_policy = policy
        if isinstance(overflow_resolution_target, (bool, np.bool_)) or not isinstance(
            overflow_resolution_target, (int, float, np.floating, np.integer)
        ):
            raise TypeError(
                "overflow_resolution_target must be a float in (0, 1), got "
                f"{type(overflow_resolution_target).__name__} {overflow_resolution_target!r}"
            )
        target = float(overflow_resolution_target)
        if not 0.0 < target < 1.0:
            raise ValueError(f"overflow_resolution_target must be in (0, 1), got {overflow_resolution_target!r}")
        self.overflow_resolution_target = target
        self.allocation_rate = check_int(allocation_rate, "allocation_rate", 4)
        self.max_batch_size = check_int(max_batch_size, "max_batch_size", 1)
        self.seed = check_int(seed, "seed", -(1 << 63), (1 << 63) - 1)
        self.cache_missed_embeddings = bool(cache_missed_embeddings)
        load_extension()
        self._tables_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ tables

    def create_table(self, tag: str, dim: int, storage: str = "float32") -> None:
        """Declare table `tag` with rows of `dim` kept as `storage` (idempotent for the same dim and storage; another
        dim or storage -> ValueError).

        Raises ValueError when `allocation_rate` is smaller than one stored row.
        """
        self._check_open()
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"tag must be a non-empty str, got {type(tag).__name__} {tag!r}")
        dim = check_int(dim, "dim", 1)
        storage = check_storage(storage, dim, tag)
        with self._tables_lock:
            table = self._tables.get(tag)
            if table is not None:
                if table.dim != dim:
                    raise ValueError(
                        f"table {tag!r} exists in the host-memory tier with dim {table.dim}, got dim {dim}"
                    )
                check_storage_match(tag, self._where, table.storage, storage)
                return
            row_bytes = bytes_per_row(storage, dim)
            if self.allocation_rate < row_bytes:
                raise ValueError(
                    f"allocation_rate must be at least one row of table {tag!r} (dim {dim} as {storage} = "
                    f"{row_bytes} bytes), got {self.allocation_rate}"
                )
            hmap = torch.classes.hps.HostHashMap(
                dim,
                self.num_partitions,
                self.overflow_margin,
                _POLICY_CODES[OVERFLOW_POLICIES[self.overflow_policy]],
                self.overflow_resolution_target,
                self.allocation_rate,
                self.seed,
                STORAGE_NAMES.index(storage),
            )
            self._tables[tag] = _Table(dim=dim, storage=storage, map=hmap, handle=hmap.handle())
            logger.debug("host-memory tier: created table %s (dim %d, %s, %d partitions)", tag, dim, storage,
                         self.num_partitions)

    def drop_table(self, tag: str) -> None:
        """Forget table `tag` and free its rows (a retired model's); unknown tags are ignored. Pipelines that read
        its map must be closed first."""
        self._check_open()
        with self._tables_lock:
            self._tables.pop(tag, None)

    @property
    def _where(self) -> str:
        return "the host-memory tier"

    def tags(self) -> list[str]:
        """Tags of the tables created so far."""
        return sorted(self._tables)

    def dim(self, tag: str) -> int:
        """Row length of table `tag`."""
        return self._table(tag).dim

    # ------------------------------------------------------------------------------------------------ data

    def fetch(self, tag: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys` (int64 (n,), CPU) -> (stored rows (n, width), found bool (n,)), CPU; missing rows are 0
        (float32 (n, dim) for a float32 table).

        Hits count as uses for the overflow policy (LFU count + 1, LRU time = now).

        Example:
            >>> values, found = tier.fetch("hps_et.model.t0", torch.tensor([3, 5]))
        """
        table = self._table(tag)
        keys = check_keys(keys)
        n = keys.numel()
        if n <= self.max_batch_size:
            values, found = table.map.fetch(keys)
        else:
            values = torch.empty((n, stored_width(table.storage, table.dim)), dtype=row_dtype(table.storage))
            found = torch.empty((n,), dtype=torch.bool)
            for start in range(0, n, self.max_batch_size):
                stop = min(start + self.max_batch_size, n)
                values[start:stop], found[start:stop] = table.map.fetch(keys[start:stop])
        return values, found

    def map_handle(self, tag: str) -> int:
        """The handle of the table's `torch.classes.hps.HostHashMap`, for the engine's lookup pipelines (they fetch
        misses from the map by handle, without a Python round trip; the map counts every fetch itself)."""
        return self._table(tag).handle

    def insert(self, tag: str, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Insert or overwrite rows: keys int64 (n,), values the table's stored rows (n, width) (float32 (n, dim) for a
        float32 table), CPU. Returns how many keys were new.

        A key repeated in `keys` keeps its last row. A write resets the key's LFU count to 0 (as HPS) and sets its
        LRU time to now. Full partitions are pruned first (overflow policy), so a partition never holds more than
        overflow_margin entries.
        """
        table = self._table(tag)
        keys = check_keys(keys)
        values = check_values(values, keys.numel(), table.dim, tag, table.storage)
        n = keys.numel()
        new = 0
        for start in range(0, n, self.max_batch_size):
            stop = min(start + self.max_batch_size, n)
            new += table.map.insert(keys[start:stop], values[start:stop])
        self._count(table.stats, keys_inserted=new)
        return new

    def erase(self, tag: str, keys: torch.Tensor) -> int:
        """Remove keys (int64 (n,), CPU); returns how many were present."""
        table = self._table(tag)
        keys = check_keys(keys)
        erased = 0
        for start in range(0, keys.numel(), self.max_batch_size):
            erased += table.map.erase(keys[start : start + self.max_batch_size])
        return erased

    def size(self, tag: str) -> int:
        """Number of keys stored for `tag`."""
        return int(self._table(tag).map.size())

    def reserve(self, tag: str, n: int) -> None:
        """Pre-size table `tag` for `n` entries in total (exact-size pages, no rehash while they arrive)."""
        self._table(tag).map.reserve(check_int(n, "n", 0))

    def memory_bytes(self, tag: str) -> int:
        """Bytes the table's map has allocated (index, value pages, access meta, free lists)."""
        return int(self._table(tag).map.memory_bytes())

    def partition_sizes(self, tag: str) -> list[int]:
        """Entries per partition of table `tag` (each is at most overflow_margin)."""
        return self._table(tag).map.partition_sizes().tolist()

    def export_keys(self, tag: str) -> torch.Tensor:
        """Every key stored for `tag`, int64 (size,), in no particular order (dumps, tests)."""
        return self._table(tag).map.export_keys()

    def load(self, tag: str, table: "TableFiles", progress: bool = True, storage: str = "float32") -> int:
        """Bulk-load table files (`hps_core.tables.TableFiles`) into `tag`; returns rows loaded.

        Creates the table with `table.dim` and `storage` when needed (an existing tag must have them), reserves room
        for all rows first (exact-size pages, no rehash), then encodes and inserts `max_batch_size` rows at a time
        (a source of stored rows - another tier's - is copied as it is). Rows beyond the overflow margin evict
        others as any insert does. A block the storage cannot keep raises ValueError naming it; the blocks before
        it stay loaded.

        Example:
            >>> tier.load("hps_et.model.t0", hps_core.tables.open_table("/data/model/t0", dim=16))
            1000
        """
        self._check_open()
        check_table_files(table)
        self.create_table(tag, table.dim, storage)
        entry = self._table(tag)
        self.reserve(tag, entry.map.size() + int(table.num_keys))
        loaded = 0
        where = str(getattr(table, "path", tag))
        for keys, vectors in table.iter_chunks(self.max_batch_size, progress=progress, desc=f"host memory <- {tag}"):
            keys = torch.as_tensor(np.array(keys, dtype=np.int64)) if not isinstance(keys, torch.Tensor) else keys
            rows = to_stored(vectors, entry.storage, entry.dim, field=f"rows {loaded}.. of {where}")
            self.insert(tag, keys, rows)
            loaded += len(keys)
        logger.info(
            "host-memory tier: loaded %d rows into %s (%d stored, %.1f MiB)",
            loaded,
            tag,
            entry.map.size(),
            entry.map.memory_bytes() / 2**20,
        )
        return loaded

    # ------------------------------------------------------------------------------------------------ admin

    def stats(self) -> dict[str, TierStats]:
        """Counters per tag (copies)."""
        out = {}
        for tag, table in list(self._tables.items()):
            fetches, requested, found = table.map.fetch_counts()
            with self._stats_lock:
                out[tag] = dataclasses.replace(table.stats, keys_evicted=int(table.map.evictions()), fetches=fetches,
                                               keys_requested=requested, keys_found=found)
        return out

    def close(self) -> None:
        """Drop every table (frees the memory). Idempotent; later calls raise RuntimeError."""
        with self._tables_lock:
            self._tables.clear()
            self._closed = True
