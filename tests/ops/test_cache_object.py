"""EmbeddingCache: sizing, memory, validation at the boundary (errors name the field and change nothing), the
object-level methods against ReferenceCache, and LRU clock decay near the clock limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core import ops
from hps_core.cache import EmbeddingCache
from hps_core.testing import KEY_DTYPES, ReferenceCache, assert_state_equal, cache_state, device_params

DEVICES = device_params()


def rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("capacity,buckets", [(1, 1), (31, 1), (32, 1), (33, 2), (64, 2), (1000, 32), (1024, 32)])
def test_capacity_rounds_up_to_whole_buckets(capacity, buckets):
    c = EmbeddingCache(capacity, 8)
    assert c.num_buckets == buckets and c.num_slots == buckets * ops.bucket_size()
    assert c.dim == 8 and c.device == torch.device("cpu") and c.policy == "lru"
    assert c.slot_keys.shape == (c.num_slots,) and c.values.shape == (c.num_slots, 8)


def test_memory_bytes_counts_the_state_tensors():
    c = EmbeddingCache(100, 16, policy="lfu")
    s = c.num_slots  # 128
    assert c.memory_bytes() == s * 8 + s * 1 + s * 4 + s * 16 * 4 + 8


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(capacity=0, dim=4), ValueError, "capacity must be >= 1, found 0"),
        (dict(capacity=10.5, dim=4), TypeError, "capacity must be an int, found float"),
        (dict(capacity=10, dim=0), ValueError, "dim must be >= 1, found 0"),
        (dict(capacity=10, dim=True), TypeError, "dim must be an int, found bool"),
        (dict(capacity=10, dim=4, policy="fifo"), ValueError, "policy must be one of \\['lfu', 'lru'\\], found 'fifo'"),
        (dict(capacity=10, dim=4, device="tpu9"), ValueError, "device must name a torch device, found 'tpu9'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        EmbeddingCache(**kwargs)


def _filled(device: str, policy: str = "lru", dim: int = 4) -> EmbeddingCache:
    c = EmbeddingCache(64, dim, device=device, policy=policy)
    c.insert_or_assign(torch.arange(50, device=device), rows(50, dim).to(device))
    c.find(torch.tensor([1, 2, 3], device=device))
    return c


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_naming_the_field_and_change_nothing(device):
    c = _filled(device)
    before = cache_state(c)
    k = torch.tensor([1, 2, 99], device=device)
    v = torch.zeros(3, 4, device=device)
    cases = [
        (lambda: c.find(k.float()), TypeError, "keys must have dtype int32 or int64, found torch.float32"),
        (lambda: c.find([1, 2]), TypeError, "keys must be a torch.Tensor, found list"),
        (lambda: c.find(k.view(3, 1)), ValueError, "keys must be 1-D \\(flatten them first\\), found shape \\(3, 1\\)"),
        (lambda: c.contains(k.to(torch.int16)), TypeError, "keys must have dtype int32 or int64, found torch.int16"),
        (lambda: c.insert_or_assign(k, v[:, :3]), ValueError, "values must have shape \\(n, 4\\), found \\(3, 3\\)"),
        (lambda: c.insert_or_assign(k, v[:2]), ValueError, "values must have one row per key \\(3 keys\\), found 2"),
        (lambda: c.insert_or_assign(k, v.double()), TypeError, "values must have dtype float32, found torch.float64"),
        (lambda: c.insert_or_assign(k, v.view(3, 2, 2)), ValueError, "values must have shape \\(n, 4\\)"),
        (lambda: c.insert_or_assign_no_sync(k.float(), v), TypeError, "keys must have dtype"),
        (lambda: c.assign(k, v[:1]), ValueError, "values must have one row per key"),
        (lambda: c.erase(k.view(1, 3)), ValueError, "keys must be 1-D"),
        (lambda: c.export_batch(0, 65), ValueError, "0 <= start <= end <= num_slots \\(64\\), found start=0, end=65"),
        (lambda: c.export_batch(10, 5), ValueError, "found start=10, end=5"),
        (lambda: c.export_batch(0.0, 5), TypeError, "start must be an int slot index, found float"),
        (lambda: c.iter_batches(0).__next__(), ValueError, "batch_buckets must be >= 1"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
        assert_state_equal(c, before, f"a rejected call ({message})")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_device_mismatch_raises_and_changes_nothing():
    for cache_dev, other in (("cpu", "cuda"), ("cuda", "cpu")):
        c = _filled(cache_dev)
        before = cache_state(c)
        with pytest.raises(ValueError, match=f"keys must be on the cache's device {cache_dev}"):
            c.find(torch.tensor([1, 2], device=other))
        with pytest.raises(ValueError, match=f"values must be on the cache's device {cache_dev}"):
            c.insert_or_assign(torch.tensor([1, 2], device=cache_dev), torch.zeros(2, 4, device=other))
        assert_state_equal(c, before)


def test_device_mismatch_is_checked_on_cpu_too():
    """Without a GPU the mismatch is a meta tensor: still refused by the boundary check, state untouched."""
    c = _filled("cpu")
    before = cache_state(c)
    with pytest.raises(ValueError, match="keys must be on the cache's device cpu, found meta"):
        c.find(torch.empty(3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="values must be on the cache's device cpu, found meta"):
        c.insert_or_assign(torch.tensor([1, 2]), torch.empty(2, 4, device="meta"))
    assert_state_equal(c, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_methods_match_the_reference(device, dtype, policy):
    c = EmbeddingCache(70, 3, device=device, policy=policy)  # 3 buckets
    ref = ReferenceCache(c.num_buckets, 3, policy)
    k = torch.arange(-30, 90, dtype=dtype, device=device)
    v = rows(120, 3).to(device)
    assert c.insert_or_assign(k, v) == ref.insert_or_assign(k, v)
    counts = c.insert_or_assign_no_sync(k[:5], v[:5])
    assert counts.dtype == torch.int64 and counts.shape == (4,) and counts.device == c.device
    ref.insert_or_assign(k[:5], v[:5])
    out, found = c.find(k[::3])
    eout, efound = ref.find(k[::3])
    assert np.array_equal(found.cpu().numpy(), efound) and np.array_equal(out.cpu().numpy(), eout)
    assert c.assign(k[10:20], v[:10]) == ref.assign(k[10:20], v[:10])
    assert c.erase(k[:7]) == ref.erase(k[:7])
    assert np.array_equal(c.contains(k).cpu().numpy(), ref.contains(k))
    ek, ev = c.export_batch(10, 50)
    rk, rv = ref.export_batch(10, 50)
    assert np.array_equal(ek.cpu().numpy(), rk) and np.array_equal(ev.cpu().numpy(), rv)
    ak, av = c.export_all(batch_buckets=1)
    rk, rv = ref.export_all()
    assert np.array_equal(ak.cpu().numpy(), rk) and np.array_equal(av.cpu().numpy(), rv)
    assert c.size() == ref.size() == len(rk)
    c.decay()
    ref.decay()
    assert_state_equal(c, ref)
    c.clear()
    ref.clear()
    assert c.size() == 0
    assert_state_equal(c, ref)


def test_state_round_trip_and_load_state_checks():
    a = _filled("cpu")
    b = EmbeddingCache(64, 4)
    b.load_state({name: t.clone() for name, t in a.state().items()})
    assert_state_equal(b, a)
    assert b.resync_clock() == int(a.clock) == 1
    with pytest.raises(KeyError, match="state lacks \\['clock'\\]"):
        b.load_state({k: v for k, v in a.state().items() if k != "clock"})
    bad = dict(a.state(), scores=a.scores.long())
    with pytest.raises(TypeError, match="state\\['scores'\\] must be a torch.int32 tensor, found torch.int64"):
        b.load_state(bad)
    with pytest.raises(ValueError, match="state\\['values'\\] must have shape \\(64, 4\\), found \\(64, 5\\)"):
        b.load_state(dict(a.state(), values=torch.zeros(64, 5)))
    assert_state_equal(b, a)


# ------------------------------------------------------------------------------------------------ LRU clock


@pytest.mark.parametrize("device", DEVICES)
def test_lru_clock_decays_before_the_limit_and_keeps_the_order(device):
    limit = ops.clock_limit()
    c = EmbeddingCache(32, 2, device=device, policy="lru")
    c.clock.fill_(limit - 20)
    c.resync_clock()
    keys = torch.arange(32, device=device)
    c.insert_or_assign(keys, rows(32, 2).to(device))  # every score = limit - 20
    # Touch keys 0..31 in order, one find each: key k gets score limit - 19 + k; the 20th find would reach the limit.
    for k in range(32):
        _, found = c.find(keys[k : k + 1])
        assert found.all()
        assert int(c.clock) < limit
    clock = int(c.clock)
    assert clock < limit // 2 + 32, "the clock was halved on the way"
    scores = c.scores.tolist()
    assert scores == sorted(scores), "recency order (key k touched k-th) survives the halving"
    assert scores[-1] == clock and scores[0] < limit // 2
    # The newest touch still outranks everything: the next insert into the full bucket evicts key 0.
    c.insert_or_assign(torch.tensor([1000], device=device), rows(1, 2).to(device))
    assert not c.contains(torch.tensor([0], device=device)).item()


def test_clock_mirror_resyncs_after_a_hand_written_clock():
    from hps_core import cache as cache_module

    c = EmbeddingCache(32, 1)
    c.insert_or_assign(torch.tensor([5]), torch.ones(1, 1))
    c.clock.fill_(ops.clock_limit() - 1)  # written by hand, without resync_clock()
    for _ in range(cache_module._CLOCK_RESYNC_EVERY):
        c.find(torch.tensor([5]))
    # The periodic re-read noticed the hand-written clock, and the decay kept it below the limit.
    assert int(c.clock) < ops.clock_limit()
    assert int(c.scores[c.digests != 0][0]) == int(c.clock)


def test_lfu_clock_is_not_decayed_automatically():
    c = EmbeddingCache(32, 1, policy="lfu")
    c.insert_or_assign(torch.tensor([5]), torch.ones(1, 1))
    c.clock.fill_(ops.clock_limit() - 1)
    c.resync_clock()
    for _ in range(3):
        c.find(torch.tensor([5, 5]))
    assert int(c.clock) == ops.clock_limit() + 2
    assert int(c.scores[c.digests != 0][0]) == 1 + 6
