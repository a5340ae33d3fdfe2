"""The miss-path ops (collect_misses, apply_misses) against a plain Python reference, on every device.

collect_misses must give the miss positions in ascending order, the distinct miss keys in ascending order (planned
on the host for small batches, on the GPU above 65,536 keys: both are checked),
the inverse mapping, and each distinct key's row from a real HostHashMap (zeros where the map lacks it). apply_misses
must write exactly those rows and nothing when its plan is bad.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hps_core.ops  # noqa: F401  (loads the extension)
from hps_core.testing import KEY_DTYPES, device_params

DEVICES = device_params()


def host_map(dim: int, keys: np.ndarray, rng: np.random.Generator):
    m = torch.classes.hps.HostHashMap(dim, 4, 1 << 30, 1, 0.8, 1 << 20, 0)
    values = torch.from_numpy(rng.standard_normal((keys.size, dim)).astype(np.float32))
    if keys.size:
        m.insert(torch.from_numpy(keys.astype(np.int64)), values)
    return m, {int(k): values[i] for i, k in enumerate(keys)}


def reference(keys: list[int], found: list[bool]):
    positions = [i for i, f in enumerate(found) if not f]
    unique = sorted({keys[i] for i in positions})
    rank = {k: r for r, k in enumerate(unique)}
    return positions, unique, [rank[keys[i]] for i in positions]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
@pytest.mark.parametrize("case", ["mixed", "all_miss", "all_hit", "duplicates", "extremes", "empty", "large"])
def test_collect_misses_matches_reference(device, key_dtype, case):
    rng = np.random.default_rng(sum(map(ord, case)))
    info = torch.iinfo(key_dtype)
    n = {"empty": 0, "duplicates": 500, "large": 70_000}.get(case, 300)
    if case in ("duplicates", "large"):
        pool_size = 20 if case == "duplicates" else 30_000
        pool = rng.integers(info.min, info.max, size=pool_size, dtype=np.int64, endpoint=True)
        arr = pool[rng.integers(0, pool_size, size=n)]
    elif case == "extremes":
        arr = np.array([info.min, info.max, 0, -1, 1, info.min + 1] * 50, dtype=np.int64)
    else:
        arr = rng.integers(info.min, info.max, size=n, dtype=np.int64, endpoint=True)
    found_np = {"all_miss": np.zeros(n, bool), "all_hit": np.ones(n, bool)}.get(case, rng.random(n) < 0.5)
    dim = 8
    stored = np.unique(arr)[::2]  # the map holds every other distinct key
    m, rows_of = host_map(dim, stored, rng)
    keys = torch.from_numpy(arr).to(key_dtype).to(device)
    found = torch.from_numpy(found_np).to(device)

    ukeys, rows, in_source, index, misses, unique, hits, grouped = torch.ops.hps.collect_misses(keys, found, dim,
                                                                                           m.handle())

    positions, want_unique, inverse = reference(arr.tolist(), found_np.tolist())
    assert (misses, unique, grouped) == (len(positions), len(want_unique), False)
    assert index[:2].tolist() == [misses, unique]
    assert index[2:2 + misses].tolist() == positions
    assert index[2 + misses:2 + 2 * misses].tolist() == inverse
    assert ukeys.tolist() == want_unique
    assert ukeys.device.type == rows.device.type == in_source.device.type == index.device.type == "cpu"
    want_in = [k in rows_of for k in want_unique]
    assert in_source.tolist() == want_in
    assert hits == sum(want_in)
    want_rows = torch.stack([rows_of[k] if k in rows_of else torch.zeros(dim) for k in want_unique]) \
        if want_unique else torch.zeros(0, dim)
    assert torch.equal(rows, want_rows)
    if device == "cuda" and misses:
        assert index.is_pinned() and rows.is_pinned()

    out = torch.full((n, dim), -7.0, device=device)
    dev_keys, dev_rows = torch.ops.hps.apply_misses(out, index, rows)
    assert dev_keys.device == out.device and dev_keys.cpu().tolist() == want_unique
    assert torch.equal(dev_rows.cpu(), rows)
    expect = torch.full((n, dim), -7.0)
    if positions:
        expect[torch.tensor(positions)] = rows[torch.tensor(inverse)]
    assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("device", DEVICES)
def test_collect_misses_without_source_gives_zero_rows(device):
    """source = -1: no host map; every distinct miss gets a zero row (the engine fills them from other tiers)."""
    keys = torch.tensor([4, 9, 4, 2], device=device)
    found = torch.tensor([False, True, False, False], device=device)
    ukeys, rows, in_source, index, misses, unique, hits, _ = torch.ops.hps.collect_misses(keys, found, 3, -1)
    assert (misses, unique, hits) == (3, 2, 0)
    assert ukeys.tolist() == [2, 4] and not in_source.any() and torch.equal(rows, torch.zeros(2, 3))


def test_collect_misses_rejects_bad_input():
    rng = np.random.default_rng(0)
    m, _ = host_map(4, np.arange(10), rng)
    keys = torch.arange(5)
    found = torch.zeros(5, dtype=torch.bool)
    with pytest.raises(ValueError, match="dim 4.*dim 8"):
        torch.ops.hps.collect_misses(keys, found, 8, m.handle())
    with pytest.raises(TypeError, match="int64 or int32"):
        torch.ops.hps.collect_misses(keys.float(), found, 4, m.handle())
    with pytest.raises(TypeError, match="found must have dtype"):
        torch.ops.hps.collect_misses(keys, found.int(), 4, m.handle())
    with pytest.raises(ValueError, match="found must have shape"):
        torch.ops.hps.collect_misses(keys, found[:3], 4, m.handle())
    with pytest.raises(ValueError, match="no live HostHashMap has handle 123456"):
        torch.ops.hps.collect_misses(keys, found, 4, 123456)
    with pytest.raises(ValueError, match="keys must be 1-D"):
        torch.ops.hps.collect_misses(keys.reshape(1, 5), found, 4, m.handle())


@pytest.mark.parametrize("device", DEVICES)
def test_apply_misses_bad_plan_writes_nothing(device):
    keys = torch.tensor([4, 9, 4, 2], device=device)
    found = torch.tensor([False, True, False, False], device=device)
    _, rows, _, index, misses, unique, _, _ = torch.ops.hps.collect_misses(keys, found, 3, -1)
    rows = torch.ones_like(rows)
    out = torch.zeros(4, 3, device=device)
    bad = index.clone()
    bad[2] = 4  # a position past the batch
    with pytest.raises(ValueError, match="position 4 outside"):
        torch.ops.hps.apply_misses(out, bad, rows)
    bad = index.clone()
    bad[2 + misses] = 5  # an inverse past the unique rows
    with pytest.raises(ValueError, match="inverse 5 outside"):
        torch.ops.hps.apply_misses(out, bad, rows)
    with pytest.raises(ValueError, match="rows must have shape"):
        torch.ops.hps.apply_misses(out, index, rows[:1])
    with pytest.raises(ValueError, match="entries"):
        torch.ops.hps.apply_misses(out, index[:-1], rows)
    assert not out.any()


def test_map_handle_is_stable_and_dies_with_the_map():
    rng = np.random.default_rng(1)
    m, _ = host_map(4, np.arange(3), rng)
    h = m.handle()
    assert m.handle() == h
    other, _ = host_map(4, np.arange(3), rng)
    assert other.handle() != h
    del m
    import gc

    gc.collect()
    with pytest.raises(ValueError, match=f"no live HostHashMap has handle {h}"):
        torch.ops.hps.collect_misses(torch.arange(2), torch.zeros(2, dtype=torch.bool), 4, h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
def test_grouped_plan_feeds_insert_grouped_like_insert_or_assign(device, key_dtype):
    """num_buckets > 0: keys come in (bucket, key) order, and cache_insert_grouped with them leaves the cache
    exactly as cache_insert_or_assign does - state tensors and counts - including full buckets and refusals."""
    from hps_core.cache import EmbeddingCache

    rng = np.random.default_rng(5)
    info = torch.iinfo(key_dtype)
    pool = rng.integers(info.min, info.max, size=3000, dtype=np.int64, endpoint=True)
    keys = torch.from_numpy(pool[rng.integers(0, 3000, size=5000)]).to(key_dtype).to(device)
    found = torch.from_numpy(rng.random(5000) < 0.3).to(device)
    a = EmbeddingCache(64 * 4, 8, device=device)  # 8 buckets: most of them overflow
    b = EmbeddingCache(64 * 4, 8, device=device)
    warm = torch.from_numpy(pool[:100]).to(key_dtype).to(device)
    for c in (a, b):
        c.insert_or_assign(warm, torch.ones(100, 8, device=device))
        c.find(warm[:40])
    ukeys, rows, _, index, misses, unique, _, grouped = torch.ops.hps.collect_misses(keys, found, 8, -1,
                                                                                     a.num_buckets)
    assert grouped and unique > 200
    bucket, _ = torch.ops.hps.hash_keys(ukeys, a.num_buckets)
    order = sorted(range(unique), key=lambda i: (int(bucket[i]), int(ukeys[i])))
    assert order == list(range(unique))
    values = torch.from_numpy(rng.standard_normal((unique, 8)).astype(np.float32))
    dev_keys = ukeys.to(device).to(key_dtype)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    a.insert_grouped(dev_keys, values.to(device), counts)
    want = b.insert_or_assign(dev_keys, values.to(device))
    assert counts.tolist() == [want[k] for k in ("inserted", "assigned", "evicted", "refused")]
    assert want["refused"] > 0 and want["evicted"] > 0
    for name, t in a.state().items():
        assert torch.equal(t.cpu(), b.state()[name].cpu()), name
    a.insert_grouped(dev_keys[:10], values[:10].to(device), counts)  # counts accumulate
    inserted, assigned, _, refused = counts.tolist()
    assert inserted + assigned + refused == unique + 10


def test_insert_grouped_rejects_keys_out_of_bucket_order_on_cpu():
    from hps_core.cache import EmbeddingCache

    c = EmbeddingCache(64 * 8, 4)
    keys = torch.arange(1, 200)
    bucket, _ = torch.ops.hps.hash_keys(keys, c.num_buckets)
    keys = keys[torch.argsort(bucket, stable=True)].flip(0)  # descending buckets
    counts = torch.zeros(4, dtype=torch.int64)
    before = {k: v.clone() for k, v in c.state().items()}
    with pytest.raises(ValueError, match="non-decreasing bucket order"):
        c.insert_grouped(keys, torch.ones(keys.numel(), 4), counts)
    assert all(torch.equal(before[k], v) for k, v in c.state().items()) and not counts.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_lookup_host_equals_the_steps_it_fuses(device, policy):
    """cache_lookup_host = cache_find + collect_misses(num_buckets) + apply_misses + cache_insert_grouped: the same
    output, cache state and counts as running those ops one by one, batch after batch (evictions included)."""
    from hps_core.cache import EmbeddingCache

    rng = np.random.default_rng(11)
    table_keys = rng.choice(1 << 40, size=4000, replace=False).astype(np.int64)
    m, _ = host_map(8, table_keys, rng)
    fused, steps = (EmbeddingCache(64 * 8, 8, device=device, policy=policy) for _ in range(2))
    c_fused, c_steps = (torch.zeros(4, dtype=torch.int64, device=device) for _ in range(2))
    for _ in range(12):
        keys = torch.from_numpy(table_keys[rng.zipf(1.3, size=600) % 4000]).to(device)
        fused.note_find(keys.numel())
        s = fused
        out, *_, misses, unique, hits, grouped, done = torch.ops.hps.cache_lookup_host(
            s.slot_keys, s.digests, s.scores, s.values, s.clock, keys, s.policy_code, m.handle(), c_fused, 2.0)
        assert done and grouped and hits == unique
        want, found = steps.find(keys)
        _, rows, _, index, *_ = torch.ops.hps.collect_misses(keys, found, 8, m.handle(), steps.num_buckets)
        k_d, r_d = torch.ops.hps.apply_misses(want, index, rows)
        steps.insert_grouped(k_d, r_d, c_steps)
        assert torch.equal(out.cpu(), want.cpu())
        assert torch.equal(c_fused.cpu(), c_steps.cpu())
        for name, t in fused.state().items():
            assert torch.equal(t.cpu(), steps.state()[name].cpu()), name
    assert c_fused[2] > 0  # evictions happened


@pytest.mark.parametrize("device", DEVICES)
def test_cache_lookup_host_leaves_unfinished_plans_to_the_caller(device):
    """Rows missing from the map, or a hit rate at/above async_hit_rate: nothing inserted, plan returned."""
    from hps_core.cache import EmbeddingCache

    rng = np.random.default_rng(12)
    m, _ = host_map(4, np.arange(100), rng)
    c = EmbeddingCache(64, 4, device=device)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    st = [c.slot_keys, c.digests, c.scores, c.values, c.clock]
    keys = torch.tensor([5, 7, 500, 5], device=device)  # 500 is not in the map
    out, ukeys, rows, in_source, index, misses, unique, hits, _, done = torch.ops.hps.cache_lookup_host(
        *st, keys, c.policy_code, m.handle(), counts, 2.0)
    assert not done and (misses, unique, hits) == (4, 3, 2) and in_source.tolist() == [True, True, False]
    assert c.size() == 0 and not counts.any() and not out.any()
    keys = torch.tensor([5, 7], device=device)
    *_, misses, unique, hits, _, done = torch.ops.hps.cache_lookup_host(*st, keys, c.policy_code, m.handle(), counts,
                                                                       0.0)  # any hit rate >= 0: async
    assert not done and misses == 2 and c.size() == 0
    *_, done = torch.ops.hps.cache_lookup_host(*st, keys, c.policy_code, m.handle(), counts, 2.0)
    assert done and c.size() == 2 and counts[0] == 2
    out, *_, misses, unique, hits, _, done = torch.ops.hps.cache_lookup_host(*st, keys, c.policy_code, -1, counts, 2.0)
    assert done and misses == 0 and torch.equal(out.cpu(), c.find(keys)[0].cpu())
