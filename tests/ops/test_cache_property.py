"""Property tests of the cache ops: random operation sequences on small caches (1-3 buckets, so collisions,
evictions and refusals are common) over a small key pool with the dtype's extremes.

1. A hypothesis state machine runs the ops on real state tensors and on the exact ReferenceCache and compares the
   results and the whole state after every step (CheckedCache does the comparing).
2. A looser dict model over EmbeddingCache: a key the cache finds always has the last row written for it, a key
   never written (or erased since) is never found, and a call that refused nothing left all its keys present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hps_core.cache import EmbeddingCache
from hps_core.testing import BUCKET_SIZE, CheckedCache, device_params

I64 = [-(2**63), 2**63 - 1, -(2**63) + 1, 2**63 - 2]
I32 = [-(2**31), 2**31 - 1, -(2**31) + 1, 2**31 - 2]


def key_pool(dtype: torch.dtype) -> list[int]:
    extremes = I32 + ([] if dtype == torch.int32 else I64)
    return list(range(-8, 72)) + extremes


# Hypothesis runs on the CPU twin only (a CUDA sequence test lives in test_cache_ops.py); each step is exact.
SETTINGS = settings(max_examples=30, stateful_step_count=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CacheMachine(RuleBasedStateMachine):
    """Every rule is an op; CheckedCache asserts exact equality of results and state with the model."""

    @initialize(
        num_buckets=st.integers(1, 3),
        dim=st.integers(1, 8),
        policy=st.sampled_from(["lru", "lfu"]),
        dtype=st.sampled_from([torch.int32, torch.int64]),
    )
    def setup(self, num_buckets, dim, policy, dtype):
        self.c = CheckedCache(num_buckets, dim, "cpu", policy)
        self.dtype = dtype
        self.pool = key_pool(dtype)
        self.dim = dim
        self.num_slots = num_buckets * BUCKET_SIZE
        self.rows_seed = 0

    def _keys(self, data, max_size=70):
        return data.draw(st.lists(st.sampled_from(self.pool), max_size=max_size), label="keys")

    def _rows(self, n):
        self.rows_seed += 1
        return np.random.default_rng(self.rows_seed).standard_normal((n, self.dim)).astype(np.float32)

    @rule(data=st.data())
    def insert_or_assign(self, data):
        keys = self._keys(data)
        counts = self.c.insert_or_assign(keys, self._rows(len(keys)), self.dtype)
        assert counts["inserted"] + counts["assigned"] + counts["refused"] == len(keys)
        assert counts["evicted"] <= counts["inserted"]

    @rule(data=st.data())
    def find(self, data):
        self.c.find(self._keys(data), self.dtype)

    @rule(data=st.data())
    def assign(self, data):
        keys = self._keys(data)
        self.c.assign(keys, self._rows(len(keys)), self.dtype)

    @rule(data=st.data())
    def erase(self, data):
        self.c.erase(self._keys(data, max_size=10), self.dtype)

    @rule(data=st.data())
    def contains(self, data):
        self.c.contains(self._keys(data), self.dtype)

    @rule(data=st.data())
    def export_batch(self, data):
        start = data.draw(st.integers(0, self.num_slots), label="start")
        end = data.draw(st.integers(start, self.num_slots), label="end")
        self.c.export_batch(start, end)

    @rule()
    def decay(self):
        self.c.decay()

    @invariant()
    def size_matches(self):
        if hasattr(self, "c"):
            self.c.size()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = SETTINGS


# ------------------------------------------------------------------------------------------------ dict model

op_strategy = st.tuples(
    st.sampled_from(["insert", "insert", "find", "assign", "erase", "export"]),
    st.lists(st.integers(0, 40), max_size=60),  # indices into the key pool
)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    capacity=st.integers(1, 96),
    dim=st.integers(1, 8),
    dtype=st.sampled_from([torch.int32, torch.int64]),
    steps=st.lists(op_strategy, min_size=1, max_size=25),
)
def test_cache_agrees_with_a_dict(device, policy, capacity, dim, dtype, steps):
    pool = (key_pool(dtype) * 2)[:41]
    cache = EmbeddingCache(capacity, dim, device=device, policy=policy)
    model: dict[int, torch.Tensor] = {}  # key -> last row written while the key was present
    counter = 0
    for op, idx in steps:
        keys = [pool[i] for i in idx]
        kt = torch.tensor(keys, dtype=dtype, device=device)
        counter += 1
        rows = torch.arange(len(keys) * dim, dtype=torch.float32).reshape(len(keys), dim) + 1000.0 * counter
        rows = rows.to(device)
        if op == "insert":
            counts = cache.insert_or_assign(kt, rows)
            present = cache.contains(kt).tolist()
            for k, r, p in zip(keys, rows, present):
                if p:
                    model[k] = r  # later duplicates overwrite: last row wins
            if counts["refused"] == 0:
                assert all(present), "a call that refused nothing keeps every key it wrote"
        elif op == "assign":
            present = cache.contains(kt).tolist()
            assert cache.assign(kt, rows) == sum(present)
            for k, r, p in zip(keys, rows, present):
                if p:
                    model[k] = r
        elif op == "erase":
            present = set(k for k, p in zip(keys, cache.contains(kt).tolist()) if p)
            assert cache.erase(kt) == len(present)
            for k in keys:
                model.pop(k, None)
        elif op == "find":
            values, found = cache.find(kt)
            for k, v, f in zip(keys, values, found.tolist()):
                if f:
                    assert k in model, f"key {k} found but never written (or erased)"
                    assert torch.equal(v, model[k]), f"key {k}: found a row that is not the last one written"
                else:
                    assert torch.equal(v, torch.zeros_like(v))
        else:
            all_keys, all_values = cache.export_all(batch_buckets=1)
            assert len(set(all_keys.tolist())) == all_keys.numel() == cache.size()
            for k, v in zip(all_keys.tolist(), all_values):
                assert torch.equal(v, model[k])
