"""Shared test helpers: devices and key dtypes to parametrise over, and ReferenceCache, an exact pure-Python model
of the cache op contract (cuda_ext/csrc/hps_ops.cpp) to compare the ops with, state tensor for state tensor.

ReferenceCache is written from the contract, not from the kernels: its hash (mix64 / bucket_of / digest_of) is
re-stated here in Python integers and must equal cache_layout.h bit for bit. It is deliberately slow and simple
(one key at a time, in input order). Importing this module does not load the native extension.

Example:
    >>> ref = ReferenceCache(num_buckets=1, dim=2)
    >>> ref.insert_or_assign([5, -1], np.ones((2, 2), np.float32))
    {'inserted': 2, 'assigned': 0, 'evicted': 0, 'refused': 0}
    >>> ref.find([5, 6])[1].tolist()
    [True, False]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "KEY_DTYPES",
    "BUCKET_SIZE",
    "CLOCK_LIMIT",
    "devices",
    "device_params",
    "mix64",
    "bucket_of",
    "digest_of",
    "hash_key",
    "ReferenceCache",
    "cache_state",
    "assert_state_equal",
    "CheckedCache",
]

KEY_DTYPES = [torch.int32, torch.int64]

# Restated from cache_layout.h so the model is independent of the code under test; tests check these against
# ops.bucket_size() / ops.clock_limit().
BUCKET_SIZE = 32
CLOCK_LIMIT = 1 << 30
POLICY_CODES = {"lru": 0, "lfu": 1}

_U64 = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
_I32_MIN = -(1 << 31)
COUNT_NAMES = ("inserted", "assigned", "evicted", "refused")


def devices() -> list[str]:
    """Devices to test on: "cpu", plus "cuda" when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels cannot be tested here (no GPU, or a CPU-only build of hps_core._C), or None."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("hps::cache_find", "CUDA"):
        from hps_core import build_info

        return f"hps_core._C has no CUDA kernels (build info: {build_info()})"
    return None


def device_params() -> list[Any]:
    """pytest parameters for every device: "cpu", and "cuda" marked `cuda` and skipped (with the reason) when no
    GPU is visible, so the skipped CUDA cases show in the report."""
    import pytest  # test-time dependency only

    cuda = pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")],
    )
    return ["cpu", cuda]


# ---------------------------------------------------------------------------------------------------- the hash


def mix64(x: int) -> int:
    """splitmix64 finalizer on the key's 64 bits (cache_layout.h mix64). `x` may be negative (two's complement)."""
    x &= _U64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _U64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _U64
    x ^= x >> 31
    return x


def bucket_of(h: int, num_buckets: int) -> int:
    """Bucket from the high 32 bits of the hash, by multiply-shift (cache_layout.h bucket_of)."""
    return ((h >> 32) * num_buckets) >> 32


def digest_of(h: int) -> int:
    """Low byte of the hash, 0 mapped to 1 (0 marks an empty slot)."""
    d = h & 0xFF
    return 1 if d == 0 else d


SKETCH_DEPTH = 4


def sketch_index(h: int, d: int, width: int) -> int:
    """Counter of key hash h in row d of an admission sketch of `width` (cache_layout.h sketch_index)."""
    return mix64((h + (d + 1) * 0x9E3779B97F4A7C15) & _U64) & (width - 1)


def hash_key(key: int, num_buckets: int) -> tuple[int, int]:
    """(bucket, digest) of one key (an int in the int64 range)."""
    h = mix64(int(key))
    return bucket_of(h, num_buckets), digest_of(h)


def _score_from_clock(clock: int) -> int:
    return max(_I32_MIN, min(_I32_MAX, clock))


def _key_list(keys: Any) -> list[int]:
    if isinstance(keys, torch.Tensor):
        return [int(k) for k in keys.detach().cpu().tolist()]
    return [int(k) for k in np.asarray(keys).reshape(-1).tolist()]


def _rows(values: Any, n: int, dim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float32).reshape(n, dim)
    return arr


# ---------------------------------------------------------------------------------------------------- the model


class ReferenceCache:
    """Exact model of the cache state and of every cache op, one key at a time.

    State (numpy, mirrors cache_state.h): slot_keys (S,) int64, digests (S,) uint8, scores (S,) int32,
    values (S, D) float32, clock (Python int). Empty slots keep their stale key and row, as the ops do.

    The op-level methods mirror hps_core.ops (find bumps the clock; insert_or_assign returns the four counts...);
    the object-level helpers mirror EmbeddingCache (export_batch is trimmed; export_buffers gives the op's buffers).
    """

    def __init__(self, num_buckets: int, dim: int, policy: str = "lru", sketch_width: int = 0) -> None:
        if policy not in POLICY_CODES:
            raise ValueError(f"policy must be one of {sorted(POLICY_CODES)}, found {policy!r}")
        # admission (LFU): a count-min sketch of SKETCH_DEPTH x sketch_width counters; 0 = no admission
        self.sketch = np.zeros(SKETCH_DEPTH * sketch_width, np.int64) if sketch_width else None
        self.sketch_width = int(sketch_width)
        self.num_buckets = int(num_buckets)
        self.num_slots = self.num_buckets * BUCKET_SIZE
        self.dim = int(dim)
        self.policy = policy
        self.slot_keys = np.zeros(self.num_slots, np.int64)
        self.digests = np.zeros(self.num_slots, np.uint8)
        self.scores = np.zeros(self.num_slots, np.int32)
        self.values = np.zeros((self.num_slots, self.dim), np.float32)
        self.clock = 0

    # ---------------------------------------------------------------- state in and out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], policy: str = "lru") -> ReferenceCache:
        """A model starting from a state dict (EmbeddingCache.state() or ReferenceCache.state(); tensors or arrays)."""
        values = np.asarray(_to_numpy(state["values"]))
        ref = cls(values.shape[0] // BUCKET_SIZE, values.shape[1], policy)
        ref.load_state(state)
        return ref

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Copy a state dict (tensors on any device, or numpy arrays) into the model."""
        self.slot_keys = np.array(_to_numpy(state["slot_keys"]), np.int64).reshape(self.num_slots)
        self.digests = np.array(_to_numpy(state["digests"]), np.uint8).reshape(self.num_slots)
        self.scores = np.array(_to_numpy(state["scores"]), np.int32).reshape(self.num_slots)
        self.values = np.array(_to_numpy(state["values"]), np.float32).reshape(self.num_slots, self.dim)
        self.clock = int(np.asarray(_to_numpy(state["clock"])).reshape(-1)[0])
        if "sketch" in state:
            self.sketch = np.array(_to_numpy(state["sketch"]), np.int64).reshape(-1)
            self.sketch_width = self.sketch.size // SKETCH_DEPTH

    def state(self) -> dict[str, Any]:
        """Copies of the state: numpy arrays, clock as a (1,) int64 array (the layout of the state tensors), and the
        sketch with admission."""
        state = {
            "slot_keys": self.slot_keys.copy(),
            "digests": self.digests.copy(),
            "scores": self.scores.copy(),
            "values": self.values.copy(),
            "clock": np.array([self.clock], np.int64),
        }
        if self.sketch is not None:
            state["sketch"] = self.sketch.copy()
        return state

    # ---------------------------------------------------------------- probes

    def _probe(self, key: int) -> tuple[int, int, int]:
        """(slot or -1, bucket base, digest) of a key."""
        bucket, digest = hash_key(key, self.num_buckets)
        base = bucket * BUCKET_SIZE
        for s in range(base, base + BUCKET_SIZE):
            if self.digests[s] == digest and int(self.slot_keys[s]) == key:
                return s, base, digest
        return -1, base, digest

    # ---------------------------------------------------------------- the ops

    def find(self, keys: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(values (n, D) float32 with zero rows for misses, found (n,) bool); bumps the clock if n > 0."""
        ks = _key_list(keys)
        out = np.zeros((len(ks), self.dim), np.float32)
        found = np.zeros(len(ks), bool)
        if not ks:
            return out, found
        self.clock += 1
        for i, k in enumerate(ks):
            s, _, _ = self._probe(k)
            if s < 0:
                continue
            found[i] = True
            out[i] = self.values[s]
            if self.policy == "lru":
                self.scores[s] = _score_from_clock(self.clock)
            else:
                self.scores[s] = min(int(self.scores[s]) + 1, _I32_MAX)
        return out, found

    def sketch_add(self, keys: Iterable[int], skip: Any = None) -> None:
        """+1 on the counters of each key whose skip entry is false (every key without skip)."""
        ks = _key_list(keys)
        skip = np.zeros(len(ks), bool) if skip is None else np.asarray(_to_numpy(skip), bool)
        for k, sk in zip(ks, skip):
            if not sk:
                h = mix64(int(k))
                for d in range(SKETCH_DEPTH):
                    self.sketch[d * self.sketch_width + sketch_index(h, d, self.sketch_width)] += 1

    def estimate(self, key: int) -> int:
        """The admission estimate of a key: the minimum of its counters."""
        h = mix64(int(key))
        return int(min(self.sketch[d * self.sketch_width + sketch_index(h, d, self.sketch_width)]
                       for d in range(SKETCH_DEPTH)))

    def contains(self, keys: Iterable[int]) -> np.ndarray:
        """found (n,) bool; no state change."""
        return np.array([self._probe(k)[0] >= 0 for k in _key_list(keys)], bool)

    def insert_or_assign(self, keys: Iterable[int], values: Any) -> dict[str, int]:
        """The sequential contract: input order, lowest free slot, evict lowest score (ties: lowest slot) among slots
        not written by this call, refuse when every slot of the bucket was written by this call. With a sketch: a key
        that would evict is refused unless its estimate beats the victim's score; new keys start at
        max(estimate, 1)."""
        ks = _key_list(keys)
        rows = _rows(values, len(ks), self.dim)
        counts = dict.fromkeys(COUNT_NAMES, 0)
        written: set[int] = set()
        new_score = _score_from_clock(self.clock) if self.policy == "lru" else 1
        for i, k in enumerate(ks):
            s, base, digest = self._probe(k)
            if s >= 0:
                self.values[s] = rows[i]
                written.add(s)
                counts["assigned"] += 1
                continue
            estimate = self.estimate(k) if self.sketch is not None else 0
            bucket_slots = range(base, base + BUCKET_SIZE)
            free = [j for j in bucket_slots if self.digests[j] == 0]
            if free:
                s = free[0]
            else:
                candidates = [j for j in bucket_slots if j not in written]
                if not candidates:
                    counts["refused"] += 1
                    continue
                s = min(candidates, key=lambda j: (int(self.scores[j]), j))
                if self.sketch is not None and estimate <= int(self.scores[s]):
                    counts["refused"] += 1
                    continue
                counts["evicted"] += 1
            self.slot_keys[s] = k
            self.digests[s] = digest
            self.scores[s] = max(estimate, new_score) if self.sketch is not None else new_score
            self.values[s] = rows[i]
            written.add(s)
            counts["inserted"] += 1
        return counts

    def assign(self, keys: Iterable[int], values: Any) -> int:
        """Overwrite present keys' rows (last duplicate wins); returns the number of present occurrences."""
        ks = _key_list(keys)
        rows = _rows(values, len(ks), self.dim)
        n = 0
        for i, k in enumerate(ks):
            s, _, _ = self._probe(k)
            if s >= 0:
                self.values[s] = rows[i]
                n += 1
        return n

    def erase(self, keys: Iterable[int]) -> int:
        """Free present keys' slots (digest 0, score 0); returns slots freed."""
        n = 0
        for k in _key_list(keys):
            s, _, _ = self._probe(k)
            if s >= 0:
                self.digests[s] = 0
                self.scores[s] = 0
                n += 1
        return n

    def export_buffers(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The op's result: keys (end-start,) int64 and values (end-start, D) float32, zero past count; count."""
        if not 0 <= start <= end <= self.num_slots:
            raise ValueError(f"export_batch needs 0 <= start <= end <= slots ({self.num_slots}), "
                             f"found start={start}, end={end}")
        keys = np.zeros(end - start, np.int64)
        vals = np.zeros((end - start, self.dim), np.float32)
        count = 0
        for s in range(start, end):
            if self.digests[s] != 0:
                keys[count] = self.slot_keys[s]
                vals[count] = self.values[s]
                count += 1
        return keys, vals, count

    def export_batch(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Occupied slots of [start, end) in slot order, trimmed to the count."""
        keys, vals, count = self.export_buffers(start, end)
        return keys[:count], vals[:count]

    def export_all(self) -> tuple[np.ndarray, np.ndarray]:
        return self.export_batch(0, self.num_slots)

    def clear(self) -> None:
        """Every slot empty, scores and clock zero (keys and rows stay, as in the op)."""
        self.digests[:] = 0
        self.scores[:] = 0
        self.clock = 0

    def size(self) -> int:
        return int(np.count_nonzero(self.digests))

    def decay(self) -> None:
        """Scores halved (floor); the clock too under LRU."""
        self.scores = (self.scores.astype(np.int64) >> 1).astype(np.int32)
        if self.policy == "lru":
            self.clock >>= 1

    def as_dict(self) -> dict[int, np.ndarray]:
        """{key: row} of the occupied slots."""
        return {int(self.slot_keys[s]): self.values[s].copy() for s in np.flatnonzero(self.digests)}


# ---------------------------------------------------------------------------------------------------- comparing


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cache_state(obj: Any) -> dict[str, np.ndarray]:
    """The state of an EmbeddingCache, a ReferenceCache or a state dict, as numpy arrays (copies)."""
    state = obj.state() if hasattr(obj, "state") else obj
    names = ("slot_keys", "digests", "scores", "values", "clock") + (("sketch",) if "sketch" in state else ())
    return {name: np.array(_to_numpy(state[name])) for name in names}


def assert_state_equal(actual: Any, expected: Any, context: str = "") -> None:
    """Exact, slot-for-slot equality of two cache states (values compared bitwise), with the first differences
    named in the assertion message."""
    a, e = cache_state(actual), cache_state(expected)
    problems = []
    if set(a) != set(e):
        problems.append(f"state parts {sorted(a)} != {sorted(e)}")
    for name in [n for n in a if n in e]:
        x, y = a[name], e[name]
        if name == "sketch":
            x, y = x.astype(np.int64), y.astype(np.int64)
        if x.shape != y.shape:
            problems.append(f"{name}: shape {x.shape} != {y.shape}")
            continue
        if name == "values":
            x, y = x.view(np.uint32), y.view(np.uint32)
        diff = np.argwhere(x != y)
        if len(diff):
            first = [tuple(int(v) for v in d) for d in diff[:5]]
            detail = ", ".join(f"{idx}: {x[idx]} != {y[idx]}" for idx in first)
            problems.append(f"{name}: {len(diff)} differ (actual != expected) {detail}")
    assert not problems, f"cache state differs{(' after ' + context) if context else ''}: " + "; ".join(problems)


class CheckedCache:
    """Runs every cache op on real state tensors (on `device`) and on a ReferenceCache side by side, and asserts
    after each call that the results and the whole state are exactly equal. Returns the op's results.

    The ops are called directly (hps_core.ops), not through EmbeddingCache, so the op contract is what is checked
    (no automatic LRU decay).
    """

    def __init__(self, num_buckets: int, dim: int, device: str | torch.device = "cpu", policy: str = "lru",
                 sketch_width: int = 0) -> None:
        from hps_core import ops  # loads the extension only when a checked cache is built

        self.ops = ops
        self.device = torch.device(device)
        self.policy = policy
        self.code = POLICY_CODES[policy]
        self.ref = ReferenceCache(num_buckets, dim, policy, sketch_width)
        self.sketch = (torch.zeros(SKETCH_DEPTH * sketch_width, dtype=torch.int32, device=self.device)
                       if sketch_width else None)
        s, dev = self.ref.num_slots, self.device
        self.slot_keys = torch.zeros(s, dtype=torch.int64, device=dev)
        self.digests = torch.zeros(s, dtype=torch.uint8, device=dev)
        self.scores = torch.zeros(s, dtype=torch.int32, device=dev)
        self.values = torch.zeros(s, dim, dtype=torch.float32, device=dev)
        self.clock = torch.zeros(1, dtype=torch.int64, device=dev)

    def state(self) -> dict[str, torch.Tensor]:
        state = {"slot_keys": self.slot_keys, "digests": self.digests, "scores": self.scores, "values": self.values,
                 "clock": self.clock}
        if self.sketch is not None:
            state["sketch"] = self.sketch
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Set both the tensors and the model from a state dict."""
        for name, dst in self.state().items():
            dst.copy_(torch.as_tensor(np.asarray(_to_numpy(state[name]))).to(dst.dtype))
        self.ref.load_state(state)

    def check(self, context: str) -> None:
        assert_state_equal(self, self.ref, context)

    def _keys(self, keys: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        if isinstance(keys, torch.Tensor):
            return keys.to(self.device)
        return torch.tensor(list(keys), dtype=dtype, device=self.device)

    def _rows(self, values: Any, n: int) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            return values.to(self.device, torch.float32)
        return torch.as_tensor(np.asarray(values, np.float32).reshape(n, self.ref.dim), device=self.device)

    def find(self, keys: Any, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._keys(keys, dtype)
        out, found = self.ops.cache_find(self.slot_keys, self.digests, self.scores, self.values, self.clock, k,
                                         self.code)
        eout, efound = self.ref.find(k)
        np.testing.assert_array_equal(found.cpu().numpy(), efound, err_msg="find: found mask")
        np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32), eout.view(np.uint32), err_msg="find: rows")
        self.check(f"find({k.tolist()})")
        return out, found

    def sketch_add(self, keys: Any, skip: Any = None, dtype: torch.dtype = torch.int64) -> None:
        k = self._keys(keys, dtype)
        sk = None if skip is None else torch.as_tensor(np.asarray(_to_numpy(skip), bool), device=self.device)
        self.ops.sketch_add(self.sketch, k, sk)
        self.ref.sketch_add(k, None if sk is None else sk.cpu().numpy())
        self.check(f"sketch_add({k.tolist()})")

    def contains(self, keys: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        k = self._keys(keys, dtype)
        found = self.ops.cache_contains(self.slot_keys, self.digests, k)
        np.testing.assert_array_equal(found.cpu().numpy(), self.ref.contains(k), err_msg="contains")
        self.check("contains")
        return found

    def insert_or_assign(self, keys: Any, values: Any, dtype: torch.dtype = torch.int64) -> dict[str, int]:
        k = self._keys(keys, dtype)
        v = self._rows(values, k.numel())
        counts = self.ops.cache_insert_or_assign(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                                                 k, v, self.code, self.sketch)
        got = dict(zip(COUNT_NAMES, counts.cpu().tolist()))
        expected = self.ref.insert_or_assign(k, v)
        assert got == expected, f"insert_or_assign({k.tolist()}) counts {got} != {expected}"
        self.check(f"insert_or_assign({k.tolist()})")
        return got

    def assign(self, keys: Any, values: Any, dtype: torch.dtype = torch.int64) -> int:
        k = self._keys(keys, dtype)
        v = self._rows(values, k.numel())
        got = int(self.ops.cache_assign(self.slot_keys, self.digests, self.values, k, v))
        expected = self.ref.assign(k, v)
        assert got == expected, f"assign({k.tolist()}) count {got} != {expected}"
        self.check(f"assign({k.tolist()})")
        return got

    def erase(self, keys: Any, dtype: torch.dtype = torch.int64) -> int:
        k = self._keys(keys, dtype)
        got = int(self.ops.cache_erase(self.slot_keys, self.digests, self.scores, k))
        expected = self.ref.erase(k)
        assert got == expected, f"erase({k.tolist()}) count {got} != {expected}"
        self.check(f"erase({k.tolist()})")
        return got

    def export_batch(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        keys, vals, count = self.ops.cache_export_batch(self.slot_keys, self.digests, self.values, start, end)
        ekeys, evals, ecount = self.ref.export_buffers(start, end)
        assert int(count) == ecount, f"export_batch({start}, {end}) count {int(count)} != {ecount}"
        np.testing.assert_array_equal(keys.cpu().numpy(), ekeys, err_msg="export_batch keys")
        np.testing.assert_array_equal(vals.cpu().numpy().view(np.uint32), evals.view(np.uint32),
                                      err_msg="export_batch values")
        self.check(f"export_batch({start}, {end})")
        return keys, vals, int(count)

    def clear(self) -> None:
        self.ops.cache_clear(self.digests, self.scores, self.clock)
        self.ref.clear()
        self.check("clear")

    def size(self) -> int:
        got = int(self.ops.cache_size(self.digests))
        assert got == self.ref.size(), f"size {got} != {self.ref.size()}"
        return got

    def decay(self) -> None:
        self.ops.cache_decay(self.scores, self.clock, self.code)
        self.ref.decay()
        self.check("decay")
