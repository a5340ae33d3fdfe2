"""Admission (issue 16, TinyLFU-style, LFU caches): the sketch op and the insert's admission rule against the exact
Python model (hps_core.testing.ReferenceCache) on every device, op by op, state compared bit for bit; the rule's
point - a key seen once does not push out a hot one - on a one-bucket cache; EmbeddingCache's ageing; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core import ops
from hps_core.cache import ADMISSION_WINDOW, EmbeddingCache
from hps_core.testing import CheckedCache, device_params

DEVICES = device_params()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admission_equals_the_model(device, key_dtype, seed):
    """A small LFU cache with a sketch under a skewed random workload driven as the engine drives it: find, the
    misses into the sketch, insert the distinct misses; sometimes a decay. Every op checked against the model."""
    rng = np.random.default_rng(seed)
    cache = CheckedCache(num_buckets=2, dim=4, device=device, policy="lfu", sketch_width=32)
    universe = rng.integers(-(1 << 31), (1 << 31) - 1, 300)
    weights = 1.0 / np.arange(1, universe.size + 1) ** 1.1
    weights /= weights.sum()
    for step in range(40):
        q = rng.choice(universe, 48, p=weights)
        _, found = cache.find(q, dtype=key_dtype)
        cache.sketch_add(q, skip=found.cpu().numpy(), dtype=key_dtype)
        miss = np.unique(q[~found.cpu().numpy()])
        if miss.size:
            cache.insert_or_assign(miss, rng.standard_normal((miss.size, 4)).astype(np.float32), dtype=key_dtype)
        if step % 13 == 12:
            cache.decay()
    counts = cache.insert_or_assign(universe[:64], np.zeros((64, 4), np.float32))  # many contested inserts
    assert counts["refused"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_key_seen_once_does_not_evict_a_hot_one(device):
    cache = EmbeddingCache(32, 2, device=device, policy="lfu", admission="tinylfu")  # one bucket of 32 slots
    hot = torch.arange(32, device=device)
    for _ in range(3):  # miss, insert, then two rounds of hits: every hot key has score >= 2
        _, found = cache.find(hot)
        if not bool(found.all()):
            cache.insert_or_assign(hot[~found], torch.ones(int((~found).sum()), 2, device=device))
    once = torch.tensor([1000], device=device)
    _, found = cache.find(once)
    assert not bool(found[0])
    assert cache.insert_or_assign(once, torch.zeros(1, 2, device=device))["refused"] == 1
    assert bool(cache.contains(hot).all())
    # a key that keeps missing gathers a count above the coldest hot key's hits, and is then admitted
    before = cache.scores.clone()
    for _ in range(int(before.min()) + 1):
        cache.find(once)
    counts = cache.insert_or_assign(once, torch.zeros(1, 2, device=device))
    assert counts == {"inserted": 1, "assigned": 0, "evicted": 1, "refused": 0}
    slot = int(torch.nonzero(cache.slot_keys.eq(1000) & cache.digests.ne(0))[0])
    assert int(cache.scores[slot]) >= int(before.min()) + 1  # it starts with the count it gathered


@pytest.mark.parametrize("device", DEVICES)
def test_ageing_halves_the_sketch_and_the_scores(device):
    cache = EmbeddingCache(32, 1, device=device, policy="lfu", admission="tinylfu")
    keys = torch.arange(100, 164, device=device)
    cache.find(keys)  # 64 misses: 64 x 4 counts
    cache.insert_or_assign(keys[:32], torch.zeros(32, 1, device=device))
    sketch, scores = cache.sketch.clone(), cache.scores.clone()
    left = ADMISSION_WINDOW * cache.num_slots - cache._keys_since_ageing
    filler = torch.full((left - 1,), 100, device=device)  # key 100 is cached: hits, not sketch counts
    cache.find(filler)
    assert torch.equal(cache.sketch, sketch)  # not yet
    scores_now = cache.scores.clone()
    cache.find(torch.tensor([100], device=device))  # the window's last key: ageing
    assert torch.equal(cache.sketch, sketch >> 1)
    scores_now[cache.slot_keys.eq(100) & cache.digests.ne(0)] += 1
    assert torch.equal(cache.scores, scores_now >> 1)
    assert scores.sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_admission_input_raises_before_anything_changes(device):
    with pytest.raises(ValueError, match="admission 'tinylfu' needs policy 'lfu'"):
        EmbeddingCache(64, 2, device=device, policy="lru", admission="tinylfu")
    with pytest.raises(ValueError, match="admission must be one of"):
        EmbeddingCache(64, 2, device=device, policy="lfu", admission="w-tinylfu")
    lru = EmbeddingCache(64, 2, device=device, policy="lru")
    sketch = torch.zeros(ops.SKETCH_DEPTH * 64, dtype=torch.int32, device=device)
    keys, rows = torch.arange(3, device=device), torch.ones(3, 2, device=device)
    before = {k: v.clone() for k, v in lru.state().items()}
    with pytest.raises(ValueError, match="sketch: admission needs the LFU policy"):
        ops.cache_insert_or_assign(lru.slot_keys, lru.digests, lru.scores, lru.values, lru.clock, keys, rows,
                                   ops.POLICY_LRU, sketch)
    with pytest.raises(ValueError, match="power-of-two width"):
        ops.cache_insert_or_assign(lru.slot_keys, lru.digests, lru.scores, lru.values, lru.clock, keys, rows,
                                   ops.POLICY_LFU, sketch[:-4])
    with pytest.raises(TypeError, match="sketch"):
        ops.sketch_add(sketch.long(), keys)
    with pytest.raises(ValueError, match="skip must have shape"):
        ops.sketch_add(sketch, keys, torch.zeros(2, dtype=torch.bool, device=device))
    assert all(torch.equal(v, before[k]) for k, v in lru.state().items()) and not bool(sketch.any())


def test_sketch_add_opcheck():
    sketch = torch.zeros(ops.SKETCH_DEPTH * 16, dtype=torch.int32)
    keys = torch.tensor([5, -7, 5, 1 << 40])
    torch.library.opcheck(torch.ops.hps.sketch_add.default, (sketch, keys, torch.tensor([False, True, False, False])))
