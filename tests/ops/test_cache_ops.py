"""The cache ops (torch.ops.hps.cache_* and hash_keys) against the contract in cuda_ext/csrc/hps_ops.cpp.

Every case runs the op on real state tensors and on hps_core.testing.ReferenceCache (an exact Python model of the
contract) and compares results and the whole state slot for slot (CheckedCache), on every device and key dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core import ops
from hps_core.testing import (
    BUCKET_SIZE,
    CLOCK_LIMIT,
    KEY_DTYPES,
    CheckedCache,
    ReferenceCache,
    assert_state_equal,
    device_params,
    hash_key,
)

from op_builders import filled, rows

DEVICES = device_params()
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def extremes(dtype: torch.dtype) -> list[int]:
    """Keys at the dtype's extremes (and the int32 extremes inside int64)."""
    if dtype == torch.int32:
        return [I32_MIN, I32_MAX, 0, -1, 1, I32_MIN + 1, I32_MAX - 1]
    return [I64_MIN, I64_MAX, I32_MIN, I32_MAX, 0, -1, 1, I64_MIN + 1, I64_MAX - 1]


def keys_of_bucket(bucket: int, num_buckets: int, count: int, start: int = 0) -> list[int]:
    """`count` distinct keys that hash to `bucket` (searched with the Python hash)."""
    out, k = [], start
    while len(out) < count:
        if hash_key(k, num_buckets)[0] == bucket:
            out.append(k)
        k += 1
    return out


# ------------------------------------------------------------------------------------------------ constants, hash


def test_constants_come_from_cpp():
    assert ops.bucket_size() == BUCKET_SIZE
    assert ops.clock_limit() == CLOCK_LIMIT
    assert ops.POLICY_LRU == 0 and ops.POLICY_LFU == 1  # hps_ops.cpp / cache_layout.h kPolicyLRU, kPolicyLFU
    c = CheckedCache(1, 2)
    with pytest.raises(ValueError, match="policy must be 0 \\(LRU\\) or 1 \\(LFU\\), found 2"):
        ops.cache_decay(c.scores, c.clock, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("num_buckets", [1, 3, 1000, 2**32 - 1])
def test_hash_keys_matches_python(device, dtype, num_buckets):
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(num_buckets % 1000)
    random = torch.randint(info.min, info.max, (500,), generator=g, dtype=torch.int64).to(dtype)
    keys = torch.cat([torch.tensor(extremes(dtype), dtype=dtype), random]).to(device)
    bucket, digest = ops.hash_keys(keys, num_buckets)
    assert bucket.dtype == torch.int64 and digest.dtype == torch.uint8
    expected = [hash_key(k, num_buckets) for k in keys.cpu().tolist()]
    assert list(zip(bucket.cpu().tolist(), digest.cpu().tolist())) == expected
    assert int(digest.min()) >= 1 and 0 <= int(bucket.min()) and int(bucket.max()) < num_buckets


@pytest.mark.parametrize("device", DEVICES)
def test_int32_keys_are_sign_extended(device):
    k = [-5, -1, 0, 7, I32_MIN, I32_MAX]
    b32, d32 = ops.hash_keys(torch.tensor(k, dtype=torch.int32, device=device), 97)
    b64, d64 = ops.hash_keys(torch.tensor(k, dtype=torch.int64, device=device), 97)
    assert torch.equal(b32, b64) and torch.equal(d32, d64)


# ------------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_ops_compile_fullgraph(device):
    """The fake kernels let a function using the ops be traced whole (aot_eager: no C++ compile in the test)."""
    eager, compiled = filled(device), filled(device)

    def step(state, keys, new_rows):
        out, found = ops.cache_find(state["slot_keys"], state["digests"], state["scores"], state["values"],
                                    state["clock"], keys, ops.POLICY_LRU)
        counts = ops.cache_insert_or_assign(state["slot_keys"], state["digests"], state["scores"], state["values"],
                                            state["clock"], keys, new_rows, ops.POLICY_LRU)
        k, v, n = ops.cache_export_batch(state["slot_keys"], state["digests"], state["values"], 0, 32)
        return out * 2, found, counts, k, v, n, ops.cache_size(state["digests"])

    keys = torch.tensor([3, 77, 3, -9, 12], device=device)
    new_rows = rows(5, 4, seed=3).to(device)
    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = fn(compiled.state(), keys, new_rows)
    want = step(eager.state(), keys, new_rows)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert_state_equal(compiled, eager)


# ------------------------------------------------------------------------------------------------ empty input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_zero_size_input(device, dtype, policy):
    c = filled(device, policy)
    c.find([1, 2])  # clock 1
    empty = torch.empty(0, dtype=dtype, device=device)
    out, found = c.find(empty)
    assert out.shape == (0, 4) and found.shape == (0,) and out.dtype == torch.float32 and found.dtype == torch.bool
    assert int(c.clock) == 1, "an empty find must not bump the clock"
    assert c.contains(empty).shape == (0,)
    assert c.insert_or_assign(empty, torch.empty(0, 4)) == dict(inserted=0, assigned=0, evicted=0, refused=0)
    assert c.assign(empty, torch.empty(0, 4)) == 0
    assert c.erase(empty) == 0
    keys, vals, count = c.export_batch(7, 7)
    assert keys.shape == (0,) and vals.shape == (0, 4) and count == 0
    b, d = ops.hash_keys(empty, 5)
    assert b.shape == (0,) and d.shape == (0,)


# ------------------------------------------------------------------------------------------------ find / contains


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("case", ["all_miss", "all_hit", "mixed"])
def test_find_and_contains(device, dtype, policy, case):
    c = filled(device, policy, n=40)
    query = {"all_miss": [100, 101, -3, 5000], "all_hit": [0, 39, 5, 17], "mixed": [0, 100, 39, -3, 5]}[case]
    found = c.contains(query, dtype)
    assert found.tolist() == [0 <= k < 40 for k in query]
    for _ in range(3):  # repeated finds move scores and the clock
        out, found = c.find(query, dtype)
        assert found.tolist() == [0 <= k < 40 for k in query]
    expected = rows(40, 4)
    for i, k in enumerate(query):
        want = expected[k] if 0 <= k < 40 else torch.zeros(4)
        assert torch.equal(out[i].cpu(), want)
    assert int(c.clock) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_extreme_keys_are_stored_and_found(device, dtype):
    ks = extremes(dtype)
    c = CheckedCache(1, 3, device, "lru")
    assert c.insert_or_assign(ks, rows(len(ks), 3), dtype)["inserted"] == len(ks)
    out, found = c.find(ks, dtype)
    assert found.all()
    assert torch.equal(out.cpu(), rows(len(ks), 3))
    # int32 and int64 spellings of one key are one key.
    small = [k for k in ks if I32_MIN <= k <= I32_MAX]
    other = torch.int64 if dtype == torch.int32 else torch.int32
    assert c.find(small, other)[1].all()
    assert c.erase(ks, dtype) == len(ks)
    assert c.size() == 0


# ------------------------------------------------------------------------------------------------ duplicates


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_duplicates_in_one_batch(device, dtype, policy):
    c = CheckedCache(2, 2, device, policy)
    keys = [5, 6, 5, 5, 7, 6]
    v = rows(6, 2)
    assert c.insert_or_assign(keys, v, dtype) == dict(inserted=3, assigned=3, evicted=0, refused=0)
    out, found = c.find([5, 5, 5, 6, 8, 8], dtype)  # every duplicate served
    assert found.tolist() == [True, True, True, True, False, False]
    assert torch.equal(out[0].cpu(), v[3]) and torch.equal(out[3].cpu(), v[5])  # last value won
    slot5 = int(np.flatnonzero((c.ref.slot_keys == 5) & (c.ref.digests != 0))[0])
    assert int(c.scores[slot5]) == (1 + 3 if policy == "lfu" else 1)  # LFU: 1 at insert, +1 per occurrence
    assert c.assign([6, 6, 9], rows(3, 2, seed=5), dtype) == 2
    assert c.erase([5, 5, 9], dtype) == 1
    assert c.size() == 2


@pytest.mark.parametrize("device", DEVICES)
def test_lfu_score_saturates(device):
    c = CheckedCache(1, 1, device, "lfu")
    c.insert_or_assign([1, 2], [[1.0], [2.0]])
    state = c.ref.state()
    state["scores"][:2] = [I32_MAX - 1, I32_MAX]
    c.load_state(state)
    c.find([1, 1, 1, 2, 2])
    assert c.scores[:2].tolist() == [I32_MAX, I32_MAX]


# ------------------------------------------------------------------------------------------------ eviction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_lowest_score_ties_lowest_slot(device, policy):
    c = CheckedCache(1, 2, device, policy)
    c.insert_or_assign(list(range(32)), rows(32, 2))  # key k in slot k (lowest free slot)
    assert c.slot_keys.tolist() == list(range(32))
    c.find([0, 1, 2])  # keys 0..2 now outrank the rest; 3..31 tie
    assert c.insert_or_assign([100], rows(1, 2, 1)) == dict(inserted=1, assigned=0, evicted=1, refused=0)
    assert int(c.slot_keys[3]) == 100, "ties go to the lowest slot index"
    # Scores set by hand: the unique minimum is evicted wherever it is.
    state = c.ref.state()
    state["scores"][:] = np.arange(100, 132)
    state["scores"][20] = 7
    state["scores"][9] = 7
    c.load_state(state)
    # One call: 200 takes slot 9 (score 7, lower index than slot 20); 201 cannot take slot 9 back (written by this
    # call, though its new score is the lowest), so it takes slot 20.
    assert c.insert_or_assign([200, 201], rows(2, 2, 2)) == dict(inserted=2, assigned=0, evicted=2, refused=0)
    assert int(c.slot_keys[9]) == 200 and int(c.slot_keys[20]) == 201
    # Next call: slot 9's score (the clock, or 1 under LFU) is now the lowest, and it is evictable again.
    c.insert_or_assign([202], rows(1, 2, 3))
    assert int(c.slot_keys[9]) == 202


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_never_takes_a_slot_written_by_this_call(device, policy):
    c = CheckedCache(1, 2, device, policy)
    c.insert_or_assign(list(range(32)), rows(32, 2))
    state = c.ref.state()
    state["scores"][:] = np.arange(32)[::-1] + 10  # slot 31 lowest, then 30, ...
    state["scores"][0] = 0  # slot 0 lowest of all
    c.load_state(state)
    # key 5 is assigned (its slot becomes "written"), then 4 new keys evict slots 0, 31, 30, 29, never a new one.
    counts = c.insert_or_assign([5, 1000, 1001, 1002, 1003], rows(5, 2, 1))
    assert counts == dict(inserted=4, assigned=1, evicted=4, refused=0)
    assert [int(c.slot_keys[s]) for s in (0, 31, 30, 29)] == [1000, 1001, 1002, 1003]


@pytest.mark.parametrize("device", DEVICES)
def test_lru_and_lfu_evict_differently(device):
    """Key 0 is hit often but long ago; keys 1..31 once, recently. LRU evicts key 0, LFU evicts key 1."""
    victims = {}
    for policy in ("lru", "lfu"):
        c = CheckedCache(1, 2, device, policy)
        c.insert_or_assign(list(range(32)), rows(32, 2))
        for _ in range(3):
            c.find([0])
        c.find(list(range(1, 32)))
        c.insert_or_assign([500], rows(1, 2, 1))
        victims[policy] = sorted(set(range(32)) - set(c.ref.as_dict()))
    assert victims == {"lru": [0], "lfu": [1]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("num_buckets", [1, 3])
def test_refused_when_batch_overflows_a_bucket(device, dtype, num_buckets):
    c = CheckedCache(num_buckets, 2, device, "lru")
    keys = keys_of_bucket(1 % num_buckets, num_buckets, 40)
    counts = c.insert_or_assign(keys, rows(40, 2), dtype)
    assert counts == dict(inserted=32, assigned=0, evicted=0, refused=8)
    assert c.contains(keys, dtype).tolist() == [True] * 32 + [False] * 8
    # Next call: the bucket is full of keys of an earlier call, so new keys evict.
    counts = c.insert_or_assign(keys[32:], rows(8, 2, 1), dtype)
    assert counts == dict(inserted=8, assigned=0, evicted=8, refused=0)


# ------------------------------------------------------------------------------------------------ export, decay, clear


@pytest.mark.parametrize("device", DEVICES)
def test_export_batch_slices(device):
    c = filled(device, num_buckets=3, n=60)
    c.erase([3, 4, 50])
    total = 0
    for start, end in [(0, 96), (0, 32), (32, 64), (64, 96), (5, 6), (10, 80), (95, 96), (96, 96), (0, 0)]:
        keys, vals, count = c.export_batch(start, end)
        assert keys.shape == (end - start,) and vals.shape == (end - start, 4)
        assert not keys[count:].any() and not vals[count:].any(), "the tail past count is zero"
        if (start, end) in [(0, 32), (32, 64), (64, 96)]:
            total += count
    assert total == c.size() == 57
    keys, _, count = c.export_batch(0, 96)
    assert sorted(keys[:count].tolist()) == sorted(set(range(60)) - {3, 4, 50})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start,end", [(-1, 5), (5, 4), (0, 97), (97, 97)])
def test_export_batch_rejects_bad_ranges(device, start, end):
    c = filled(device, num_buckets=3)
    with pytest.raises(ValueError, match=f"start={start}, end={end}"):
        ops.cache_export_batch(c.slot_keys, c.digests, c.values, start, end)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_decay_halves(device, policy):
    c = filled(device, policy, num_buckets=1, n=20)
    state = c.ref.state()
    state["scores"][:20] = [0, 1, 2, 3, 7, 100, I32_MAX] + list(range(40, 53))
    state["clock"][0] = 1001
    c.load_state(state)
    c.decay()
    assert c.scores[:7].tolist() == [0, 0, 1, 1, 3, 50, I32_MAX >> 1]
    assert int(c.clock) == (500 if policy == "lru" else 1001)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_clear_and_size(device, policy):
    c = filled(device, policy, n=50)
    c.find([1, 2, 3])
    assert c.size() == 50
    c.clear()
    assert c.size() == 0 and int(c.clock) == 0 and not c.scores.any()
    assert not c.contains(list(range(50))).any()
    assert c.insert_or_assign([1], rows(1, 4))["inserted"] == 1
    assert c.size() == 1


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("device", DEVICES)
def test_ops_reject_bad_input_and_change_nothing(device):
    c = filled(device)
    before = ReferenceCache.from_state(c.state()).state()
    sk, dg, sc, val, clk = c.slot_keys, c.digests, c.scores, c.values, c.clock
    k = torch.tensor([1, 2], device=device)
    nv = torch.zeros(2, 4, device=device)
    cases = [
        (TypeError, "keys must be int64 or int32, found Float",
         lambda: ops.cache_find(sk, dg, sc, val, clk, k.float(), 0)),
        (ValueError, "keys must be 1-D", lambda: ops.cache_contains(sk, dg, k.view(1, 2))),
        (TypeError, "scores must have dtype Int", lambda: ops.cache_find(sk, dg, sc.long(), val, clk, k, 0)),
        (ValueError, "policy must be 0", lambda: ops.cache_find(sk, dg, sc, val, clk, k, 3)),
        (ValueError, "new_values must have one row per key",
         lambda: ops.cache_insert_or_assign(sk, dg, sc, val, clk, k, nv[:1], 0)),
        (ValueError, "new_values must have width 4 \\(the cache's stored rows of dim 4\\), found 3",
         lambda: ops.cache_assign(sk, dg, val, k, nv[:, :3].contiguous())),
        (TypeError, "new_values must have dtype Float",
         lambda: ops.cache_insert_or_assign(sk, dg, sc, val, clk, k, nv.double(), 0)),
        (ValueError, "multiple of 32, found 40", lambda: ops.cache_size(torch.zeros(40, dtype=torch.uint8))),
        (ValueError, "values must have 64 rows", lambda: ops.cache_export_batch(sk, dg, val[:10], 0, 4)),
        (ValueError, "scores must have shape", lambda: ops.cache_erase(sk, dg, sc[:32], k)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()
    assert_state_equal(c, before)


# ------------------------------------------------------------------------------------------------ CUDA == CPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cuda_matches_cpu_on_a_long_sequence(policy):
    """The same random operations on both twins (each checked against the model) end in the same state."""
    rng = np.random.default_rng(7)
    caches = {d: CheckedCache(4, 8, d, policy) for d in ("cpu", "cuda")}
    pool = np.concatenate([np.arange(-200, 400), extremes(torch.int64)])
    for step in range(60):
        keys = rng.choice(pool, size=int(rng.integers(0, 300))).tolist()
        v = torch.from_numpy(rng.standard_normal((len(keys), 8)).astype(np.float32))
        op = step % 4
        for c in caches.values():
            if op == 0:
                c.insert_or_assign(keys, v)
            elif op == 1:
                c.find(keys)
            elif op == 2:
                c.assign(keys, v)
            else:
                c.erase(keys[: len(keys) // 4])
    assert_state_equal(caches["cuda"], caches["cpu"])
