"""Caches whose `values` hold stored rows (issue 16): every storage of hps_core.storage, both policies, both devices.

A cache of any storage decides exactly what a float32 cache fed the same keys decides (found masks, scores,
evictions, refusals, the clock: rows never enter those decisions). Its rows are the float32 rows encoded once by the
caller and moved as bytes, so its values are encode_rows of the float32 cache's values, find returns
decode_rows(encode_rows(rows)) bit for bit, and export returns the stored bytes. Bad new_values (another dtype or
width) raise naming new_values and change nothing. EmbeddingCache(storage=...) encodes on the way in and decodes on
the way out. The tests marked `cuda` compare the CUDA twins with the CPU twins byte for byte for each storage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core import ops
from hps_core import storage as st
from hps_core.cache import EmbeddingCache
from hps_core.testing import KEY_DTYPES, cuda_skip_reason

STORAGES = st.STORAGE_NAMES
POLICIES = {"lru": ops.POLICY_LRU, "lfu": ops.POLICY_LFU}
COUNT_NAMES = ("inserted", "assigned", "evicted", "refused")
NUM_BUCKETS = 4


def dims(storage: str) -> list[int]:
    """Dims to test a storage at: int8 / fp8 need dim % 4 == 0; the others also take an odd dim (scalar paths)."""
    return [8, 12] if storage in ("int8", "fp8_e4m3") else [3, 8, 12]


STORAGE_DIMS = [(s, d) for s in STORAGES for d in dims(s)]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a 2-D tensor's rows, (n, row bytes) uint8 on the CPU (float8 has few CPU kernels: compare bytes)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, context: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{context}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
    g, w = as_bytes(got), as_bytes(want)
    bad = (g != w).any(dim=-1).nonzero().flatten()[:5].tolist() if g.dim() > 1 else []
    assert torch.equal(g, w), f"{context}: bytes differ (first rows {bad})"


def round_trip(rows: torch.Tensor, storage: str) -> torch.Tensor:
    """What a cache of `storage` gives back for float32 rows: decode_rows(encode_rows(rows))."""
    return st.decode_rows(st.encode_rows(rows, storage))


def randn(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))


def misaligned(stored: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of `stored` on `device` starting one element past an allocation's (aligned) base: the kernels' scalar
    and narrow-copy paths."""
    e = stored.element_size()
    raw = torch.zeros(stored.numel() * e + e, dtype=torch.uint8, device=device)[e:]
    out = raw.view(stored.dtype).view(stored.shape)
    out.view(torch.uint8).copy_(as_bytes(stored).to(device))
    return out


class State:
    """The state tensors of one cache of `storage`, as the ops take them; rows given as float32 are encoded here
    (the caller's job in the op contract), stored rows are passed as they are."""

    def __init__(self, storage: str, dim: int, policy: str, num_buckets: int = NUM_BUCKETS, device: str = "cpu",
                 sketch_width: int = 0) -> None:
        s = num_buckets * ops.bucket_size()
        self.storage, self.dim, self.policy, self.num_buckets = storage, dim, policy, num_buckets
        self.slot_keys = torch.zeros(s, dtype=torch.int64, device=device)
        self.digests = torch.zeros(s, dtype=torch.uint8, device=device)
        self.scores = torch.zeros(s, dtype=torch.int32, device=device)
        self.values = torch.zeros(s, st.stored_width(storage, dim), dtype=st.STORAGE_DTYPES[storage], device=device)
        self.clock = torch.zeros(1, dtype=torch.int64, device=device)
        self.sketch = (torch.zeros(ops.SKETCH_DEPTH * sketch_width, dtype=torch.int32, device=device)
                       if sketch_width else None)

    @property
    def device(self) -> torch.device:
        return self.slot_keys.device

    def to(self, device: str) -> State:
        """A copy on `device` (the same bytes)."""
        other = State(self.storage, self.dim, self.policy, self.num_buckets, device)
        for name in ("slot_keys", "digests", "scores", "clock"):
            getattr(other, name).copy_(getattr(self, name))
        other.values.view(torch.uint8).copy_(as_bytes(self.values).to(device))
        other.sketch = None if self.sketch is None else self.sketch.to(device, copy=True)
        return other

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Every state tensor's bytes, on the CPU."""
        snap = {n: getattr(self, n).cpu().clone() for n in ("slot_keys", "digests", "scores", "clock")}
        snap["values"] = as_bytes(self.values).clone()
        return snap

    def stored(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows (CPU) as this cache's stored rows on its device."""
        return st.encode_rows(rows, self.storage).to(self.device)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.cache_find(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                              keys.to(self.device), POLICIES[self.policy])

    def insert(self, keys: torch.Tensor, new_values: torch.Tensor) -> list[int]:
        """insert_or_assign of stored rows `new_values`; the counts."""
        return ops.cache_insert_or_assign(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                                          keys.to(self.device), new_values, POLICIES[self.policy],
                                          self.sketch).tolist()

    def insert_grouped(self, keys: torch.Tensor, new_values: torch.Tensor) -> list[int]:
        counts = torch.zeros(4, dtype=torch.int64, device=self.device)
        ops.cache_insert_grouped(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                                 keys.to(self.device), new_values, counts, POLICIES[self.policy], self.sketch)
        return counts.tolist()

    def assign(self, keys: torch.Tensor, new_values: torch.Tensor) -> int:
        return int(ops.cache_assign(self.slot_keys, self.digests, self.values, keys.to(self.device), new_values))

    def export(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        keys, values, count = ops.cache_export_batch(self.slot_keys, self.digests, self.values, start, end)
        return keys, values, int(count)

    def present_keys(self) -> np.ndarray:
        return self.slot_keys[self.digests != 0].cpu().numpy()


class Twins:
    """A float32 cache and a cache of `storage`, fed the same keys and rows; every call checks that the stored cache
    decided as the float32 one and holds its rows encoded."""

    def __init__(self, storage: str, dim: int, policy: str, num_buckets: int = NUM_BUCKETS,
                 sketch_width: int = 0) -> None:
        self.ref = State("float32", dim, policy, num_buckets, sketch_width=sketch_width)
        self.got = State(storage, dim, policy, num_buckets, sketch_width=sketch_width)

    def check(self, context: str) -> None:
        ref, got = self.ref, self.got
        for name in ("digests", "scores", "clock"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), f"{context}: {name} differ"
        occupied = ref.digests != 0
        assert torch.equal(got.slot_keys[occupied], ref.slot_keys[occupied]), f"{context}: slot keys differ"
        want = st.encode_rows(ref.values[occupied], got.storage)
        assert torch.equal(as_bytes(got.values)[occupied], as_bytes(want)), f"{context}: stored rows differ"
        if ref.sketch is not None:
            assert torch.equal(got.sketch, ref.sketch), f"{context}: sketch differs"

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        want, want_found = self.ref.find(keys)
        out, found = self.got.find(keys)
        assert torch.equal(found, want_found), "find: found masks differ"
        assert out.dtype == torch.float32 and out.shape == (keys.numel(), self.got.dim)
        expected = round_trip(want, self.got.storage)
        expected[~want_found] = 0.0
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), "find: rows are not the round trip"
        self.check("find")
        return found

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> list[int]:
        counts = self.got.insert(keys, self.got.stored(rows))
        assert counts == self.ref.insert(keys, rows), "insert_or_assign: counts differ"
        self.check("insert_or_assign")
        return counts

    def insert_grouped(self, keys: torch.Tensor, rows: torch.Tensor) -> list[int]:
        bucket, _ = ops.hash_keys(keys, self.ref.num_buckets)
        order = torch.sort(bucket, stable=True).indices
        keys, rows = keys[order], rows[order]
        counts = self.got.insert_grouped(keys, self.got.stored(rows))
        assert counts == self.ref.insert_grouped(keys, rows), "insert_grouped: counts differ"
        self.check("insert_grouped")
        return counts

    def assign(self, keys: torch.Tensor, rows: torch.Tensor) -> int:
        count = self.got.assign(keys, self.got.stored(rows))
        assert count == self.ref.assign(keys, rows), "assign: counts differ"
        self.check("assign")
        return count

    def export(self, start: int, end: int) -> int:
        want_keys, want_rows, want_count = self.ref.export(start, end)
        keys, rows, count = self.got.export(start, end)
        assert count == want_count and torch.equal(keys, want_keys), "export: keys differ"
        width = st.stored_width(self.got.storage, self.got.dim)
        assert rows.dtype == st.STORAGE_DTYPES[self.got.storage] and rows.shape == (end - start, width)
        assert_bytes_equal(rows[:count], st.encode_rows(want_rows[:count], self.got.storage), "export rows")
        assert not as_bytes(rows)[count:].any(), "export: the tail past count is not zero"
        return count


def fresh_keys(present: np.ndarray, rng: np.random.Generator, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    info = torch.iinfo(dtype)
    cand = rng.integers(info.min, info.max, size=2 * n + 8, dtype=np.int64, endpoint=True)
    cand = cand[~np.isin(cand, present)][:n]
    return torch.as_tensor(cand).to(dtype)


def mixed_query(present: np.ndarray, rng: np.random.Generator, n: int,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    hits = rng.choice(present, size=n) if present.size else np.zeros(0, np.int64)
    q = np.concatenate([hits, fresh_keys(present, rng, n, dtype).numpy()])
    return torch.as_tensor(rng.permutation(np.concatenate([q, q[: n // 4]]))).to(dtype)  # with duplicates


# ------------------------------------------------------------------------------------------------ the ops, CPU


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("storage,dim", STORAGE_DIMS)
def test_stored_cache_decides_as_float32_and_finds_the_round_trip(storage, dim, policy):
    rng = np.random.default_rng(dim)
    t = Twins(storage, dim, policy)
    slots = NUM_BUCKETS * ops.bucket_size()
    totals = np.zeros(4, np.int64)
    for _ in range(4):  # past capacity: evictions (and refusals in the fullest buckets); finds set the scores
        keys = fresh_keys(t.ref.present_keys(), rng, slots // 2)
        totals += t.insert(keys, randn(rng, keys.numel(), dim))
        t.find(mixed_query(t.ref.present_keys(), rng, slots // 3))
    assert totals[2] > 0, "the sequence must evict"
    present = t.ref.present_keys()
    again = torch.as_tensor(rng.choice(present, size=20))  # present keys (with duplicates): assigns
    t.insert(again, randn(rng, again.numel(), dim))
    t.find(torch.as_tensor(present))  # all hit
    t.find(fresh_keys(present, rng, 40))  # all miss
    t.find(torch.zeros(0, dtype=torch.int64))  # empty: no clock bump
    t.export(0, slots)
    t.export(5, 70)
    t.export(9, 9)


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("storage,dim", STORAGE_DIMS)
def test_assign_copies_stored_rows_of_present_keys(storage, dim, dtype):
    rng = np.random.default_rng(3)
    t = Twins(storage, dim, "lru")
    keys = fresh_keys(np.zeros(0, np.int64), rng, 60, dtype)
    t.insert(keys, randn(rng, keys.numel(), dim))
    q = torch.cat([keys[:10], keys[:10], fresh_keys(t.ref.present_keys(), rng, 10, dtype)])  # last duplicate wins
    assert t.assign(q, randn(rng, q.numel(), dim)) == 20
    t.find(keys)
    assert t.assign(q[:0], randn(rng, 0, dim)) == 0


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("storage", STORAGES)
def test_insert_grouped(storage, policy):
    rng = np.random.default_rng(4)
    t = Twins(storage, 8, policy, num_buckets=2)
    totals = np.zeros(4, np.int64)
    for _ in range(3):
        keys = fresh_keys(t.ref.present_keys(), rng, 50)
        keys = torch.cat([keys, keys[:5]])  # later duplicates assign
        totals += t.insert_grouped(keys, randn(rng, keys.numel(), 8))
        t.find(mixed_query(t.ref.present_keys(), rng, 30))
    assert totals[2] > 0 and totals[1] > 0


@pytest.mark.parametrize("storage", STORAGES)
def test_admission_sketch_works_on_stored_rows(storage):
    rng = np.random.default_rng(5)
    t = Twins(storage, 8, "lfu", num_buckets=1, sketch_width=64)
    resident = torch.arange(32)
    t.insert(resident, randn(rng, 32, 8))
    for _ in range(3):
        t.find(resident[:16])  # half the slots get hot (score 4), half stay at 1
    hot, cold = torch.arange(100, 110), torch.arange(200, 210)
    for _ in range(5):
        ops.sketch_add(t.ref.sketch, hot)
        ops.sketch_add(t.got.sketch, hot)
    ops.sketch_add(t.ref.sketch, cold)
    ops.sketch_add(t.got.sketch, cold)
    counts = t.insert(torch.cat([cold, hot]), randn(rng, 20, 8))
    assert counts[3] > 0 and counts[2] > 0, f"admission must refuse the cold keys and admit the hot ones: {counts}"
    t.find(torch.cat([hot, cold, resident]))


@pytest.mark.parametrize("storage", STORAGES)
def test_bad_new_values_raise_naming_new_values_and_change_nothing(storage):
    rng = np.random.default_rng(6)
    s = State(storage, 8, "lfu", sketch_width=64)
    keys = torch.arange(40)
    s.insert(keys, s.stored(randn(rng, 40, 8)))
    before = s.snapshot()
    q = torch.arange(30, 50)
    good = s.stored(randn(rng, q.numel(), 8))
    other = "float16" if storage == "float32" else "float32"
    wrong_dtype = st.encode_rows(randn(rng, q.numel(), 8), other)
    wrong_width = s.stored(randn(rng, q.numel(), 12))
    calls = {
        "insert_or_assign": s.insert,
        "insert_grouped": s.insert_grouped,
        "assign": s.assign,
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"new_values must have dtype \w+ \(the cache's stored rows\), found "):
            call(q, wrong_dtype)
        with pytest.raises(ValueError, match=rf"new_values must have width {good.shape[1]} \(the cache's stored rows "
                                             rf"of dim 8\), found {wrong_width.shape[1]}"):
            call(q, wrong_width)
        with pytest.raises(ValueError, match="new_values must have one row per key"):
            call(q, good[:3])
        after = s.snapshot()
        for field, tensor in before.items():
            assert torch.equal(after[field], tensor), f"{name}: {field} changed by a refused call"


def test_new_values_dtype_message_names_both_dtypes():
    s = State("float16", 4, "lru")
    with pytest.raises(TypeError, match=r"new_values must have dtype Half \(the cache's stored rows\), found Float"):
        s.insert(torch.tensor([1]), torch.zeros(1, 4))


@pytest.mark.parametrize("storage", STORAGES)
def test_values_of_a_non_storage_dtype_raise(storage):
    s = State(storage, 4, "lru")
    with pytest.raises(TypeError, match="values must hold stored rows"):
        ops.cache_find(s.slot_keys, s.digests, s.scores, torch.zeros(s.values.shape, dtype=torch.float64), s.clock,
                       torch.tensor([1]), 0)
    if storage in ("int8", "fp8_e4m3"):  # a stored width shorter than the scale tail
        short = torch.zeros(s.values.shape[0], 1, dtype=s.values.dtype)
        with pytest.raises(ValueError, match="values: a .* stored row holds at least"):
            ops.cache_export_batch(s.slot_keys, s.digests, short, 0, 4)


@pytest.mark.parametrize("storage", STORAGES)
def test_opcheck_with_stored_values(storage):
    rng = np.random.default_rng(7)
    s = State(storage, 8, "lru")
    s.insert(torch.arange(40), s.stored(randn(rng, 40, 8)))
    q = torch.tensor([1, 2, 1, 1000, -5, 39, 2])
    nv = s.stored(randn(rng, q.numel(), 8))
    # torch's schema check cannot compare float8 tensors on the CPU (as in test_codec): the other checks still run.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") \
        if storage == "fp8_e4m3" else None
    kw = {"test_utils": utils} if utils else {}
    state = (s.slot_keys, s.digests, s.scores, s.values, s.clock)
    torch.library.opcheck(torch.ops.hps.cache_find.default, (*state, q, ops.POLICY_LRU), **kw)
    torch.library.opcheck(torch.ops.hps.cache_insert_or_assign.default, (*state, q, nv, ops.POLICY_LRU), **kw)
    torch.library.opcheck(torch.ops.hps.cache_assign.default, (s.slot_keys, s.digests, s.values, q, nv), **kw)
    torch.library.opcheck(torch.ops.hps.cache_export_batch.default, (s.slot_keys, s.digests, s.values, 3, 45), **kw)


# ------------------------------------------------------------------------------------------------ EmbeddingCache


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("storage", STORAGES)
def test_embedding_cache_storage_end_to_end(storage, policy):
    dim = 8
    rng = np.random.default_rng(8)
    c = EmbeddingCache(64, dim, policy=policy, storage=storage)
    ref = EmbeddingCache(64, dim, policy=policy)
    assert c.storage == storage
    assert c.values.dtype == st.STORAGE_DTYPES[storage] and c.values.shape == (64, st.stored_width(storage, dim))
    assert c.memory_bytes() == ref.memory_bytes() - 64 * dim * 4 + 64 * st.bytes_per_row(storage, dim)
    keys = torch.arange(100)  # past capacity: evictions
    rows = randn(rng, 100, dim)
    assert c.insert_or_assign(keys, rows) == ref.insert_or_assign(keys, rows)
    out, found = c.find(keys)
    ref_out, ref_found = ref.find(keys)
    assert torch.equal(found, ref_found) and out.dtype == torch.float32
    want = round_trip(ref_out, storage)
    want[~ref_found] = 0.0
    assert torch.equal(out, want)
    assert c.assign(keys[:50], rows[50:]) == ref.assign(keys[:50], rows[50:])
    counts = torch.zeros(4, dtype=torch.int64)
    bucket, _ = ops.hash_keys(keys[:10], c.num_buckets)
    order = torch.sort(bucket, stable=True).indices
    c.insert_grouped(keys[:10][order], rows[:10][order], counts)
    ref.insert_grouped(keys[:10][order], rows[:10][order], torch.zeros(4, dtype=torch.int64))
    got_keys, got_rows = c.export_all()
    ref_keys, ref_rows = ref.export_all()
    assert torch.equal(got_keys, ref_keys)
    assert got_rows.dtype == torch.float32 and torch.equal(got_rows, round_trip(ref_rows, storage))
    if storage == "float32":
        assert torch.equal(got_rows, ref_rows)
    assert repr(c).endswith(f"storage={storage!r})") == (storage != "float32")


@pytest.mark.parametrize("alias,name", [("fp16", "float16"), ("BF16", "bfloat16"), (torch.float8_e4m3fn, "fp8_e4m3"),
                                        (torch.float32, "float32")])
def test_embedding_cache_storage_aliases(alias, name):
    assert EmbeddingCache(32, 4, storage=alias).storage == name


@pytest.mark.parametrize("storage", ["int8", "fp8_e4m3"])
def test_embedding_cache_scaled_storage_needs_dim_multiple_of_4(storage):
    with pytest.raises(ValueError, match=f"dim must be a multiple of 4 for {storage} storage .*found 6"):
        EmbeddingCache(32, 6, storage=storage)


def test_embedding_cache_unknown_storage():
    with pytest.raises(ValueError, match="storage must be one of float32, .* found 'int4'"):
        EmbeddingCache(32, 4, storage="int4")


@pytest.mark.parametrize("storage,bad,message", [
    ("int8", float("inf"), "values: row 1 holds inf at column 2; int8 storage keeps finite rows only"),
    ("fp8_e4m3", float("nan"), "values: row 1 holds nan at column 2; fp8_e4m3"),
    ("float16", 1e6, "values: row 1 holds 1000000.0 at column 2, beyond float16's range"),
])
def test_embedding_cache_refuses_rows_it_cannot_store_and_writes_nothing(storage, bad, message):
    c = EmbeddingCache(64, 4, policy="lfu", storage=storage)
    c.insert_or_assign(torch.arange(10), torch.ones(10, 4))
    before = {k: as_bytes(v.view(1, -1) if v.dim() < 2 else v).clone() for k, v in c.state().items()}
    rows = torch.zeros(3, 4)
    rows[1, 2] = bad
    for call in (lambda: c.insert_or_assign(torch.tensor([20, 21, 22]), rows),
                 lambda: c.assign(torch.tensor([1, 2, 3]), rows),
                 lambda: c.insert_grouped(torch.tensor([20, 21, 22]), rows, torch.zeros(4, dtype=torch.int64))):
        with pytest.raises(ValueError, match=message):
            call()
    for k, v in c.state().items():
        assert torch.equal(as_bytes(v.view(1, -1) if v.dim() < 2 else v), before[k]), f"{k} changed"
    assert c.size() == 10


# ------------------------------------------------------------------------------------------------ CUDA == CPU


_CUDA_REASON = cuda_skip_reason()
CUDA = pytest.mark.skipif(_CUDA_REASON is not None, reason=_CUDA_REASON or "")


def assert_same_state(gpu: State, cpu: State, context: str) -> None:
    g, c = gpu.snapshot(), cpu.snapshot()
    occupied = c["digests"] != 0
    assert torch.equal(g["digests"], c["digests"]), f"{context}: digests differ"
    assert torch.equal(g["slot_keys"][occupied], c["slot_keys"][occupied]), f"{context}: slot keys differ"
    assert torch.equal(g["scores"], c["scores"]), f"{context}: scores differ"
    assert torch.equal(g["clock"], c["clock"]), f"{context}: clock differs"
    assert torch.equal(g["values"], c["values"]), f"{context}: stored rows differ"


def assert_same_find(gpu: State, cpu: State, keys: torch.Tensor, context: str) -> None:
    out, found = gpu.find(keys.cuda())
    want, want_found = cpu.find(keys)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.equal(found.cpu(), want_found), f"{context}: found differs"
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32)), f"{context}: rows differ"
    assert_same_state(gpu, cpu, context)


def assert_same_export(gpu: State, cpu: State, start: int, end: int) -> None:
    keys, rows, count = gpu.export(start, end)
    want_keys, want_rows, want_count = cpu.export(start, end)
    assert count == want_count and torch.equal(keys.cpu(), want_keys), f"export({start}, {end}): keys differ"
    assert_bytes_equal(rows, want_rows, f"export({start}, {end})")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("storage,dim", STORAGE_DIMS + [("float32", 1), ("float16", 1), ("bfloat16", 5),
                                                        ("int8", 4), ("fp8_e4m3", 128), ("int8", 128)])
def test_cuda_matches_cpu(storage, dim, policy, dtype):
    rng = np.random.default_rng(dim + 100)
    cpu = State(storage, dim, policy)
    cpu.clock.fill_(int(rng.integers(10, 1000)))
    gpu = cpu.to("cuda")
    slots = NUM_BUCKETS * ops.bucket_size()
    totals = np.zeros(4, np.int64)
    for round_ in range(4):  # past capacity: evictions and refusals, with finds between that set the scores
        keys = fresh_keys(cpu.present_keys(), rng, 3 * slots if round_ == 3 else slots // 2, dtype)
        keys = torch.cat([keys, keys[:7]])  # later duplicates assign
        rows = cpu.stored(randn(rng, keys.numel(), dim))  # encoded once: both twins get the same bytes
        counts = cpu.insert(keys, rows)
        assert gpu.insert(keys, rows.cuda()) == counts, f"insert round {round_}: counts differ"
        totals += counts
        assert_same_state(gpu, cpu, f"insert round {round_}")
        q = mixed_query(cpu.present_keys(), rng, slots // 3, dtype)
        assert_same_find(gpu, cpu, q, f"find round {round_}")
    assert totals[2] > 0 and totals[3] > 0, "the sequence must evict and refuse"
    present = torch.as_tensor(cpu.present_keys()).to(dtype)
    assert_same_find(gpu, cpu, present, "all hit")
    assert_same_find(gpu, cpu, present[:0], "empty")
    q = torch.cat([present[:20], present[:20], fresh_keys(cpu.present_keys(), rng, 10, dtype)])
    rows = cpu.stored(randn(rng, q.numel(), dim))
    assert gpu.assign(q, rows.cuda()) == cpu.assign(q, rows)
    assert_same_state(gpu, cpu, "assign")
    keys = fresh_keys(cpu.present_keys(), rng, 60, dtype)
    order = torch.sort(ops.hash_keys(keys, NUM_BUCKETS)[0], stable=True).indices
    keys = keys[order]
    rows = cpu.stored(randn(rng, keys.numel(), dim))
    assert gpu.insert_grouped(keys, rows.cuda()) == cpu.insert_grouped(keys, rows)
    assert_same_state(gpu, cpu, "insert_grouped")
    for start, end in ((0, slots), (3, 77), (64, 64)):
        assert_same_export(gpu, cpu, start, end)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("storage,dim", STORAGE_DIMS)
def test_cuda_matches_cpu_on_misaligned_rows(storage, dim, policy):
    """values and new_values one element past an aligned base: the find's scalar decode, narrow byte copies."""
    rng = np.random.default_rng(dim + 200)
    cpu = State(storage, dim, policy)
    gpu = cpu.to("cuda")
    gpu.values = misaligned(gpu.values, "cuda")
    assert gpu.values.data_ptr() % 16 != 0
    for round_ in range(3):
        keys = fresh_keys(cpu.present_keys(), rng, 80)
        rows = cpu.stored(randn(rng, keys.numel(), dim))
        assert gpu.insert(keys, misaligned(rows, "cuda")) == cpu.insert(keys, rows), f"round {round_}: counts"
        assert_same_state(gpu, cpu, f"misaligned insert round {round_}")
        assert_same_find(gpu, cpu, mixed_query(cpu.present_keys(), rng, 40), f"misaligned find round {round_}")
    q = torch.as_tensor(cpu.present_keys()[:30])
    rows = cpu.stored(randn(rng, q.numel(), dim))
    assert gpu.assign(q, misaligned(rows, "cuda")) == cpu.assign(q, rows)
    assert_same_state(gpu, cpu, "misaligned assign")
    assert_same_export(gpu, cpu, 1, 120)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("storage", STORAGES)
def test_cuda_admission_matches_cpu(storage):
    rng = np.random.default_rng(9)
    cpu = State(storage, 8, "lfu", num_buckets=1, sketch_width=64)
    resident = torch.arange(32)
    cpu.insert(resident, cpu.stored(randn(rng, 32, 8)))
    for _ in range(3):
        cpu.find(resident[:16])
    gpu = cpu.to("cuda")
    hot, cold = torch.arange(100, 110), torch.arange(200, 210)
    for s in (cpu, gpu):
        for _ in range(5):
            ops.sketch_add(s.sketch, hot.to(s.device))
        ops.sketch_add(s.sketch, cold.to(s.device))
    keys = torch.cat([cold, hot])
    rows = cpu.stored(randn(rng, 20, 8))
    counts = cpu.insert(keys, rows)
    assert counts[3] > 0 and counts[2] > 0
    assert gpu.insert(keys, rows.cuda()) == counts
    assert_same_state(gpu, cpu, "admission")

