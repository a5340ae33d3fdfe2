"""Typed Python wrappers over the embedding-cache ops `torch.ops.hps.*`, and the fake (meta) kernel of every op.

The ops and their contract are declared once in cuda_ext/csrc/hps_ops.cpp; the state tensors are described in
cuda_ext/csrc/cache_state.h. The fake kernels below give shapes and dtypes only, so the ops work under
`torch.compile`, `torch.export` and FakeTensor tracing: every data-dependent size comes back as a fixed-capacity
buffer plus a count tensor. The lookup-pipeline ops (compact_misses, scatter_rows, bag_reduce) have their wrappers
in hps_core.pipeline_ops but their fakes here: torch accepts a fake only from the module hps_ops.cpp names with
m.set_python_module.

Importing this module loads the native extension (hps_core._C); it raises ImportError with the reason if the
extension cannot be used.

Example:
    >>> import torch
    >>> from hps_core import ops
    >>> bucket, digest = ops.hash_keys(torch.tensor([1, -1]), num_buckets=4)
    >>> ops.bucket_size()
    32
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from hps_core._loader import load_extension

load_extension()

__all__ = [
    "POLICY_LRU",
    "POLICY_LFU",
    "POLICIES",
    "bucket_size",
    "clock_limit",
    "hash_keys",
    "cache_find",
    "cache_contains",
    "cache_insert_or_assign",
    "cache_assign",
    "cache_erase",
    "cache_export_batch",
    "cache_clear",
    "cache_size",
    "cache_decay",
    "sketch_add",
    "sketch_width",
    "SKETCH_DEPTH",
    "cache_find_misses",
    "resident_index_build",
    "resident_find",
    "gather_rows",
]

# Policy codes of the `policy` argument (cache_layout.h: kPolicyLRU, kPolicyLFU). NOTE: no op exports them, so they
# are the one pair of constants mirrored here; the C++ check_policy names both values if they ever drift.
POLICY_LRU = 0
POLICY_LFU = 1
POLICIES = {"lru": POLICY_LRU, "lfu": POLICY_LFU}


@functools.cache
def bucket_size() -> int:
    """Slots per bucket (kBucketSize, 32), read from the extension."""
    return int(torch.ops.hps.bucket_size())


@functools.cache
def clock_limit() -> int:
    """kClockLimit (2**30): the LRU clock is halved (with the scores) before it reaches this."""
    return int(torch.ops.hps.clock_limit())


# ----------------------------------------------------------------------------------------------------------------
# Wrappers. Devices: every tensor of one call on one device (CPU kernels always; CUDA when the extension has them).
# ----------------------------------------------------------------------------------------------------------------


def hash_keys(keys: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    """Bucket and digest of each key, as the cache kernels compute them.

    Args:
        keys: (n,) int32 or int64 (int32 keys are sign-extended: -5 and -5L are one key).
        num_buckets: in [1, 2**32).

    Returns:
        bucket (n,) int64 in [0, num_buckets), digest (n,) uint8 in [1, 255].
    """
    return torch.ops.hps.hash_keys.default(keys, num_buckets)


def cache_find(
    slot_keys: Tensor, digests: Tensor, scores: Tensor, values: Tensor, clock: Tensor, keys: Tensor, policy: int
) -> tuple[Tensor, Tensor]:
    """Look keys up; hits are copied out and their scores touched (mutates `scores`, and `clock` if n > 0).

    Args:
        slot_keys (S,) int64, digests (S,) uint8, scores (S,) int32, values (S, W) stored rows of any storage
            (hps_core.storage; W its stored width for dim D), clock (1,) int64: the cache state; keys: (n,)
            int32/int64; policy: POLICY_LRU or POLICY_LFU.

    Returns:
        out (n, D) float32 (hits decoded, zero rows for misses), found (n,) bool.
    """
    return torch.ops.hps.cache_find.default(slot_keys, digests, scores, values, clock, keys, policy)


def cache_contains(slot_keys: Tensor, digests: Tensor, keys: Tensor) -> Tensor:
    """found (n,) bool for keys (n,) int32/int64; changes nothing."""
    return torch.ops.hps.cache_contains.default(slot_keys, digests, keys)


def cache_insert_or_assign(
    slot_keys: Tensor,
    digests: Tensor,
    scores: Tensor,
    values: Tensor,
    clock: Tensor,
    keys: Tensor,
    new_values: Tensor,
    policy: int,
    sketch: Tensor | None = None,
) -> Tensor:
    """Insert new keys / overwrite present ones, as if one at a time in input order (mutates the state).

    Args:
        keys: (n,) int32/int64; new_values: (n, W) stored rows of values' dtype and width (encode float32 rows
            with hps_core.storage.encode_rows; they are copied as they are); the rest: the cache state (see
            cache_find).
        sketch: an admission sketch (LFU only; see sketch_add): a key that would evict is admitted only if its
            estimate is above the victim's score, and starts at max(estimate, 1).

    Returns:
        counts (4,) int64: [inserted, assigned, evicted, refused]; inserted + assigned + refused == n and evicted
        counts the inserts that displaced a key.
    """
    return torch.ops.hps.cache_insert_or_assign.default(
        slot_keys, digests, scores, values, clock, keys, new_values, policy, sketch
    )


def cache_insert_grouped(
    slot_keys: Tensor,
    digests: Tensor,
    scores: Tensor,
    values: Tensor,
    clock: Tensor,
    keys: Tensor,
    new_values: Tensor,
    counts: Tensor,
    policy: int,
    sketch: Tensor | None = None,
) -> None:
    """cache_insert_or_assign for keys already in non-decreasing bucket order (as the lookup pipeline plans its
    misses): one launch on CUDA, and [inserted, assigned, evicted, refused] ADDED to `counts` (4,) int64.

    The same result as cache_insert_or_assign on the same keys. The CPU twin raises ValueError on keys out of bucket
    order before writing anything; the CUDA twin does not check (see hps_ops.cpp).
    """
    torch.ops.hps.cache_insert_grouped.default(slot_keys, digests, scores, values, clock, keys, new_values, counts,
                                               policy, sketch)


def sketch_width(slots: int) -> int:
    """Counters per row of the admission sketch of a cache of `slots` slots (cache_layout.h sketch_width_for)."""
    return int(torch.ops.hps.sketch_width(int(slots)))


# Counters per key in an admission sketch (cache_layout.h kSketchDepth): a sketch of width W is (SKETCH_DEPTH * W,)
# int32, W a power of two.
SKETCH_DEPTH = 4


def sketch_add(sketch: Tensor, keys: Tensor, skip: Tensor | None = None) -> None:
    """Admission sketch: +1 on the counters of every key (n,) whose `skip` (n,) bool is false - every key without
    it; duplicates count each time. What a find's misses add (`skip` = found). Mutates `sketch`."""
    torch.ops.hps.sketch_add.default(sketch, keys, skip)


def cache_assign(slot_keys: Tensor, digests: Tensor, values: Tensor, keys: Tensor, new_values: Tensor) -> Tensor:
    """Overwrite the rows of present keys only (mutates `values`); last duplicate wins. new_values (n, W) are stored
    rows of values' dtype and width.

    Returns:
        0-d int64: the number of keys (occurrences in `keys`) that were present.
    """
    return torch.ops.hps.cache_assign.default(slot_keys, digests, values, keys, new_values)


def cache_erase(slot_keys: Tensor, digests: Tensor, scores: Tensor, keys: Tensor) -> Tensor:
    """Free the slots of present keys (digest and score set to 0; mutates `digests`, `scores`).

    Returns:
        0-d int64: slots freed (a key given twice counts once).
    """
    return torch.ops.hps.cache_erase.default(slot_keys, digests, scores, keys)


def cache_export_batch(
    slot_keys: Tensor, digests: Tensor, values: Tensor, start: int, end: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Occupied slots of the slot range [start, end), in slot order, packed into fixed-capacity buffers.

    Returns:
        keys (end - start,) int64, values (end - start, W) the stored rows (values' dtype and width; decode them
        with hps_core.storage.decode_rows), count 0-d int64; entries past count are zero.
    """
    return torch.ops.hps.cache_export_batch.default(slot_keys, digests, values, start, end)


def cache_clear(digests: Tensor, scores: Tensor, clock: Tensor) -> None:
    """Empty every slot; scores and clock to zero (mutates all three)."""
    torch.ops.hps.cache_clear.default(digests, scores, clock)


def cache_size(digests: Tensor) -> Tensor:
    """Occupied slots, 0-d int64."""
    return torch.ops.hps.cache_size.default(digests)


def cache_decay(scores: Tensor, clock: Tensor, policy: int) -> None:
    """Halve every score (floor); for LRU the clock too (mutates `scores`, and `clock` under LRU)."""
    torch.ops.hps.cache_decay.default(scores, clock, policy)


def cache_find_misses(slot_keys: Tensor, digests: Tensor, scores: Tensor, values: Tensor, clock: Tensor, keys: Tensor,
                      policy: int, default_value: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The lookup pipeline's find: cache_find's hits (scores and clock as cache_find), the default row for misses,
    and the misses as a list.

    Returns:
        out (n, D) float32; miss_positions (n,) int32 and miss_keys (n,) int64, valid up to miss_count (0-d int64,
        on the keys' device, so no host sync), in no particular order; zeros past the count.
    """
    return torch.ops.hps.cache_find_misses.default(slot_keys, digests, scores, values, clock, keys, policy,
                                                   default_value)


def resident_index_build(keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The resident index of rows 0..N-1 keyed by keys (N,) int64 CPU (a later duplicate's row wins).

    Returns:
        index_keys (S,) int64, index_digests (S,) uint8, index_rows (S,) int32, index_spill (S / 32,) uint8, CPU;
        S = the slots of buckets sized for N keys at load 0.8 (cuda_ext/csrc/lookup_layout.h).
    """
    return torch.ops.hps.resident_index_build.default(keys)


def resident_find(index_keys: Tensor, index_digests: Tensor, index_rows: Tensor, index_spill: Tensor, rows: Tensor,
                  keys: Tensor, default_value: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows of keys from a resident table (index from resident_index_build on keys' device, rows (R, D) there or
    pinned on the host for a GPU index): out (n, D), the default row where the index lacks the key; the misses as
    cache_find_misses gives them."""
    return torch.ops.hps.resident_find.default(index_keys, index_digests, index_rows, index_spill, rows, keys,
                                               default_value)


GATHER_STRATEGIES = {"auto": 0, "zero_copy": 1, "staged": 2}


def gather_rows(table: Tensor, rows: Tensor, strategy: str = "auto") -> Tensor:
    """out[i] = table[rows[i]] (zeros where rows[i] is outside the table), on rows' device.

    Args:
        table: float32 (N, D) on the CPU, on rows' CUDA device, or in host memory read from a CUDA device.
        rows: int64 (n,).
        strategy: for a host table and CUDA rows, how the rows travel (the result is the same): "zero_copy" (the
            kernel reads pinned memory over the bus; no host sync), "staged" (CPU threads gather into pinned
            buffers the copy engine moves; syncs the host), "auto" (zero-copy for a pinned table, staged for a
            pageable one).

    Example:
        >>> gather_rows(torch.eye(3), torch.tensor([2, 0, 5]))  # last row is zeros
    """
    if strategy not in GATHER_STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(GATHER_STRATEGIES)}, found {strategy!r}")
    return torch.ops.hps.gather_rows.default(table, rows, GATHER_STRATEGIES[strategy])


# ----------------------------------------------------------------------------------------------------------------
# Lookup pipelines (hps_core.pipeline): the op hps::lookup(handle, keys) names one by handle. The fake kernel needs
# the table's dim, which the Python side registers here with the handle.
# ----------------------------------------------------------------------------------------------------------------

_PIPELINE_DIMS: dict[int, int] = {}


def register_pipeline_dim(handle: int, dim: int) -> None:
    _PIPELINE_DIMS[handle] = dim


def unregister_pipeline_dim(handle: int) -> None:
    _PIPELINE_DIMS.pop(handle, None)


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (no data is read). Checks are limited to what shapes decide.
# ----------------------------------------------------------------------------------------------------------------


def _fake_check_keys(keys: Tensor) -> None:
    torch._check(keys.dim() == 1, lambda: f"keys must be 1-D, found shape {tuple(keys.shape)}")
    torch._check(
        keys.dtype in (torch.int32, torch.int64), lambda: f"keys must be int64 or int32, found {keys.dtype}"
    )


@torch.library.register_fake("hps::hash_keys")
def _hash_keys_fake(keys: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    _fake_check_keys(keys)
    n = keys.shape[0]
    return keys.new_empty((n,), dtype=torch.int64), keys.new_empty((n,), dtype=torch.uint8)


@torch.library.register_fake("hps::cache_find")
def _cache_find_fake(slot_keys, digests, scores, values, clock, keys, policy):
    from hps_core.storage import dim_of_stored

    _fake_check_keys(keys)
    n = keys.shape[0]
    return (values.new_empty((n, dim_of_stored(values)), dtype=torch.float32),
            keys.new_empty((n,), dtype=torch.bool))


@torch.library.register_fake("hps::cache_contains")
def _cache_contains_fake(slot_keys, digests, keys):
    _fake_check_keys(keys)
    return keys.new_empty((keys.shape[0],), dtype=torch.bool)


@torch.library.register_fake("hps::cache_insert_or_assign")
def _cache_insert_or_assign_fake(slot_keys, digests, scores, values, clock, keys, new_values, policy, sketch=None):
    _fake_check_keys(keys)
    torch._check(new_values.dim() == 2, lambda: f"new_values must be 2-D, found shape {tuple(new_values.shape)}")
    return slot_keys.new_empty((4,), dtype=torch.int64)


@torch.library.register_fake("hps::sketch_add")
def _sketch_add_fake(sketch, keys, skip=None):
    _fake_check_keys(keys)
    return None


@torch.library.register_fake("hps::cache_insert_grouped")
def _cache_insert_grouped_fake(slot_keys, digests, scores, values, clock, keys, new_values, counts, policy,
                               sketch=None):
    _fake_check_keys(keys)
    torch._check(new_values.dim() == 2, lambda: f"new_values must be 2-D, found shape {tuple(new_values.shape)}")
    return None


@torch.library.register_fake("hps::cache_assign")
def _cache_assign_fake(slot_keys, digests, values, keys, new_values):
    _fake_check_keys(keys)
    return slot_keys.new_empty((), dtype=torch.int64)


@torch.library.register_fake("hps::cache_erase")
def _cache_erase_fake(slot_keys, digests, scores, keys):
    _fake_check_keys(keys)
    return slot_keys.new_empty((), dtype=torch.int64)


@torch.library.register_fake("hps::cache_export_batch")
def _cache_export_batch_fake(slot_keys, digests, values, start, end):
    torch._check(
        0 <= start <= end <= slot_keys.shape[0],
        lambda: f"export_batch needs 0 <= start <= end <= slots ({slot_keys.shape[0]}), found start={start}, end={end}",
    )
    cap = end - start
    return (
        slot_keys.new_empty((cap,), dtype=torch.int64),
        values.new_empty((cap, values.shape[1])),  # stored rows, as `values`
        slot_keys.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("hps::cache_clear")
def _cache_clear_fake(digests, scores, clock):
    return None


@torch.library.register_fake("hps::cache_size")
def _cache_size_fake(digests):
    return digests.new_empty((), dtype=torch.int64)


@torch.library.register_fake("hps::cache_decay")
def _cache_decay_fake(scores, clock, policy):
    return None


@torch.library.register_fake("hps::compact_misses")
def _compact_misses_fake(keys: Tensor, found: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _fake_check_keys(keys)
    torch._check(found.dtype == torch.bool, lambda: f"found must have dtype torch.bool, found {found.dtype}")
    torch._check(
        found.dim() == 1 and found.shape[0] == keys.shape[0],
        lambda: f"found must have shape ({keys.shape[0]},), found {tuple(found.shape)}",
    )
    n = keys.shape[0]
    return (
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((2,), dtype=torch.int64),
    )


@torch.library.register_fake("hps::scatter_rows")
def _scatter_rows_fake(out: Tensor, positions: Tensor, inverse: Tensor, rows: Tensor, counts: Tensor) -> None:
    torch._check(out.dim() == 2, lambda: f"out must be 2-D, found shape {tuple(out.shape)}")
    torch._check(rows.dim() == 2, lambda: f"rows must be 2-D, found shape {tuple(rows.shape)}")
    return None


@torch.library.register_fake("hps::bag_reduce")
def _bag_reduce_fake(values: Tensor, offsets: Tensor, weights: Tensor | None, mode: int) -> Tensor:
    torch._check(values.dim() == 2, lambda: f"values must be 2-D, found shape {tuple(values.shape)}")
    torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, found shape {tuple(offsets.shape)}")
    torch._check(0 <= mode <= 2, lambda: f"mode must be 0 (sum), 1 (mean) or 2 (sqrtn), found {mode}")
    return values.new_empty((offsets.shape[0] - 1, values.shape[1]))


def _find_outputs_fake(keys: Tensor, dim: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = keys.shape[0]
    return (like.new_empty((n, dim)), keys.new_empty((n,), dtype=torch.int32), keys.new_empty((n,), dtype=torch.int64),
            keys.new_empty((), dtype=torch.int64))


@torch.library.register_fake("hps::cache_find_misses")
def _cache_find_misses_fake(slot_keys, digests, scores, values, clock, keys, policy, default_value):
    from hps_core.storage import dim_of_stored

    _fake_check_keys(keys)
    return _find_outputs_fake(keys, dim_of_stored(values), keys.new_empty((0,), dtype=torch.float32))


@torch.library.register_fake("hps::resident_find")
def _resident_find_fake(index_keys, index_digests, index_rows, index_spill, rows, keys, default_value):
    from hps_core.storage import dim_of_stored

    _fake_check_keys(keys)
    return _find_outputs_fake(keys, dim_of_stored(rows), keys.new_empty((0,), dtype=torch.float32))


@torch.library.register_fake("hps::resident_index_build")
def _resident_index_build_fake(keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(keys.dim() == 1, lambda: f"keys must be 1-D, found shape {tuple(keys.shape)}")
    torch._check(keys.dtype == torch.int64, lambda: f"keys must be int64, found {keys.dtype}")
    # The index grows when a key finds no room (resident_index.cpp), so its bucket count is known only after the build.
    slots = torch.library.get_ctx().new_dynamic_size() * bucket_size()
    return (keys.new_empty((slots,)), keys.new_empty((slots,), dtype=torch.uint8),
            keys.new_empty((slots,), dtype=torch.int32), keys.new_empty((slots // bucket_size(),), dtype=torch.uint8))


@torch.library.register_fake("hps::gather_rows")
def _gather_rows_fake(table: Tensor, rows: Tensor, strategy: int = 0) -> Tensor:
    return rows.new_empty((rows.shape[0], table.shape[1]), dtype=torch.float32)


@torch.library.register_fake("hps::encode_rows")
def _encode_rows_fake(rows: Tensor, storage: int) -> Tensor:
    from hps_core.storage import STORAGE_DTYPES, STORAGE_NAMES, stored_width

    torch._check(0 <= storage < len(STORAGE_NAMES), lambda: f"storage must be 0..4, found {storage}")
    name = STORAGE_NAMES[storage]
    return rows.new_empty((rows.shape[0], stored_width(name, rows.shape[1])), dtype=STORAGE_DTYPES[name])


@torch.library.register_fake("hps::decode_rows")
def _decode_rows_fake(stored: Tensor, dtype=None) -> Tensor:
    from hps_core.storage import dim_of_stored

    return stored.new_empty((stored.shape[0], dim_of_stored(stored)), dtype=dtype or torch.float32)


@torch.library.register_fake("hps::lookup")
def _lookup_fake(handle, keys, dtype=None):
    dim = _PIPELINE_DIMS.get(handle)
    torch._check(dim is not None, lambda: f"no lookup pipeline has handle {handle} in this process")
    return keys.new_empty((*keys.shape, dim), dtype=dtype if dtype is not None else torch.float32)
