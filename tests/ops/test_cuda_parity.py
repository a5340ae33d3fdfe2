"""CUDA twins == CPU twins, exactly: every cache op and pipeline op is run on a CPU copy and a CUDA copy of the same
state with the same inputs, and the outputs AND the whole state (digests, keys of occupied slots, scores, values,
clock) must be equal bit for bit.

Cases: all-hit, all-miss, mixed, duplicates, extreme keys, zero-size; int32/int64 keys; LRU/LFU; dims 1, 3, 16, 128
(odd dims and misaligned rows take the scalar path of the kernels, the rest the 16-byte path); insert sequences that
force evictions and refusals. Plus opcheck on CUDA, a no-host-sync check of the lookup pipeline, and a
torch.compile(mode="reduce-overhead") (CUDA graph) regression test.

Every test is marked `cuda` and skipped, with the reason, without a GPU or without the extension's CUDA kernels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hps_core import ops, pipeline_ops
from hps_core.testing import KEY_DTYPES, cuda_skip_reason


_REASON = cuda_skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

POLICIES = {"lru": ops.POLICY_LRU, "lfu": ops.POLICY_LFU}
DIMS = [1, 3, 16, 128]
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def extremes(dtype: torch.dtype) -> list[int]:
    if dtype == torch.int32:
        return [I32_MIN, I32_MAX, 0, -1, 1, I32_MIN + 1, I32_MAX - 1]
    return [I64_MIN, I64_MAX, I32_MIN, I32_MAX, 0, -1, 1, I64_MIN + 1, I64_MAX - 1]


def random_keys(rng: np.random.Generator, n: int, dtype: torch.dtype) -> np.ndarray:
    info = torch.iinfo(dtype)
    return rng.integers(info.min, info.max, size=n, dtype=np.int64, endpoint=True)


def as_keys(arr, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(arr, dtype=np.int64)).to(dtype)


def randn(rng: np.random.Generator, n: int, dim: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))


# ------------------------------------------------------------------------------------------------------- the state


@dataclasses.dataclass
class State:
    slot_keys: torch.Tensor  # (S,) int64
    digests: torch.Tensor  # (S,) uint8
    scores: torch.Tensor  # (S,) int32
    values: torch.Tensor  # (S, D) float32
    clock: torch.Tensor  # (1,) int64

    @classmethod
    def empty(cls, num_buckets: int, dim: int, device: str = "cpu") -> State:
        s = num_buckets * ops.bucket_size()
        return cls(
            torch.zeros(s, dtype=torch.int64, device=device),
            torch.zeros(s, dtype=torch.uint8, device=device),
            torch.zeros(s, dtype=torch.int32, device=device),
            torch.zeros(s, dim, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The state tensors themselves, in op argument order (dataclasses.astuple would deep-copy them)."""
        return self.slot_keys, self.digests, self.scores, self.values, self.clock

    def to(self, device: str) -> State:
        """A copy on `device`."""
        return State(*(t.to(device, copy=True) for t in self.tensors()))

    def present_keys(self) -> np.ndarray:
        return self.slot_keys[self.digests != 0].cpu().numpy()

    def find(self, keys: torch.Tensor, policy: str):
        return ops.cache_find(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                              keys.to(self.slot_keys.device), POLICIES[policy])

    def insert(self, keys: torch.Tensor, rows: torch.Tensor, policy: str) -> torch.Tensor:
        dev = self.slot_keys.device
        return ops.cache_insert_or_assign(self.slot_keys, self.digests, self.scores, self.values, self.clock,
                                          keys.to(dev), rows.to(dev), POLICIES[policy])


def assert_same_state(gpu: State, cpu: State, context: str) -> None:
    g = gpu.to("cpu")
    assert torch.equal(g.digests, cpu.digests), f"{context}: digests differ"
    occupied = cpu.digests != 0
    assert torch.equal(g.slot_keys[occupied], cpu.slot_keys[occupied]), f"{context}: slot keys differ"
    assert torch.equal(g.scores, cpu.scores), f"{context}: scores differ at {torch.nonzero(g.scores != cpu.scores)[:5]}"
    assert torch.equal(g.values.view(torch.int32), cpu.values.view(torch.int32)), f"{context}: values differ"
    assert torch.equal(g.clock, cpu.clock), f"{context}: clock {g.clock.item()} != {cpu.clock.item()}"


def assert_same(gpu_out, cpu_out, context: str) -> None:
    """Outputs equal exactly (floats bitwise); tuples element by element."""
    if isinstance(cpu_out, (tuple, list)):
        assert len(gpu_out) == len(cpu_out)
        for i, (g, c) in enumerate(zip(gpu_out, cpu_out)):
            assert_same(g, c, f"{context}[{i}]")
        return
    if cpu_out is None:
        assert gpu_out is None
        return
    assert gpu_out.device.type == "cuda", f"{context}: output on {gpu_out.device}"
    g = gpu_out.cpu()
    assert g.dtype == cpu_out.dtype and g.shape == cpu_out.shape, f"{context}: {g.dtype}{tuple(g.shape)} != " \
        f"{cpu_out.dtype}{tuple(cpu_out.shape)}"
    if g.dtype == torch.float32:
        g, cpu_out = g.view(torch.int32), cpu_out.view(torch.int32)
    assert torch.equal(g, cpu_out), f"{context}: outputs differ"


def populated(policy: str, dtype: torch.dtype, dim: int, num_buckets: int = 8, seed: int = 0) -> State:
    """A CPU state built by the CPU ops: extremes + random keys inserted in rounds past capacity (evictions), with
    finds in between so that scores differ (and tie) across slots, and a clock well above zero."""
    rng = np.random.default_rng(seed)
    st = State.empty(num_buckets, dim)
    st.clock.fill_(int(rng.integers(10, 1000)))
    slots = num_buckets * ops.bucket_size()
    first = np.concatenate([extremes(dtype), random_keys(rng, slots // 2, dtype)])
    st.insert(as_keys(first, dtype), randn(rng, len(first), dim), policy)
    for _ in range(3):
        present = st.present_keys()
        st.find(as_keys(rng.choice(present, size=slots // 3), dtype), policy)
        fresh = random_keys(rng, slots // 3, dtype)
        st.insert(as_keys(fresh, dtype), randn(rng, len(fresh), dim), policy)
    return st


def absent_keys(st: State, rng: np.random.Generator, n: int, dtype: torch.dtype) -> np.ndarray:
    present = set(st.present_keys().tolist())
    cand = random_keys(rng, 2 * n + 8, dtype)
    return np.array([k for k in cand if int(k) not in present][:n], dtype=np.int64)


def query(st: State, case: str, rng: np.random.Generator, dtype: torch.dtype) -> np.ndarray:
    present = st.present_keys()
    if case == "empty":
        return np.zeros(0, np.int64)
    if case == "all_hit":
        return rng.choice(present, size=200)
    if case == "all_miss":
        return absent_keys(st, rng, 200, dtype)
    if case == "mixed":
        q = np.concatenate([rng.choice(present, size=100), absent_keys(st, rng, 100, dtype)])
        return rng.permutation(q)
    if case == "duplicates":
        few = np.concatenate([rng.choice(present, size=3), absent_keys(st, rng, 2, dtype)])
        return rng.choice(few, size=200)
    if case == "extremes":
        return rng.permutation(np.concatenate([extremes(dtype), extremes(dtype), rng.choice(present, size=20)]))
    raise AssertionError(case)


CASES = ["all_hit", "all_miss", "mixed", "duplicates", "extremes", "empty"]


# ------------------------------------------------------------------------------------------------------------ find


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_find(policy, dtype, dim, case):
    cpu = populated(policy, dtype, dim, seed=dim)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(CASES.index(case))
    for round_ in range(2):  # twice: the second call sees the scores/clock the first one wrote
        keys = as_keys(query(cpu, case, rng, dtype), dtype)
        want = cpu.find(keys, policy)
        got = gpu.find(keys.cuda(), policy)
        assert_same(got, want, f"find round {round_}")
        assert_same_state(gpu, cpu, f"find round {round_}")


def test_find_lfu_saturates_like_cpu():
    cpu = populated("lfu", torch.int64, 4)
    cpu.scores.fill_(I32_MAX - 3)
    gpu = cpu.to("cuda")
    present = cpu.present_keys()
    keys = as_keys(np.repeat(present[:5], 10), torch.int64)  # 10 hits per key: saturates
    assert_same(gpu.find(keys.cuda(), "lfu"), cpu.find(keys, "lfu"), "find")
    assert_same_state(gpu, cpu, "lfu saturation")
    assert int(cpu.scores.max()) == I32_MAX


@pytest.mark.parametrize("clock", [I32_MAX - 1, I32_MAX + 10, -5])
def test_lru_clock_outside_int32_saturates_like_cpu(clock):
    cpu = populated("lru", torch.int64, 4)
    cpu.clock.fill_(clock)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(1)
    keys = as_keys(query(cpu, "mixed", rng, torch.int64), torch.int64)
    assert_same(gpu.find(keys.cuda(), "lru"), cpu.find(keys, "lru"), "find")
    new = absent_keys(cpu, rng, 300, torch.int64)
    rows = randn(rng, len(new), 4)
    assert_same(gpu.insert(as_keys(new, torch.int64), rows, "lru"), cpu.insert(as_keys(new, torch.int64), rows, "lru"),
                "insert")
    assert_same_state(gpu, cpu, "big clock")


# ----------------------------------------------------------------------------------------------- insert_or_assign

INSERT_CASES = ["fresh", "evict", "refuse", "duplicates", "mixed", "empty"]


def insert_batch(st: State, case: str, rng: np.random.Generator, dtype: torch.dtype) -> np.ndarray:
    slots = st.digests.numel()
    present = st.present_keys()
    if case == "empty":
        return np.zeros(0, np.int64)
    if case in ("fresh", "evict"):  # new keys: free slots while there are some, then evictions
        return absent_keys(st, rng, slots // 2, dtype)
    if case == "refuse":  # far more new keys than a bucket holds: some buckets refuse
        return absent_keys(st, rng, 3 * slots, dtype)
    if case == "duplicates":
        pool = np.concatenate([rng.choice(present, size=min(10, len(present))) if len(present) else [],
                               absent_keys(st, rng, 10, dtype)]).astype(np.int64)
        return rng.choice(pool, size=150)
    if case == "mixed":
        pool = np.concatenate([rng.choice(present, size=min(60, len(present))) if len(present) else [],
                               absent_keys(st, rng, 60, dtype)]).astype(np.int64)
        return rng.permutation(pool)
    raise AssertionError(case)


@pytest.mark.parametrize("case", INSERT_CASES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_insert_or_assign(policy, dtype, dim, case):
    cpu = State.empty(4, dim) if case == "fresh" else populated(policy, dtype, dim, num_buckets=4, seed=dim + 1)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(INSERT_CASES.index(case) + 10)
    totals = np.zeros(4, np.int64)
    for round_ in range(3):  # rounds with finds between: evictions see the scores the finds wrote
        keys = as_keys(insert_batch(cpu, case, rng, dtype), dtype)
        rows = randn(rng, keys.numel(), dim)
        want = cpu.insert(keys, rows, policy)
        got = gpu.insert(keys.cuda(), rows.cuda(), policy)
        assert_same(got, want, f"insert round {round_} counts")
        assert_same_state(gpu, cpu, f"insert round {round_}")
        totals += want.numpy()
        q = as_keys(query(cpu, "mixed", rng, dtype), dtype) if cpu.present_keys().size else keys
        assert_same(gpu.find(q.cuda(), policy), cpu.find(q, policy), f"find after insert round {round_}")
        assert_same_state(gpu, cpu, f"find after insert round {round_}")
    if case in ("evict", "refuse"):
        assert totals[2] > 0, "the sequence must force evictions"
    if case == "refuse":
        assert totals[3] > 0, "the sequence must force refusals"


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_insert_misaligned_rows_take_the_scalar_path(policy):
    dim = 16  # a multiple of 4, but the new rows start 4 bytes past a 16-byte boundary
    cpu = populated(policy, torch.int64, dim, num_buckets=4)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(5)
    keys = as_keys(insert_batch(cpu, "mixed", rng, torch.int64), torch.int64)
    flat = torch.from_numpy(rng.standard_normal(keys.numel() * dim + 1).astype(np.float32))
    rows_cpu = flat[1:].view(keys.numel(), dim)
    rows_gpu = flat.cuda()[1:].view(keys.numel(), dim)
    assert rows_gpu.data_ptr() % 16 != 0
    assert_same(gpu.insert(keys.cuda(), rows_gpu, policy), cpu.insert(keys, rows_cpu, policy), "insert")
    assert_same_state(gpu, cpu, "misaligned insert")


def test_insert_all_equal_scores_evicts_lowest_slot_like_cpu():
    cpu = State.empty(1, 3)  # one bucket, LRU with one clock value: every score ties
    cpu.clock.fill_(7)
    rng = np.random.default_rng(2)
    keys = as_keys(np.arange(32), torch.int64)
    cpu.insert(keys, randn(rng, 32, 3), "lru")
    gpu = cpu.to("cuda")
    new = as_keys(np.arange(100, 140), torch.int64)  # 32 evictions (lowest slot first), then 8 refusals
    rows = randn(rng, 40, 3)
    want = cpu.insert(new, rows, "lru")
    assert want.tolist() == [32, 0, 32, 8]
    assert_same(gpu.insert(new.cuda(), rows.cuda(), "lru"), want, "insert")
    assert_same_state(gpu, cpu, "tie eviction")


# ------------------------------------------------------------------------------------------ assign, erase, queries


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_assign(dtype, dim, case):
    cpu = populated("lru", dtype, dim, seed=3)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(20 + CASES.index(case))
    keys = as_keys(query(cpu, case, rng, dtype), dtype)
    rows = randn(rng, keys.numel(), dim)
    want = ops.cache_assign(cpu.slot_keys, cpu.digests, cpu.values, keys, rows)
    got = ops.cache_assign(gpu.slot_keys, gpu.digests, gpu.values, keys.cuda(), rows.cuda())
    assert_same(got, want, "assign count")
    assert_same_state(gpu, cpu, "assign")


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_erase_then_reinsert(policy, dtype, case):
    cpu = populated(policy, dtype, 3, seed=4)
    gpu = cpu.to("cuda")
    rng = np.random.default_rng(30 + CASES.index(case))
    keys = as_keys(query(cpu, case, rng, dtype), dtype)
    want = ops.cache_erase(cpu.slot_keys, cpu.digests, cpu.scores, keys)
    got = ops.cache_erase(gpu.slot_keys, gpu.digests, gpu.scores, keys.cuda())
    assert_same(got, want, "erase count")
    assert_same_state(gpu, cpu, "erase")
    # Freed slots are reused in the same way on both devices.
    new = as_keys(absent_keys(cpu, rng, 150, dtype), dtype)
    rows = randn(rng, new.numel(), 3)
    assert_same(gpu.insert(new.cuda(), rows.cuda(), policy), cpu.insert(new, rows, policy), "reinsert")
    assert_same_state(gpu, cpu, "reinsert after erase")


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_contains_and_size(dtype, case):
    cpu = populated("lfu", dtype, 1, seed=5)
    gpu = cpu.to("cuda")
    keys = as_keys(query(cpu, case, np.random.default_rng(40), dtype), dtype)
    assert_same(ops.cache_contains(gpu.slot_keys, gpu.digests, keys.cuda()),
                ops.cache_contains(cpu.slot_keys, cpu.digests, keys), "contains")
    assert_same(ops.cache_size(gpu.digests), ops.cache_size(cpu.digests), "size")
    assert_same_state(gpu, cpu, "contains/size change nothing")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("span", [(0, None), (0, 0), (None, None), (5, 77), (32, 64), (1, 2)])
def test_export_batch(dim, span):
    cpu = populated("lru", torch.int64, dim, seed=6)
    ops.cache_erase(cpu.slot_keys, cpu.digests, cpu.scores, torch.from_numpy(cpu.present_keys()[::3].copy()))
    gpu = cpu.to("cuda")
    slots = cpu.digests.numel()
    start = slots if span[0] is None else span[0]
    end = slots if span[1] is None else span[1]
    want = ops.cache_export_batch(cpu.slot_keys, cpu.digests, cpu.values, start, end)
    got = ops.cache_export_batch(gpu.slot_keys, gpu.digests, gpu.values, start, end)
    assert_same(got, want, f"export_batch({start}, {end})")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_clear_and_decay(policy):
    cpu = populated(policy, torch.int64, 4, seed=7)
    cpu.scores[5] = -7  # a hand-written negative score: floor halving on both devices
    gpu = cpu.to("cuda")
    for step in range(3):
        ops.cache_decay(cpu.scores, cpu.clock, POLICIES[policy])
        ops.cache_decay(gpu.scores, gpu.clock, POLICIES[policy])
        assert_same_state(gpu, cpu, f"decay {step}")
    ops.cache_clear(cpu.digests, cpu.scores, cpu.clock)
    ops.cache_clear(gpu.digests, gpu.scores, gpu.clock)
    assert_same_state(gpu, cpu, "clear")
    assert int(ops.cache_size(gpu.digests)) == 0


@pytest.mark.parametrize("name", ["find", "contains", "insert", "assign", "erase", "export", "size", "clear", "decay"])
def test_bad_input_raises_on_cuda(name):
    st = populated("lru", torch.int64, 4).to("cuda")
    keys_cpu = torch.tensor([1, 2])
    rows = torch.ones(2, 4, device="cuda")
    calls = {
        "find": lambda: ops.cache_find(st.slot_keys, st.digests, st.scores, st.values, st.clock, keys_cpu, 0),
        "contains": lambda: ops.cache_contains(st.slot_keys, st.digests, keys_cpu),
        "insert": lambda: ops.cache_insert_or_assign(st.slot_keys, st.digests, st.scores, st.values, st.clock,
                                                     keys_cpu.cuda(), rows[:, :3].contiguous(), 0),
        "assign": lambda: ops.cache_assign(st.slot_keys, st.digests, st.values, keys_cpu.cuda().float(), rows),
        "erase": lambda: ops.cache_erase(st.slot_keys, st.digests, st.scores[:-1], keys_cpu.cuda()),
        "export": lambda: ops.cache_export_batch(st.slot_keys, st.digests, st.values, 5, 4),
        "size": lambda: ops.cache_size(st.digests[:-1]),
        "clear": lambda: ops.cache_clear(st.digests, st.scores, st.clock.cpu()),
        "decay": lambda: ops.cache_decay(st.scores, st.clock, 3),
    }
    before = st.to("cpu")
    with pytest.raises((ValueError, TypeError)):
        calls[name]()
    assert_same_state(st, before, f"bad {name} changes nothing")


# ---------------------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(dtype: torch.dtype) -> dict:
    st = populated("lru", dtype, 4, num_buckets=2).to("cuda")
    rng = np.random.default_rng(0)
    q = as_keys(query(st, "mixed", rng, dtype)[:20], dtype).cuda()
    nv = randn(rng, q.numel(), 4).cuda()
    sk, dg, sc, val, clk = st.tensors()
    found = ops.cache_contains(sk, dg, q)
    unique, positions, inverse, counts = pipeline_ops.compact_misses(q, found)
    values, offsets, weights = randn(rng, 10, 8).cuda(), torch.tensor([0, 3, 3, 10], device="cuda"), None
    return {
        "cache_find_lru": (torch.ops.hps.cache_find.default, (sk, dg, sc, val, clk, q, ops.POLICY_LRU)),
        "cache_find_lfu": (torch.ops.hps.cache_find.default, (sk, dg, sc, val, clk, q, ops.POLICY_LFU)),
        "cache_contains": (torch.ops.hps.cache_contains.default, (sk, dg, q)),
        "cache_insert_or_assign": (torch.ops.hps.cache_insert_or_assign.default,
                                   (sk, dg, sc, val, clk, q, nv, ops.POLICY_LFU)),
        "cache_assign": (torch.ops.hps.cache_assign.default, (sk, dg, val, q, nv)),
        "cache_erase": (torch.ops.hps.cache_erase.default, (sk, dg, sc, q)),
        "cache_export_batch": (torch.ops.hps.cache_export_batch.default, (sk, dg, val, 3, 45)),
        "cache_clear": (torch.ops.hps.cache_clear.default, (dg, sc, clk)),
        "cache_size": (torch.ops.hps.cache_size.default, (dg,)),
        "cache_decay_lru": (torch.ops.hps.cache_decay.default, (sc, clk, ops.POLICY_LRU)),
        "cache_decay_lfu": (torch.ops.hps.cache_decay.default, (sc, clk, ops.POLICY_LFU)),
        "compact_misses": (torch.ops.hps.compact_misses.default, (q, found)),
        "scatter_rows": (torch.ops.hps.scatter_rows.default,
                         (torch.zeros(q.numel(), 4, device="cuda"), positions, inverse,
                          randn(rng, q.numel(), 4).cuda(), counts)),
        "bag_reduce": (torch.ops.hps.bag_reduce.default, (values, offsets, weights, 1)),
        "bag_reduce_weighted": (torch.ops.hps.bag_reduce.default,
                                (values, offsets, torch.rand(10, device="cuda"), 2)),
    }


OPCHECK_NAMES = [
    "cache_find_lru", "cache_find_lfu", "cache_contains", "cache_insert_or_assign", "cache_assign", "cache_erase",
    "cache_export_batch", "cache_clear", "cache_size", "cache_decay_lru", "cache_decay_lfu", "compact_misses",
    "scatter_rows", "bag_reduce", "bag_reduce_weighted",
]


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck_cuda(dtype, name):
    op, args = _opcheck_cases(dtype)[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------- pipeline ops


@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("n, pool, p_found", [(0, 1, 0.5), (1, 1, 0.0), (1000, 5000, 1.0), (1000, 5000, 0.0),
                                              (3000, 40, 0.3), (70000, 20000, 0.6)])
def test_compact_misses_and_scatter_rows(dtype, n, pool, p_found):
    rng = np.random.default_rng(n + pool)
    values = np.concatenate([extremes(dtype), random_keys(rng, pool, dtype)])
    keys = as_keys(values[rng.integers(0, len(values), size=n)], dtype)
    found = torch.from_numpy(rng.random(n) < p_found)
    want = pipeline_ops.compact_misses(keys, found)
    got = pipeline_ops.compact_misses(keys.cuda(), found.cuda())
    assert_same(got, want, "compact_misses")  # buffers compared whole: the zero tails too
    n_unique = int(want[3][1])
    rows = randn(rng, n_unique, 16)
    out_cpu = randn(rng, n, 16)
    out_gpu = out_cpu.cuda()
    pipeline_ops.scatter_rows(out_cpu, *want[1:3], rows, want[3])
    pipeline_ops.scatter_rows(out_gpu, *got[1:3], rows.cuda(), got[3])
    assert_same(out_gpu, out_cpu, "scatter_rows")


@pytest.mark.parametrize("dim", [1, 3, 16, 128, 130, 300])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_bag_reduce_bitwise(dim, weighted, mode):
    rng = np.random.default_rng(dim)
    sizes = rng.integers(0, 50, size=200)
    sizes[:3] = [0, 4, 1]
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    n = int(offsets[-1])
    values = randn(rng, n, dim) * 100
    weights = torch.from_numpy(rng.uniform(-1, 3, size=n).astype(np.float32)) if weighted else None
    if weighted:
        weights[1:5] = 0.0  # bag 1: zero divisor
    want = pipeline_ops.bag_reduce(values, offsets, weights, mode)
    got = pipeline_ops.bag_reduce(values.cuda(), offsets.cuda(), None if weights is None else weights.cuda(), mode)
    assert_same(got, want, f"bag_reduce {mode}")
    # Misaligned values take the scalar path and must agree too.
    flat = torch.cat([torch.zeros(1), values.flatten()])
    mis = flat.cuda()[1:].view(n, dim)
    got2 = pipeline_ops.bag_reduce(mis, offsets.cuda(), None if weights is None else weights.cuda(), mode)
    assert_same(got2, want, f"bag_reduce {mode} misaligned")


# ------------------------------------------------------------------------------------- no host sync, CUDA graphs


def test_lookup_pipeline_does_not_sync_the_host():
    """find -> compact_misses -> scatter_rows -> insert_or_assign -> bag_reduce under sync_debug_mode="error":
    any hidden device-to-host synchronisation (a .item(), a nonzero) raises."""
    st = populated("lru", torch.int64, 16).to("cuda")
    rng = np.random.default_rng(8)
    keys = as_keys(query(st, "mixed", rng, torch.int64), torch.int64).cuda()
    rows = torch.randn(keys.numel(), 16, device="cuda")
    offsets = torch.arange(0, keys.numel() + 1, 10, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, found = st.find(keys, "lru")
        unique, positions, inverse, counts = pipeline_ops.compact_misses(keys, found)
        pipeline_ops.scatter_rows(out, positions, inverse, rows, counts)
        st.insert(unique, rows, "lru")  # capacity-n buffers: the tail keys are zeros, harmless for the check
        pipeline_ops.bag_reduce(out, offsets, None, "mean")
        ops.cache_size(st.digests)
        ops.cache_export_batch(st.slot_keys, st.digests, st.values, 0, 64)
        ops.cache_erase(st.slot_keys, st.digests, st.scores, keys[:10])
        ops.cache_decay(st.scores, st.clock, ops.POLICY_LRU)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


class CachedLookup(torch.nn.Module):
    """The hit path of a lookup as a module: the cache state lives in buffers (fixed addresses, as in the engine)."""

    def __init__(self, st: State) -> None:
        super().__init__()
        for name, t in zip(("slot_keys", "digests", "scores", "values", "clock"), st.tensors()):
            self.register_buffer(name, t)

    def forward(self, keys: torch.Tensor):
        out, found = torch.ops.hps.cache_find(self.slot_keys, self.digests, self.scores, self.values, self.clock, keys,
                                              ops.POLICY_LFU)
        unique, positions, inverse, counts = torch.ops.hps.compact_misses(keys, found)
        return out * 2.0, found, unique, positions, inverse, counts


def test_compile_reduce_overhead_matches_eager():
    """cache_find + compact_misses compiled with mode="reduce-overhead" (CUDA graphs) compiles, runs four times
    (warm-up, record, replays) and matches eager step by step, state included; a launch on the legacy default
    stream or a host sync inside the ops would break the capture, and a skip of CUDA graphs fails the test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = populated("lfu", torch.int64, 16).to("cuda")
    eager = CachedLookup(base.to("cuda"))
    compiled_state = base.to("cuda")
    fn = torch.compile(CachedLookup(compiled_state), mode="reduce-overhead")
    rng = np.random.default_rng(9)
    batches = [as_keys(query(base, "mixed", rng, torch.int64), torch.int64).cuda() for _ in range(4)]
    assert len({b.numel() for b in batches}) == 1  # one shape: one graph, recorded once and replayed
    for i, keys in enumerate(batches):
        got = [t.clone() for t in fn(keys)]  # clone: a replay reuses the output memory
        want = [t.cpu() for t in eager(keys)]
        assert_same(got, want, f"compiled call {i}")
        assert_same_state(compiled_state, State(*(t.cpu() for t in eager.buffers())), f"compiled call {i}")
    assert int(compiled_state.clock) == int(base.clock) + len(batches)  # the buffers themselves were mutated
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped (see the perf hints in the log)"
