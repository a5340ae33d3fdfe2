"""HostMemoryTier and its C++ map (torch.classes.hps.HostHashMap): a dict model, partitioning, overflow policies,
memory bound, input checks, concurrent readers/writer, GIL release and bulk loading from table files."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hps_core.tables import open_table, write_table
from hps_core.tiers.base import TierStats
from hps_core.tiers.host_memory import NO_OVERFLOW_LIMIT, HostMemoryTier

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EDGE_KEYS = [INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, 0, -1, 1, 255, 256, -256, 2**32, -(2**32)]
TAG = "hps_et.m.t0"


def keys_t(keys) -> torch.Tensor:
    return torch.tensor(list(keys), dtype=torch.int64)


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct int64 keys over the whole range, plus the edge keys."""
    keys = np.unique(np.concatenate([rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64, endpoint=True),
                                     np.array(EDGE_KEYS, np.int64)]))
    rng.shuffle(keys)
    return keys


class DictModel:
    """The tier's contract in plain Python: key -> row, last write wins, missing rows are zeros."""

    def __init__(self, dim: int) -> None:
        self.dim, self.rows = dim, {}

    def insert(self, keys, values) -> int:
        new = len({k for k in keys if k not in self.rows})
        for k, row in zip(keys, values):
            self.rows[k] = np.array(row, np.float32)
        return new

    def erase(self, keys) -> int:
        present = {k for k in keys if k in self.rows}
        for k in present:
            del self.rows[k]
        return len(present)

    def fetch(self, keys):
        values = np.zeros((len(keys), self.dim), np.float32)
        found = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            if k in self.rows:
                values[i], found[i] = self.rows[k], True
        return values, found


def assert_matches(tier: HostMemoryTier, model: DictModel, keys) -> None:
    values, found = tier.fetch(TAG, keys_t(keys))
    want_values, want_found = model.fetch(list(keys))
    assert values.dtype == torch.float32 and found.dtype == torch.bool
    assert tuple(values.shape) == (len(keys), model.dim)
    np.testing.assert_array_equal(found.numpy(), want_found)
    np.testing.assert_array_equal(values.numpy(), want_values)


def mix64(x: np.ndarray) -> np.ndarray:
    """cache_layout.h's splitmix64 finaliser, in numpy (uint64 arithmetic wraps)."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def expected_partition(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Documented partition of a key: hash bits 8..31 of mix64(key), multiply-shift reduced."""
    bits = (mix64(keys) >> np.uint64(8)) & np.uint64(0xFFFFFF)
    return ((bits * np.uint64(num_partitions)) >> np.uint64(24)).astype(np.int64)


# ------------------------------------------------------------------------------------------------ dict model


@pytest.mark.parametrize("num_partitions", [1, 3, 16])
@pytest.mark.parametrize("policy", ["evict_random", "least_used", "oldest"])
def test_round_trip_matches_dict_model(num_partitions, policy):
    rng = np.random.default_rng(num_partitions)
    dim = 8
    tier = HostMemoryTier(num_partitions=num_partitions, overflow_policy=policy, max_batch_size=97)
    tier.create_table(TAG, dim)
    model = DictModel(dim)
    keys = random_keys(rng, 3000).tolist()

    # First batch: with duplicates (the last row of a repeated key wins).
    batch = keys[:1000] + keys[:50]
    rows = rng.standard_normal((len(batch), dim)).astype(np.float32)
    assert tier.insert(TAG, keys_t(batch), torch.from_numpy(rows)) == model.insert(batch, rows) == 1000
    assert tier.size(TAG) == 1000
    assert_matches(tier, model, keys)  # 2000 of these are missing: zeros, found False

    # Overwrite half, add new ones, in one call.
    batch = keys[500:1500]
    rows = rng.standard_normal((len(batch), dim)).astype(np.float32)
    assert tier.insert(TAG, keys_t(batch), torch.from_numpy(rows)) == model.insert(batch, rows) == 500
    assert_matches(tier, model, keys)

    # Erase present and absent keys (with duplicates), then fetch everything again.
    batch = keys[::3] + keys[:10]
    assert tier.erase(TAG, keys_t(batch)) == model.erase(batch)
    assert tier.size(TAG) == len(model.rows)
    assert_matches(tier, model, keys)
    assert sorted(tier.export_keys(TAG).tolist()) == sorted(model.rows)

    # Erased rows are reused by later inserts: the contents must still be right.
    batch = keys[1500:2500]
    rows = rng.standard_normal((len(batch), dim)).astype(np.float32)
    assert tier.insert(TAG, keys_t(batch), torch.from_numpy(rows)) == model.insert(batch, rows)
    assert_matches(tier, model, keys + keys[:100])  # duplicate fetch keys are all served


def test_extreme_keys_and_empty_calls():
    tier = HostMemoryTier(num_partitions=4)
    tier.create_table(TAG, 3)
    rows = torch.arange(len(EDGE_KEYS) * 3, dtype=torch.float32).view(-1, 3)
    assert tier.insert(TAG, keys_t(EDGE_KEYS), rows) == len(EDGE_KEYS)
    values, found = tier.fetch(TAG, keys_t(reversed(EDGE_KEYS)))
    assert found.all()
    torch.testing.assert_close(values, rows.flip(0), rtol=0, atol=0)

    values, found = tier.fetch(TAG, torch.empty(0, dtype=torch.int64))
    assert values.shape == (0, 3) and found.shape == (0,)
    assert tier.insert(TAG, torch.empty(0, dtype=torch.int64), torch.empty(0, 3)) == 0
    assert tier.erase(TAG, torch.empty(0, dtype=torch.int64)) == 0
    assert tier.size(TAG) == len(EDGE_KEYS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["insert", "erase", "fetch"]),
            st.lists(st.sampled_from(EDGE_KEYS + list(range(-20, 20))), max_size=30),
        ),
        max_size=25,
    ),
    num_partitions=st.sampled_from([1, 2, 5]),
)
def test_random_operation_sequences_match_dict_model(ops, num_partitions):
    dim = 2
    tier = HostMemoryTier(num_partitions=num_partitions, max_batch_size=7)
    tier.create_table(TAG, dim)
    model = DictModel(dim)
    for step, (op, keys) in enumerate(ops):
        if op == "insert":
            rows = (np.arange(len(keys) * dim, dtype=np.float32).reshape(-1, dim) + 1000 * step)
            assert tier.insert(TAG, keys_t(keys), torch.from_numpy(rows)) == model.insert(keys, rows)
        elif op == "erase":
            assert tier.erase(TAG, keys_t(keys)) == model.erase(keys)
        else:
            assert_matches(tier, model, keys)
        assert tier.size(TAG) == len(model.rows)
    assert sorted(tier.export_keys(TAG).tolist()) == sorted(model.rows)


def test_large_fetch_is_chunked_by_max_batch_size():
    rng = np.random.default_rng(3)
    tier = HostMemoryTier(num_partitions=2, max_batch_size=1000)
    tier.create_table(TAG, 4)
    keys = random_keys(rng, 5000)
    rows = rng.standard_normal((len(keys), 4)).astype(np.float32)
    assert tier.insert(TAG, torch.from_numpy(keys), torch.from_numpy(rows)) == len(keys)
    misses = np.setdiff1d(np.arange(1, 50, dtype=np.int64), keys)[:3]
    query = np.concatenate([keys[::-1], misses])
    values, found = tier.fetch(TAG, torch.from_numpy(query))
    model = DictModel(4)
    model.insert(keys.tolist(), rows)
    want_values, want_found = model.fetch(query.tolist())
    np.testing.assert_array_equal(found.numpy(), want_found)
    np.testing.assert_array_equal(values.numpy(), want_values)


# ------------------------------------------------------------------------------------------------ partitions


def test_keys_spread_over_partitions_by_the_documented_hash():
    rng = np.random.default_rng(5)
    num_partitions = 16
    tier = HostMemoryTier(num_partitions=num_partitions)
    tier.create_table(TAG, 1)
    keys = random_keys(rng, 64_000)
    tier.insert(TAG, torch.from_numpy(keys), torch.zeros(len(keys), 1))
    sizes = np.array(tier.partition_sizes(TAG))
    want = np.bincount(expected_partition(keys, num_partitions), minlength=num_partitions)
    np.testing.assert_array_equal(sizes, want)
    mean = len(keys) / num_partitions
    assert np.all(np.abs(sizes - mean) < 6 * np.sqrt(mean)), sizes  # balanced (binomial spread)

    # Sequential keys (a common id scheme) spread as well.
    tier.create_table("seq", 1)
    seq = np.arange(64_000, dtype=np.int64)
    tier.insert("seq", torch.from_numpy(seq), torch.zeros(len(seq), 1))
    sizes = np.array(tier.partition_sizes("seq"))
    assert np.all(np.abs(sizes - 4000) < 6 * np.sqrt(4000)), sizes


# ------------------------------------------------------------------------------------------------ overflow


def test_evict_random_bounds_every_partition_and_counts_evictions():
    rng = np.random.default_rng(7)
    margin, parts = 100, 4
    tier = HostMemoryTier(num_partitions=parts, overflow_margin=margin, overflow_policy="random",
                          overflow_resolution_target=0.5, seed=11)
    tier.create_table(TAG, 2)
    keys = random_keys(rng, 5000)
    new_total = 0
    for batch in np.array_split(keys, 20):  # 250 keys a batch: more than a partition's margin may get at once
        new_total += tier.insert(TAG, torch.from_numpy(batch), torch.ones(len(batch), 2))
        assert max(tier.partition_sizes(TAG)) <= margin
    # One batch much larger than the margin.
    big = random_keys(np.random.default_rng(8), 2000)
    new_total += tier.insert(TAG, torch.from_numpy(big), torch.ones(len(big), 2))
    sizes = tier.partition_sizes(TAG)
    assert max(sizes) <= margin and sum(sizes) == tier.size(TAG)
    stats = tier.stats()[TAG]
    assert stats.keys_inserted == new_total
    assert stats.keys_evicted == new_total - tier.size(TAG) > 0
    # Every surviving key still has its row.
    survivors = tier.export_keys(TAG)
    values, found = tier.fetch(TAG, survivors)
    assert found.all() and torch.equal(values, torch.ones(len(survivors), 2))

    # Same seed, same inserts -> the same survivors (reproducible); another seed -> others.
    def survivors_for(seed):
        t = HostMemoryTier(num_partitions=parts, overflow_margin=margin, overflow_policy="evict_random",
                           overflow_resolution_target=0.5, seed=seed)
        t.create_table(TAG, 2)
        for batch in np.array_split(keys, 20):
            t.insert(TAG, torch.from_numpy(batch), torch.ones(len(batch), 2))
        return set(t.export_keys(TAG).tolist())

    assert survivors_for(11) == survivors_for(11)
    assert survivors_for(11) != survivors_for(12)


def test_evict_random_is_not_biased_to_new_or_old_keys():
    margin = 1000
    tier = HostMemoryTier(num_partitions=1, overflow_margin=margin, overflow_policy="evict_random",
                          overflow_resolution_target=0.5, seed=3)
    tier.create_table(TAG, 1)
    old = np.arange(margin, dtype=np.int64)
    tier.insert(TAG, torch.from_numpy(old), torch.zeros(margin, 1))
    new = np.arange(margin, margin + 1, dtype=np.int64)  # one more key: prune to 500 first, uniformly
    tier.insert(TAG, torch.from_numpy(new), torch.zeros(1, 1))
    kept = tier.export_keys(TAG).numpy()
    assert len(kept) == 501
    kept_old = kept[kept < margin]
    # 500 of 1000 old keys kept uniformly: about half of the lower and half of the upper half survive.
    assert 180 < np.count_nonzero(kept_old < 500) < 320


def test_evict_least_used_keeps_hot_keys():
    margin = 1000
    tier = HostMemoryTier(num_partitions=1, overflow_margin=margin, overflow_policy="evict_least_used")
    tier.create_table(TAG, 4)
    keys = np.arange(margin, dtype=np.int64) * 7919
    tier.insert(TAG, torch.from_numpy(keys), torch.ones(margin, 4))
    hot = keys[::10]  # 100 hot keys, fetched 3 times (LFU count 3); the rest were never fetched (count 0)
    for _ in range(3):
        tier.fetch(TAG, torch.from_numpy(hot))
    newcomers = np.arange(500, dtype=np.int64) * -13 - 1
    for batch in np.array_split(newcomers, 5):
        tier.insert(TAG, torch.from_numpy(batch), torch.full((len(batch), 4), 2.0))
        assert tier.size(TAG) <= margin
    _, found = tier.fetch(TAG, torch.from_numpy(hot))
    assert found.all(), f"{int((~found).sum())} hot keys were evicted"
    assert tier.stats()[TAG].keys_evicted > 0
    cold = np.setdiff1d(keys, hot)
    _, cold_found = tier.fetch(TAG, torch.from_numpy(cold))
    assert int(cold_found.sum()) < len(cold)  # the victims came from the never-used keys


def test_evict_least_used_writes_reset_the_count():
    tier = HostMemoryTier(num_partitions=1, overflow_margin=10, overflow_policy="least_used",
                          overflow_resolution_target=0.5)
    tier.create_table(TAG, 1)
    keys = torch.arange(10, dtype=torch.int64)
    tier.insert(TAG, keys, torch.zeros(10, 1))
    for _ in range(5):
        tier.fetch(TAG, keys[:5])  # keys 0..4: count 5
    tier.insert(TAG, keys[:5], torch.ones(5, 1))  # overwritten: counts back to 0 (as HPS)
    tier.fetch(TAG, keys[5:])  # keys 5..9: count 1
    tier.insert(TAG, torch.tensor([100]), torch.zeros(1, 1))  # full: prune to 5 -> keys 0..4 go
    assert sorted(tier.export_keys(TAG).tolist()) == [5, 6, 7, 8, 9, 100]


def test_evict_oldest_keeps_recently_used_keys():
    margin = 1000
    tier = HostMemoryTier(num_partitions=1, overflow_margin=margin, overflow_policy="evict_oldest")
    tier.create_table(TAG, 4)
    keys = np.arange(margin, dtype=np.int64) * 104729
    for batch in np.array_split(keys, 4):  # four write times
        tier.insert(TAG, torch.from_numpy(batch), torch.ones(len(batch), 4))
    recent = keys[::5]  # 200 keys used after all writes
    tier.fetch(TAG, torch.from_numpy(recent))
    newcomers = -np.arange(1, 401, dtype=np.int64)
    tier.insert(TAG, torch.from_numpy(newcomers), torch.zeros(400, 4))
    assert tier.size(TAG) <= margin
    _, found = tier.fetch(TAG, torch.from_numpy(recent))
    assert found.all(), f"{int((~found).sum())} recently used keys were evicted"
    # The first write batch, never fetched, is the oldest: it went first.
    first = np.setdiff1d(np.array_split(keys, 4)[0], recent)
    _, first_found = tier.fetch(TAG, torch.from_numpy(first))
    assert not first_found.any()
    # The newest writes of this same call are newer than everything: all kept but those pruned by the call itself.
    _, new_found = tier.fetch(TAG, torch.from_numpy(newcomers))
    assert int(new_found.sum()) >= 200


def test_batch_larger_than_margin_never_overshoots():
    tier = HostMemoryTier(num_partitions=1, overflow_margin=100, overflow_policy="oldest")
    tier.create_table(TAG, 1)
    keys = torch.arange(1000, dtype=torch.int64)
    assert tier.insert(TAG, keys, keys.float().view(-1, 1)) == 1000
    assert tier.size(TAG) <= 100
    assert tier.stats()[TAG].keys_evicted == 1000 - tier.size(TAG)
    kept = tier.export_keys(TAG)
    values, found = tier.fetch(TAG, kept)
    assert found.all() and torch.equal(values.view(-1), kept.float())


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("reserve", [True, False])
def test_memory_within_1_3x_of_raw(dim, reserve):
    rng = np.random.default_rng(dim)
    n = 300_000
    keys = rng.integers(INT64_MIN, INT64_MAX, size=n, dtype=np.int64)  # (collisions are rare and harmless)
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    tier = HostMemoryTier(num_partitions=16)
    tier.create_table(TAG, dim)
    if reserve:
        tier.reserve(TAG, n)
    for start in range(0, n, 65536):
        tier.insert(TAG, torch.from_numpy(keys[start : start + 65536]), torch.from_numpy(rows[start : start + 65536]))
    stored = tier.size(TAG)
    raw = stored * (8 + 4 * dim)
    ratio = tier.memory_bytes(TAG) / raw
    assert ratio <= 1.3, f"dim {dim}, reserve={reserve}: {tier.memory_bytes(TAG)} bytes = {ratio:.3f}x raw"
    assert ratio >= 1.0  # it does hold the data
    idx = rng.integers(0, n, 2000)
    values, found = tier.fetch(TAG, torch.from_numpy(keys[idx]))
    assert found.all()
    # Rows of keys that appear once are exact (a repeated random key would keep its last row).
    uniq, counts = np.unique(keys, return_counts=True)
    once = np.isin(keys[idx], uniq[counts == 1])
    np.testing.assert_array_equal(values.numpy()[once], rows[idx][once])


def test_memory_stays_within_1_3x_while_growing():
    """Without reserve, at every size from 100k rows on (index growth points included), dim 16 (the worst case:
    the index weighs most against small rows)."""
    dim, n, chunk = 16, 400_000, 8192
    keys = np.arange(n, dtype=np.int64) * 2654435761 - 2**62
    tier = HostMemoryTier(num_partitions=2)
    tier.create_table(TAG, dim)
    zeros = torch.zeros(chunk, dim)
    worst = 0.0
    for start in range(0, n, chunk):
        batch = torch.from_numpy(keys[start : start + chunk])
        tier.insert(TAG, batch, zeros[: len(batch)])
        if start + chunk >= 100_000:
            worst = max(worst, tier.memory_bytes(TAG) / (tier.size(TAG) * (8 + 4 * dim)))
    assert tier.size(TAG) == n
    assert worst <= 1.3, f"{worst:.3f}x raw at some point"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_and_change_nothing():
    tier = HostMemoryTier(num_partitions=2)
    tier.create_table(TAG, 4)
    keys = torch.arange(10, dtype=torch.int64)
    rows = torch.arange(40, dtype=torch.float32).view(10, 4)
    tier.insert(TAG, keys, rows)
    before = (tier.size(TAG), sorted(tier.export_keys(TAG).tolist()), tier.fetch(TAG, keys)[0].clone())
    stats_before = tier.stats()[TAG]

    new_keys = torch.arange(100, 110, dtype=torch.int64)
    cases = [
        (TypeError, "int64", lambda: tier.insert(TAG, new_keys.int(), rows)),
        (TypeError, "float32", lambda: tier.insert(TAG, new_keys, rows.double())),
        (ValueError, "dim 4", lambda: tier.insert(TAG, new_keys, torch.zeros(10, 5))),
        (ValueError, "one row per key", lambda: tier.insert(TAG, new_keys, torch.zeros(9, 4))),
        (ValueError, "2-D", lambda: tier.insert(TAG, new_keys, torch.zeros(40))),
        (ValueError, "1-D", lambda: tier.insert(TAG, new_keys.view(2, 5), rows)),
        (TypeError, "torch.Tensor", lambda: tier.insert(TAG, list(range(10)), rows)),
        (TypeError, "int64", lambda: tier.fetch(TAG, keys.float())),
        (ValueError, "1-D", lambda: tier.fetch(TAG, keys.view(2, 5))),
        (TypeError, "int64", lambda: tier.erase(TAG, keys.int())),
        (KeyError, "hps_et.m.nope", lambda: tier.fetch("hps_et.m.nope", keys)),
        (KeyError, TAG, lambda: tier.insert("hps_et.m.nope", keys, rows)),  # the message lists the known tags
        (ValueError, "dim 4", lambda: tier.create_table(TAG, 8)),
        (TypeError, "tag", lambda: tier.create_table(3, 8)),
        (ValueError, "dim", lambda: tier.create_table("other", 0)),
    ]
    for exc, needle, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))
    assert tier.size(TAG) == before[0]
    assert sorted(tier.export_keys(TAG).tolist()) == before[1]
    assert torch.equal(tier.fetch(TAG, keys)[0], before[2])
    assert tier.tags() == [TAG]
    after = tier.stats()[TAG]
    assert (after.keys_inserted, after.keys_evicted) == (stats_before.keys_inserted, stats_before.keys_evicted)


def test_native_map_checks_its_inputs():
    hmap = torch.classes.hps.HostHashMap(4, 2, 100, 0, 0.8, 1 << 20, 0, 0)
    keys = torch.arange(5, dtype=torch.int64)
    hmap.insert(keys, torch.ones(5, 4))
    with pytest.raises(TypeError, match="keys must have dtype int64, found Int"):
        hmap.fetch(keys.int())
    with pytest.raises(ValueError, match=r"values must have width = 4 columns .* found shape \[5, 3\]"):
        hmap.insert(keys + 10, torch.ones(5, 3))
    with pytest.raises(ValueError, match="keys has 5 rows"):
        hmap.insert(keys + 10, torch.ones(4, 4))
    with pytest.raises(TypeError, match=r"values must be stored rows of the map's storage \(dtype Float\), found Double"):
        hmap.insert(keys + 10, torch.ones(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reserve: n must be >= 0, found -1"):
        hmap.reserve(-1)
    assert hmap.size() == 5 and sorted(hmap.export_keys().tolist()) == list(range(5))
    # Non-contiguous inputs are fine.
    strided = torch.arange(20, dtype=torch.int64)[::2]
    assert hmap.insert(strided, torch.ones(4, 10).t()) == 7  # 0, 2, 4 already present
    assert hmap.fetch(strided)[1].all()


@pytest.mark.parametrize(
    "args, needle",
    [
        ((0, 1, 1, 0, 0.5, 64, 0, 0), "dim must be > 0, found 0"),
        ((4, 0, 1, 0, 0.5, 64, 0, 0), "num_partitions must be in [1, 4096], found 0"),
        ((4, 4097, 1, 0, 0.5, 64, 0, 0), "found 4097"),
        ((4, 1, 0, 0, 0.5, 64, 0, 0), "overflow_margin must be >= 1, found 0"),
        ((4, 1, 1, 3, 0.5, 64, 0, 0), "overflow_policy must be 0 (evict_random)"),
        ((4, 1, 1, 0, 1.0, 64, 0, 0), "overflow_resolution_target must be in (0, 1), found 1"),
        ((4, 1, 1, 0, 0.0, 64, 0, 0), "overflow_resolution_target must be in (0, 1), found 0"),
        ((4, 1, 1, 0, 0.5, 15, 0, 0), "allocation_rate must be at least one row (16 bytes), found 15"),
        ((6, 1, 1, 0, 0.5, 64, 0, 3), "dim must be a multiple of 4 for int8"),
        ((4, 1, 1, 0, 0.5, 64, 0, 5), "storage must be 0 (float32)"),
    ],
)
def test_native_constructor_validates(args, needle):
    with pytest.raises(ValueError) as info:
        torch.classes.hps.HostHashMap(*args)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"num_partitions": 0}, ValueError, "num_partitions must be in [1, 4096], got 0"),
        ({"num_partitions": 2.5}, TypeError, "num_partitions must be an int"),
        ({"overflow_margin": 0}, ValueError, "overflow_margin must be in [1,"),
        ({"overflow_policy": "lru"}, ValueError, "overflow_policy must be one of"),
        ({"overflow_policy": 1}, TypeError, "overflow_policy must be a str"),
        ({"overflow_resolution_target": 1.5}, ValueError, "overflow_resolution_target must be in (0, 1), got 1.5"),
        ({"overflow_resolution_target": "0.5"}, TypeError, "overflow_resolution_target must be a float"),
        ({"allocation_rate": 0}, ValueError, "allocation_rate must be >= 4, got 0"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_batch_size": True}, TypeError, "max_batch_size must be an int, got bool"),
    ],
)
def test_tier_constructor_validates(kwargs, exc, needle):
    with pytest.raises(exc) as info:
        HostMemoryTier(**kwargs)
    assert needle in str(info.value)


def test_policy_aliases_defaults_and_allocation_rate_per_table():
    for name in ("evict_random", "random", "evict_least_used", "least_used", "evict_oldest", "oldest", "Oldest"):
        HostMemoryTier(overflow_policy=name)
    tier = HostMemoryTier(allocation_rate=64)
    assert 1 <= tier.num_partitions <= 16 and tier.overflow_margin == NO_OVERFLOW_LIMIT
    tier.create_table("small", 16)  # 64 bytes = one row of dim 16: fine
    with pytest.raises(ValueError, match="allocation_rate must be at least one row"):
        tier.create_table("big", 32)
    assert tier.tags() == ["small"]
    # Pages of one row still work.
    assert tier.insert("small", torch.arange(100), torch.ones(100, 16)) == 100
    assert tier.fetch("small", torch.arange(100))[1].all()


def test_close_drops_tables():
    tier = HostMemoryTier(num_partitions=2)
    tier.create_table(TAG, 2)
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tier.fetch(TAG, torch.arange(3))


# ------------------------------------------------------------------------------------------------ threads


def test_concurrent_fetches_never_see_torn_rows():
    """4 fetching threads, 1 writer overwriting/erasing rows whose vector is one value (key + 10000 * version):
    a fetched row must be all one value, and that value must belong to the fetched key."""
    dim, n_keys = 64, 10_000
    tier = HostMemoryTier(num_partitions=4, max_batch_size=4096)
    tier.create_table(TAG, dim)
    keys = torch.arange(n_keys, dtype=torch.int64)

    def rows_for(k: torch.Tensor, version: int) -> torch.Tensor:
        return (k.float() + 10000.0 * version).view(-1, 1).expand(-1, dim).contiguous()

    tier.insert(TAG, keys, rows_for(keys, 0))
    stop = threading.Event()
    errors: list[str] = []
    fetched_rows = [0] * 4

    def reader(i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        while not stop.is_set() and not errors:
            q = torch.randint(0, n_keys, (8192,), generator=gen)
            values, found = tier.fetch(TAG, q)
            v = values[found]
            if not torch.all(v == v[:, :1]):
                errors.append(f"reader {i}: a row mixes values")
            if torch.any(torch.remainder(v[:, 0] - q[found].float(), 10000.0) != 0):
                errors.append(f"reader {i}: a row holds another key's value")
            if torch.any(values[~found] != 0):
                errors.append(f"reader {i}: a missing row is not zeros")
            fetched_rows[i] += int(found.sum())

    def writer() -> None:
        gen = torch.Generator().manual_seed(99)
        try:
            for version in range(1, 120):
                k = torch.randint(0, n_keys, (3000,), generator=gen)
                tier.insert(TAG, k, rows_for(k, version))
                if version % 10 == 0:  # erase and re-insert: freed rows get reused by other keys
                    gone = torch.randint(0, n_keys, (1000,), generator=gen)
                    tier.erase(TAG, gone)
                    tier.insert(TAG, gone, rows_for(gone, version))
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert all(count > 0 for count in fetched_rows)
    values, found = tier.fetch(TAG, keys)
    assert found.all() and torch.all(values == values[:, :1])


def test_fetch_releases_the_gil():
    """A Python thread keeps running while another thread is inside a long fetch (custom-class calls release
    the GIL): it logs timestamps inside the middle third of the call. With the GIL held it could not."""
    dim, n = 64, 200_000
    hmap = torch.classes.hps.HostHashMap(dim, 4, NO_OVERFLOW_LIMIT, 0, 0.8, 1 << 24, 0, 0)
    keys = torch.arange(n, dtype=torch.int64) * 31
    hmap.insert(keys, torch.ones(n, dim))
    big = keys.repeat(15)  # 3M keys: a call of some 100s of ms
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    _, found = hmap.fetch(big)
    t1 = time.perf_counter()
    stop.set()
    spinner.join()
    assert found.all()
    third = (t1 - t0) / 3
    inside = [s for s in stamps if t0 + third < s < t1 - third]
    assert inside, f"no Python progress during the middle of a {1e3 * (t1 - t0):.0f} ms fetch: the GIL was held"


# ------------------------------------------------------------------------------------------------ load


def test_load_from_table_files(tmp_path):
    rng = np.random.default_rng(21)
    dim = 12
    keys = random_keys(rng, 20_000)
    rows = rng.standard_normal((len(keys), dim)).astype(np.float32)
    write_table(tmp_path / "t0", keys, rows)
    files = open_table(tmp_path / "t0", dim=dim)

    tier = HostMemoryTier(num_partitions=4, max_batch_size=3000)
    assert tier.load(TAG, files, progress=False) == len(keys)  # creates the table
    assert tier.size(TAG) == len(keys) and tier.dim(TAG) == dim
    values, found = tier.fetch(TAG, torch.from_numpy(keys[::-1].copy()))
    assert found.all()
    np.testing.assert_array_equal(values.numpy(), rows[::-1])
    assert tier.memory_bytes(TAG) <= 1.3 * len(keys) * (8 + 4 * dim) + (1 << 20)
    stats = tier.stats()[TAG]
    assert isinstance(stats, TierStats)
    # The map counts its fetch calls: one tier fetch of 20,000 keys is ceil(20,000 / 3,000) = 7 of them.
    assert (stats.keys_inserted, stats.fetches, stats.keys_requested, stats.keys_found) == (
        len(keys), 7, len(keys), len(keys))

    # Loading again overwrites (nothing new); a tag of another dim is refused before anything changes.
    assert tier.load(TAG, files, progress=False) == len(keys)
    assert tier.size(TAG) == len(keys)
    tier.create_table("other", dim + 1)
    with pytest.raises(ValueError, match="dim"):
        tier.load("other", files, progress=False)
    assert tier.size("other") == 0
    with pytest.raises(TypeError, match="TableFiles"):
        tier.load(TAG, object(), progress=False)


def test_load_beyond_the_margin_evicts(tmp_path):
    keys = np.arange(5000, dtype=np.int64)
    write_table(tmp_path / "t", keys, np.ones((5000, 2), np.float32))
    tier = HostMemoryTier(num_partitions=2, overflow_margin=1000, max_batch_size=700)
    assert tier.load(TAG, open_table(tmp_path / "t", dim=2), progress=False) == 5000
    assert max(tier.partition_sizes(TAG)) <= 1000
    assert tier.stats()[TAG].keys_evicted == 5000 - tier.size(TAG)


# ------------------------------------------------------------------------------------------------ stored rows

STORAGES = ["float32", "float16", "bfloat16", "int8", "fp8_e4m3"]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", [8, 128])
def test_stored_rows_round_trip_as_bytes(storage, dim):
    from hps_core import storage as st

    rng = np.random.default_rng(dim)
    n = 5000
    keys = random_keys(rng, n + 1)
    absent, keys = keys[n:n + 1], keys[:n]
    stored = st.encode_rows(torch.from_numpy(rng.standard_normal((n, dim), dtype=np.float32) * 3), storage)
    tier = HostMemoryTier(num_partitions=4, max_batch_size=1500)  # fetch is chunked too
    tier.create_table(TAG, dim, storage)
    assert tier.storage(TAG) == storage
    assert tier.insert(TAG, torch.from_numpy(keys), stored) == n
    order = rng.permutation(n)
    probe = np.concatenate([keys[order], absent])
    values, found = tier.fetch(TAG, torch.from_numpy(probe))
    assert values.dtype == st.row_dtype(storage) and values.shape == (n + 1, st.stored_width(storage, dim))
    assert found[:n].all() and not found[n]
    np.testing.assert_array_equal(_as_bytes(values[:n]), _as_bytes(stored)[order])
    assert not _as_bytes(values[n:]).any()  # a missing row is zero bytes
    # Memory follows the stored bytes: an int8 row of 128 is 136 bytes, not 512.
    assert tier.memory_bytes(TAG) <= 1.3 * n * (8 + st.bytes_per_row(storage, dim)) + (1 << 20)


@pytest.mark.parametrize("storage", ["float16", "int8", "fp8_e4m3"])
def test_stored_rows_bad_inputs_raise_and_change_nothing(storage):
    from hps_core import storage as st

    tier = HostMemoryTier(num_partitions=2)
    tier.create_table(TAG, 8, storage)
    keys = torch.arange(4, dtype=torch.int64)
    good = st.encode_rows(torch.ones(4, 8), storage)
    tier.insert(TAG, keys, good)
    with pytest.raises(TypeError, match=f"values must have dtype {st.row_dtype(storage)}, got torch.float32"):
        tier.insert(TAG, keys + 10, torch.ones(4, 8))  # float32 rows: the engine encodes, the tier does not
    with pytest.raises(ValueError, match=r"values must have shape \(n, "):
        tier.insert(TAG, keys + 10, good[:, :-1].contiguous() if storage == "float16" else good[:, 1:].contiguous())
    with pytest.raises(ValueError, match=f"exists in the host-memory tier with storage {storage}, asked for "
                                         "storage float32"):
        tier.create_table(TAG, 8)
    with pytest.raises(ValueError, match="needs a dim that is a multiple of 4"):
        tier.create_table("hps_et.m.t6", 6, "int8")
    assert tier.size(TAG) == 4 and "hps_et.m.t6" not in tier.tags()
    np.testing.assert_array_equal(_as_bytes(tier.fetch(TAG, keys)[0]), _as_bytes(good))


@pytest.mark.parametrize("storage", STORAGES)
def test_load_encodes_table_files_once(tmp_path, storage):
    from hps_core import storage as st

    rng = np.random.default_rng(5)
    dim = 16
    keys = random_keys(rng, 7000)
    rows = rng.standard_normal((len(keys), dim)).astype(np.float32)
    write_table(tmp_path / "t0", keys, rows)
    tier = HostMemoryTier(num_partitions=4, max_batch_size=2000)
    assert tier.load(TAG, open_table(tmp_path / "t0", dim=dim), progress=False, storage=storage) == len(keys)
    values, found = tier.fetch(TAG, torch.from_numpy(keys))
    assert found.all()
    np.testing.assert_array_equal(_as_bytes(values), _as_bytes(st.encode_rows(torch.from_numpy(rows), storage)))
    # Stored blocks (another tier's iter_chunks) load as they are: the same bytes, nothing re-encoded.
    other = HostMemoryTier(num_partitions=2)

    class StoredSource:
        dim, num_keys, path = 16, len(keys), "stored rows"

        def iter_chunks(self, chunk_rows, progress=False, desc=None):
            for s in range(0, len(keys), chunk_rows):
                yield torch.from_numpy(keys[s:s + chunk_rows]), values[s:s + chunk_rows]

    other.load(TAG, StoredSource(), progress=False, storage=storage)
    np.testing.assert_array_equal(_as_bytes(other.fetch(TAG, torch.from_numpy(keys))[0]), _as_bytes(values))


@pytest.mark.parametrize("storage, bad, needle", [
    ("int8", float("nan"), "int8 storage keeps finite rows only"),
    ("fp8_e4m3", float("inf"), "fp8_e4m3 storage keeps finite rows only"),
    ("float16", 1e6, "beyond float16's range"),
])
def test_load_refuses_rows_the_storage_cannot_keep(tmp_path, storage, bad, needle):
    rows = np.ones((10, 8), np.float32)
    rows[7, 3] = bad
    write_table(tmp_path / "t0", np.arange(10, dtype=np.int64), rows)
    tier = HostMemoryTier(num_partitions=2)
    with pytest.raises(ValueError, match=needle) as info:
        tier.load(TAG, open_table(tmp_path / "t0", dim=8), progress=False, storage=storage)
    assert "t0" in str(info.value) and "row 7" in str(info.value)
    assert tier.size(TAG) == 0  # one block: nothing of it was written
