"""EmbeddingCache: the state tensors of one set-associative embedding cache on one device, and its operations.

The cache holds no logic of its own beyond input validation and LRU clock management: every operation is one of the
`torch.ops.hps.cache_*` ops (hps_core.ops), whose contract is stated in cuda_ext/csrc/hps_ops.cpp. Keys live in
buckets of `bucket_size()` (32) slots chosen by a fixed hash; see cuda_ext/csrc/cache_layout.h.

A standalone object over the ops (for direct use, tests and kernel benchmarks): the engine does not use it - its
tables live in native lookup pipelines (hps_core.pipeline), which run the same kernels on state they own.

Thread safety: one EmbeddingCache must not be used by two threads at once when either call mutates it (find
mutates scores and the clock; insert/assign/erase/clear/decay mutate the state); there are no locks in here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from hps_core import ops
from hps_core import storage as st

log = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

COUNT_NAMES = ("inserted", "assigned", "evicted", "refused")
ADMISSIONS = (None, "tinylfu")
# Admission ageing: the sketch and the scores are halved every this many times num_slots keys looked up. Chosen with a
# Python simulation of this design (Zipf alpha 1.05, a 1% cache of 1 M keys, 2 M keys): window 40 gave 0.738, 100
# gave 0.740, 1000 gave 0.740 - longer windows gain little and follow a change of popularity more slowly.
ADMISSION_WINDOW = 100

# The host-side clock mirror is re-read from the device every this many finds. The mirror is exact as long as the
# state tensors are only changed through this object; the periodic re-read bounds the damage if someone writes the
# clock by hand without calling resync_clock() (kClockLimit leaves 2**30 finds of headroom below INT32_MAX).
_CLOCK_RESYNC_EVERY = 4096


def _normalise_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, found {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, found {value}")
    return value


class EmbeddingCache:
    """A set-associative cache of embedding rows keyed by int64 (or int32) keys, on one device; rows go in and come
    out as float32 and are kept in a storage dtype (float32 by default).

    Args:
        capacity: rows wanted; rounded UP to whole buckets of `ops.bucket_size()` slots (at least one bucket).
        dim: embedding dimension D.
        device: where the state lives ("cpu", "cuda", "cuda:1", ...). Every key/value tensor passed in must be on it.
        policy: "lru" (score = logical clock of the last find that hit the key) or "lfu" (score = hit count).
            A full bucket evicts its lowest-score slot.
        admission: None, or "tinylfu" (LFU only): a count-min sketch (4 x ops.sketch_width(num_slots) int32
            counters: the next power of two >= max(4 x num_slots, 2^16)) counts each find's misses; an insert that would evict admits the key only if its
            estimate is above the victim's hit count, and gives it the estimate as its score - a key seen once
            cannot push out a hot one. Every `ADMISSION_WINDOW` x num_slots keys looked up, the sketch and the
            scores are halved (ageing), so the counts follow a changing popularity.
        storage: how rows are kept (hps_core.storage: "float32", "float16", "bfloat16", "int8", "fp8_e4m3", or an
            alias / torch dtype). Rows are encoded once on the way in (a row the storage cannot keep - non-finite
            for int8 / fp8, past float16's range - raises ValueError and nothing is written) and decoded on the way
            out, so find and export return float32 within the storage's error bound. int8 and fp8_e4m3 need
            dim % 4 == 0.

    Attributes:
        num_buckets, num_slots, dim, device, policy, storage.
        State tensors (on `device`): slot_keys (S,) int64, digests (S,) uint8 (0 = empty), scores (S,) int32,
        values (S, W) stored rows in the storage's dtype (W = storage.stored_width(storage, dim); (S, D) float32
        by default), clock (1,) int64. If you write them directly, call resync_clock() afterwards.

    LRU clock: every non-empty find bumps the clock by one. Before a find would take the clock to
    `ops.clock_limit()` (2**30), the cache calls decay(), which halves every score and the clock, so int32 scores
    never saturate and the recency order is kept. The cache counts finds in a host-side mirror of the clock, so
    this check costs no device synchronisation. LFU scores saturate at INT32_MAX; ageing them with decay() is the
    caller's choice.

    Example:
        >>> cache = EmbeddingCache(capacity=1000, dim=4)
        >>> cache.num_slots
        1024
        >>> cache.insert_or_assign(torch.tensor([7, 8]), torch.ones(2, 4))
        {'inserted': 2, 'assigned': 0, 'evicted': 0, 'refused': 0}
        >>> values, found = cache.find(torch.tensor([7, 9]))
        >>> found.tolist()
        [True, False]
        >>> EmbeddingCache(capacity=64, dim=8, storage="int8").values.shape  # 8 int8 + scale and bias
        torch.Size([64, 16])
    """

    def __init__(self, capacity: int, dim: int, device: str | torch.device = "cpu", policy: str = "lru",
                 admission: str | None = None, storage: str | torch.dtype = "float32") -> None:
        capacity = _check_positive_int("capacity", capacity)
        self.dim = _check_positive_int("dim", dim)
        self.storage = st.storage_name(storage)
        if self.storage in ("int8", "fp8_e4m3") and self.dim % 4:
            raise ValueError(f"dim must be a multiple of 4 for {self.storage} storage (its row-wise scale follows "
                             f"the row), found {self.dim}")
        if not isinstance(policy, str) or policy.lower() not in ops.POLICIES:
            raise ValueError(f"policy must be one of {sorted(ops.POLICIES)}, found {policy!r}")
        self.policy = policy.lower()
        self._policy_code = ops.POLICIES[self.policy]
        try:
            self.device = _normalise_device(device)
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"device must name a torch device, found {device!r}: {exc}") from exc
        bucket = ops.bucket_size()
        self.num_buckets = max(1, -(-capacity // bucket))
        if self.num_buckets >= 1 << 32:
            raise ValueError(f"capacity must need fewer than 2**32 buckets of {bucket}, found capacity {capacity}")
        self.num_slots = self.num_buckets * bucket

        s, dev = self.num_slots, self.device
        self.slot_keys = torch.zeros(s, dtype=torch.int64, device=dev)  # (S,)
        self.digests = torch.zeros(s, dtype=torch.uint8, device=dev)  # (S,) 0 = empty
        self.scores = torch.zeros(s, dtype=torch.int32, device=dev)  # (S,)
        self.values = torch.zeros(s, st.stored_width(self.storage, self.dim), dtype=st.STORAGE_DTYPES[self.storage],
                                  device=dev)  # (S, W) stored rows
        self.clock = torch.zeros(1, dtype=torch.int64, device=dev)  # (1,)
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, found {admission!r}")
        if admission is not None and self._policy_code != ops.POLICY_LFU:
            raise ValueError(f"admission {admission!r} needs policy 'lfu' (it compares frequencies), found "
                             f"{self.policy!r}")
        self.admission = admission
        self.sketch: Tensor | None = None  # (SKETCH_DEPTH * width,) int32 with admission
        if admission is not None:
            self.sketch = torch.zeros(ops.SKETCH_DEPTH * ops.sketch_width(s), dtype=torch.int32, device=dev)
        self._keys_since_ageing = 0
        self._clock_host = 0  # mirror of clock[0]: +1 per non-empty find, >>1 per LRU decay, 0 on clear
        self._finds_since_resync = 0
        log.debug("EmbeddingCache: %d buckets x %d slots, dim %d, %s, %s, %s (%d bytes)", self.num_buckets, bucket,
                  self.dim, self.storage, self.policy, self.device, self.memory_bytes())

    @property
    def policy_code(self) -> int:
        """The policy as the ops take it (ops.POLICY_LRU / ops.POLICY_LFU)."""
        return self._policy_code

    def __repr__(self) -> str:
        extra = f", admission={self.admission!r}" if self.admission else ""
        extra += f", storage={self.storage!r}" if self.storage != "float32" else ""
        return (f"EmbeddingCache(num_slots={self.num_slots}, dim={self.dim}, device={str(self.device)!r}, "
                f"policy={self.policy!r}{extra})")

    # ------------------------------------------------------------------ validation (raise before anything changes)

    def _check_keys(self, keys: object, name: str = "keys") -> Tensor:
        if not isinstance(keys, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, found {type(keys).__name__}")
        if keys.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype int32 or int64, found {keys.dtype}")
        if keys.dim() != 1:
            raise ValueError(f"{name} must be 1-D (flatten them first), found shape {tuple(keys.shape)}")
        if keys.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, found {keys.device}")
        return keys.contiguous()

    def _check_values(self, values: object, n: int, name: str = "values") -> Tensor:
        if not isinstance(values, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, found {type(values).__name__}")
        if values.dtype != torch.float32:
            raise TypeError(f"{name} must have dtype float32, found {values.dtype}")
        if values.dim() != 2 or values.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n, {self.dim}), found {tuple(values.shape)}")
        if values.shape[0] != n:
            raise ValueError(f"{name} must have one row per key ({n} keys), found {values.shape[0]} rows")
        if values.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, found {values.device}")
        return values.contiguous()

    def _stored(self, values: object, n: int, name: str = "values") -> Tensor:
        """float32 rows (n, D), checked, as the cache's stored rows (the float32 rows themselves by default)."""
        values = self._check_values(values, n, name)
        if self.storage == "float32":
            return values
        st.check_encodable(values, self.storage, name)
        return st.encode_rows(values, self.storage)

    def _decoded(self, stored: Tensor) -> Tensor:
        """Stored rows as float32 rows (the stored rows themselves by default)."""
        return stored if self.storage == "float32" else st.decode_rows(stored)

    def _check_range(self, start: object, end: object) -> tuple[int, int]:
        for name, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int slot index, found {type(v).__name__} {v!r}")
        if not 0 <= start <= end <= self.num_slots:
            raise ValueError(f"export_batch needs 0 <= start <= end <= num_slots ({self.num_slots}), "
                             f"found start={start}, end={end}")
        return start, end

    # ------------------------------------------------------------------ clock management

    def resync_clock(self) -> int:
        """Re-read the clock from the state tensor into the host mirror (one device sync); returns it.

        Call it after writing `clock` (or loading state) directly.
        """
        self._clock_host = int(self.clock.item())
        self._finds_since_resync = 0
        return self._clock_host

    def _before_find(self) -> None:
        """LRU: decay before the coming clock bump would reach the clock limit."""
        self._finds_since_resync += 1
        if self._finds_since_resync >= _CLOCK_RESYNC_EVERY:
            self.resync_clock()
        if self._clock_host + 1 >= ops.clock_limit():
            log.debug("LRU clock %d near the limit %d: halving scores and clock", self._clock_host,
                      ops.clock_limit())
            self.decay()

    # ------------------------------------------------------------------ operations

    def find(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Look up keys; hits are copied out and their scores touched (LRU: the new clock; LFU: +1 per hit).

        Args:
            keys: (n,) int32/int64 on the cache's device; duplicates allowed.

        Returns:
            values (n, D) float32 (hits decoded from the storage, zero rows for misses), found (n,) bool; both on
            the cache's device.
        """
        keys = self._check_keys(keys)
        if keys.shape[0]:  # LRU decay when due, then the clock mirror's bump
            if self._policy_code == ops.POLICY_LRU:
                self._before_find()
            self._clock_host += 1
        values, found = ops.cache_find(self.slot_keys, self.digests, self.scores, self.values, self.clock, keys,
                                       self._policy_code)
        if self.sketch is not None and keys.shape[0]:
            ops.sketch_add(self.sketch, keys, found)  # the misses' counts (no host sync)
            self._keys_since_ageing += keys.shape[0]
            if self._keys_since_ageing >= ADMISSION_WINDOW * self.num_slots:
                self.age()
        return values, found

    def age(self) -> None:
        """Admission: halve the sketch's counters and the scores (what every ADMISSION_WINDOW x num_slots keys
        looked up do by themselves)."""
        if self.sketch is not None:
            self.sketch.bitwise_right_shift_(1)
        self.decay()
        self._keys_since_ageing = 0

    def contains(self, keys: Tensor) -> Tensor:
        """found (n,) bool for keys (n,) int32/int64 on the cache's device; no score or clock change."""
        keys = self._check_keys(keys)
        return ops.cache_contains(self.slot_keys, self.digests, keys)

    def insert_or_assign_no_sync(self, keys: Tensor, values: Tensor) -> Tensor:
        """insert_or_assign without reading the counts back (no device sync).

        Returns:
            counts (4,) int64 on the cache's device: [inserted, assigned, evicted, refused].
        """
        keys = self._check_keys(keys)
        values = self._stored(values, keys.shape[0])
        return ops.cache_insert_or_assign(self.slot_keys, self.digests, self.scores, self.values, self.clock, keys,
                                          values, self._policy_code, self.sketch)

    def insert_grouped(self, keys: Tensor, values: Tensor, counts: Tensor) -> None:
        """insert_or_assign for keys in non-decreasing bucket order (the lookup pipeline plans its misses so): one launch on
        CUDA, no sync; [inserted, assigned, evicted, refused] are added to `counts` ((4,) int64 on the device).
        The CPU raises ValueError for keys out of bucket order (the CUDA twin does not check)."""
        keys = self._check_keys(keys)
        values = self._stored(values, keys.shape[0])
        ops.cache_insert_grouped(self.slot_keys, self.digests, self.scores, self.values, self.clock, keys, values,
                                 counts, self._policy_code, self.sketch)

    def insert_or_assign(self, keys: Tensor, values: Tensor) -> dict[str, int]:
        """Store rows: present keys get the new row; new keys take a free slot or evict the lowest-score slot.

        Keys are applied in input order as if one at a time (a later duplicate assigns: last row wins). A key
        whose bucket has every slot written by this same call is refused.

        Args:
            keys: (n,) int32/int64; values: (n, D) float32; both on the cache's device.

        Returns:
            {"inserted", "assigned", "evicted", "refused"} as Python ints (reading them syncs the device);
            inserted + assigned + refused == n, evicted <= inserted.
        """
        counts = self.insert_or_assign_no_sync(keys, values).tolist()
        return dict(zip(COUNT_NAMES, counts))

    def assign(self, keys: Tensor, values: Tensor) -> int:
        """Overwrite the rows of keys already present (others are ignored; last duplicate wins); scores untouched.

        Args:
            keys: (n,) int32/int64; values: (n, D) float32; both on the cache's device.

        Returns:
            the number of keys (occurrences) that were present.
        """
        keys = self._check_keys(keys)
        values = self._stored(values, keys.shape[0])
        return int(ops.cache_assign(self.slot_keys, self.digests, self.values, keys, values))

    def erase(self, keys: Tensor) -> int:
        """Remove keys (n,) int32/int64; returns how many were present (a key given twice counts once)."""
        keys = self._check_keys(keys)
        return int(ops.cache_erase(self.slot_keys, self.digests, self.scores, keys))

    def export_batch(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and rows stored in the slot range [start, end), in slot order.

        Returns:
            keys (m,) int64, values (m, D) float32 (decoded from the storage) on the cache's device, m = occupied
            slots in the range.
        """
        start, end = self._check_range(start, end)
        keys, values, count = ops.cache_export_batch(self.slot_keys, self.digests, self.values, start, end)
        m = int(count)
        return keys[:m], self._decoded(values[:m])

    def iter_batches(self, batch_buckets: int = 1024) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield export_batch over the whole cache, `batch_buckets` buckets at a time (bounded memory)."""
        step = _check_positive_int("batch_buckets", batch_buckets) * ops.bucket_size()
        for start in range(0, self.num_slots, step):
            yield self.export_batch(start, min(start + step, self.num_slots))

    def export_all(self, batch_buckets: int = 1024) -> tuple[Tensor, Tensor]:
        """Every stored (key, row), in slot order: keys (m,) int64, values (m, D) float32 on the cache's device."""
        parts = list(self.iter_batches(batch_buckets))
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def clear(self) -> None:
        """Empty the cache; scores and clock to zero."""
        ops.cache_clear(self.digests, self.scores, self.clock)
        if self.sketch is not None:
            self.sketch.zero_()
        self._keys_since_ageing = 0
        self._clock_host = 0
        self._finds_since_resync = 0

    def size(self) -> int:
        """Occupied slots (syncs the device)."""
        return int(ops.cache_size(self.digests))

    def decay(self) -> None:
        """Halve every score (floor); under LRU the clock too, which keeps the recency order."""
        ops.cache_decay(self.scores, self.clock, self._policy_code)
        if self._policy_code == ops.POLICY_LRU:
            self._clock_host >>= 1

    # ------------------------------------------------------------------ state

    def memory_bytes(self) -> int:
        """Bytes held by the state tensors (the values as stored)."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def state(self) -> dict[str, Tensor]:
        """The state tensors themselves (not copies): slot_keys, digests, scores, values, clock (and sketch with
        admission)."""
        state = {"slot_keys": self.slot_keys, "digests": self.digests, "scores": self.scores, "values": self.values,
                 "clock": self.clock}
        if self.sketch is not None:
            state["sketch"] = self.sketch
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Copy a state (as returned by state(), from a cache of the same shape) into this cache.

        Raises KeyError for a missing tensor and ValueError/TypeError for a shape or dtype mismatch, before
        anything is copied.
        """
        mine = self.state()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise KeyError(f"state lacks {missing}; it needs {sorted(mine)}")
        for name, dst in mine.items():
            src = state[name]
            if not isinstance(src, Tensor) or src.dtype != dst.dtype:
                found = src.dtype if isinstance(src, Tensor) else type(src).__name__
                raise TypeError(f"state[{name!r}] must be a {dst.dtype} tensor, found {found}")
            if src.shape != dst.shape:
                raise ValueError(f"state[{name!r}] must have shape {tuple(dst.shape)}, found {tuple(src.shape)}")
        for name, dst in mine.items():
            dst.copy_(state[name])
        self.resync_clock()
