"""The lookup pipeline's finds as ops, on every device: cache_find_misses (the cache's find with the default row for
misses and a miss list) against cache_find on a copy of the same state, and the resident index
(resident_index_build + resident_find) against a dict. CUDA results must equal the CPU's exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core import ops
from hps_core.cache import EmbeddingCache
from hps_core.testing import KEY_DTYPES, device_params

from op_builders import resident

DEVICES = device_params()


def populated_cache(device: str, policy: str, dim: int, rng: np.random.Generator, n: int = 3000) -> EmbeddingCache:
    cache = EmbeddingCache(4096, dim, device=device, policy=policy)
    keys = torch.from_numpy(rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int64))
    cache.insert_or_assign(keys.to(device), torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)).to(device))
    return cache


def state_copy(cache: EmbeddingCache) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cache.state().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("dim", [3, 16])
def test_cache_find_misses_equals_cache_find(device, dtype, policy, dim):
    rng = np.random.default_rng(dim)
    cache = populated_cache(device, policy, dim, rng)
    present, _ = cache.export_all()
    for n in (0, 1, 700, 5000):
        q = present[torch.from_numpy(rng.integers(0, present.numel(), size=n))].cpu()
        q[::3] = torch.from_numpy(rng.integers(-(2**31), 2**31 - 1, size=q[::3].numel(), dtype=np.int64))
        keys = q.to(dtype).to(device)
        twin = state_copy(cache)
        want, found = ops.cache_find(twin["slot_keys"], twin["digests"], twin["scores"], twin["values"],
                                     twin["clock"], keys, ops.POLICIES[policy])
        s = cache.state()
        out, miss_pos, miss_keys, miss_count = ops.cache_find_misses(
            s["slot_keys"], s["digests"], s["scores"], s["values"], s["clock"], keys, ops.POLICIES[policy], -1.5)
        m = int(miss_count)
        assert m == int((~found).sum())
        torch.testing.assert_close(out[found], want[found], rtol=0, atol=0)
        assert bool((out[~found] == -1.5).all())
        positions = torch.sort(miss_pos[:m].long()).values
        assert torch.equal(positions.cpu(), (~found).nonzero().squeeze(1).cpu())
        # each listed key is the key at its position
        assert torch.equal(miss_keys[:m].cpu(), keys.long().cpu()[miss_pos[:m].long().cpu()])
        for name in ("scores", "clock"):  # the same score and clock updates as cache_find
            assert torch.equal(s[name], twin[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_cache_find_misses_opcheck(device):
    rng = np.random.default_rng(3)
    cache = populated_cache(device, "lru", 4, rng, n=100)
    s = cache.state()
    keys = torch.tensor([1, 2, 3], device=device)
    torch.library.opcheck(torch.ops.hps.cache_find_misses.default,
                          (s["slot_keys"], s["digests"], s["scores"], s["values"], s["clock"], keys, 0, 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_resident_index_holds_every_key(device, dtype):
    rng = np.random.default_rng(11)
    info = torch.iinfo(dtype)
    keys = np.unique(rng.integers(info.min, info.max, size=40_000, dtype=np.int64))
    keys = np.concatenate([keys, [info.min, info.max, 0, -1]])
    keys = np.unique(keys)
    rng.shuffle(keys)
    (ik, idg, ir, isp), rows = resident(device, keys, 5, rng)
    slots = ik.numel()
    assert keys.size / slots <= 0.8 + 1e-9 and keys.size / slots > 0.7  # load 0.8, no growth needed here
    assert int(isp.sum()) > 0, "some buckets spilled: the secondary probe is exercised"
    absent = rng.integers(info.min, info.max, size=3000, dtype=np.int64)
    absent = absent[~np.isin(absent, keys)]
    q = np.concatenate([keys, absent])
    perm = rng.permutation(q.size)
    q = q[perm]
    out, miss_pos, miss_keys, miss_count = ops.resident_find(ik, idg, ir, isp, rows, torch.from_numpy(q).to(dtype).to(device), 7.0)
    row_of = {int(k): i for i, k in enumerate(keys)}
    want = np.full((q.size, 5), 7.0, dtype=np.float32)
    rows_np = rows.cpu().numpy()
    for i, k in enumerate(q.tolist()):
        r = row_of.get(k)
        if r is not None:
            want[i] = rows_np[r]
    np.testing.assert_array_equal(out.cpu().numpy(), want)
    m = int(miss_count)
    assert m == absent.size
    assert sorted(miss_keys[:m].cpu().tolist()) == sorted(absent.tolist())


def test_resident_index_duplicates_take_the_last_row():
    index = ops.resident_index_build(torch.tensor([5, 9, 5, -3]))
    rows = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 2)
    out, *_ = ops.resident_find(*index, rows, torch.tensor([5, 9, -3, 4]), -1.0)
    assert out[:, 0].tolist() == [2.0, 1.0, 3.0, -1.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_resident_find_cuda_equals_cpu_and_reads_pinned_rows():
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(-(1 << 62), 1 << 62, size=100_000, dtype=np.int64))
    index = ops.resident_index_build(torch.from_numpy(keys))
    rows = torch.from_numpy(rng.standard_normal((keys.size, 128)).astype(np.float32))
    q = torch.from_numpy(np.concatenate([rng.choice(keys, 50_000), rng.integers(-(1 << 62), 1 << 62, 5000)]))
    cpu, *_ = ops.resident_find(*index, rows, q, 0.5)
    dindex = [t.cuda() for t in index]
    for table in (rows.cuda(), rows.pin_memory()):  # HBM rows, and host rows read over the bus (uvm)
        gpu, *_ = ops.resident_find(*dindex, table, q.cuda(), 0.5)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_resident_find_opcheck_and_bad_input(device):
    rng = np.random.default_rng(2)
    (ik, idg, ir, isp), rows = resident(device, np.arange(100, dtype=np.int64), 4, rng)
    torch.library.opcheck(torch.ops.hps.resident_find.default, (ik, idg, ir, isp, rows, torch.arange(10, device=device), 0.0))
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.resident_find(ik, idg, ir, isp, rows, torch.arange(10.0, device=device), 0.0)
    with pytest.raises(ValueError, match="index_spill must have shape"):
        ops.resident_find(ik, idg, ir, isp[:-1], rows, torch.arange(10, device=device), 0.0)
    with pytest.raises(TypeError, match="index_rows must have dtype"):
        ops.resident_find(ik, idg, ir.long(), isp, rows, torch.arange(10, device=device), 0.0)
