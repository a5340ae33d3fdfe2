"""Lookups that return bfloat16 / float16 (`lookup(..., dtype=)`, `LookupLayer(dtype=)`): every row - a hit, a
miss fetched from the tiers, a key no tier holds (the default) - is the float32 row rounded to nearest even, on
every deployment and device; the tables keep float32 rows (a later float32 lookup is exact); the CUDA rows equal
the CPU twin's bit for bit; a dtype a lookup cannot return raises before anything is looked up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.nn import LookupLayer
from hps_core.testing import device_params

from engine_refs import Reference, make_table

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device:RuntimeWarning")
DEVICES = device_params()
LOW = [torch.bfloat16, torch.float16]
DEPLOYMENTS = {
    "dynamic_lru": {"ratio": 0.05, "policy": "lru"},
    "dynamic_lfu": {"ratio": 0.05, "policy": "lfu"},
    "resident_ratio_1": {"ratio": 1.0},
    "static": {"type": "static"},
    "second_level": {"ratio": 0.05, "second_level": "host_mapped"},
    "no_cache": {"enabled": False},
}


def server(tmp_path, rng, cache, *, dim=16, rows=4000):
    path = tmp_path / "t"
    keys, vectors = make_table(path, rows, dim, rng)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 4096,
                                     "default_value": -0.3}],
                         "max_batch_size": 1, "deployed_device_list": [0],
                         "cache": {"hit_rate_threshold": 1.1, **cache}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": 2}},
    }
    return HierarchicalParameterServer(cfg, progress=False), Reference(keys, vectors, -0.3), keys


def query(rng, keys, n=700):
    """Table keys with repeats, and keys no tier holds."""
    absent = rng.integers(1 << 50, 1 << 51, 50)
    return np.concatenate([rng.choice(keys, n - 50), absent])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dim", [16, 10])  # 10: rows that are not whole 16-byte words (the scalar copies)
def test_rows_are_the_float32_rows_rounded(tmp_path, rng, device, deployment, dtype, dim):
    hps, ref, keys = server(tmp_path, rng, DEPLOYMENTS[deployment], dim=dim)
    with hps:
        for _ in range(2):  # first pass: misses through the tiers (and inserts); second: hits
            q = query(rng, keys)
            got = hps.lookup("m", "t", torch.from_numpy(q).to(device), dtype=dtype)
            assert got.dtype == dtype and got.device.type == device and got.shape == (q.size, dim)
            want = torch.from_numpy(ref.lookup(q)).to(dtype)  # torch rounds to nearest even
            assert torch.equal(got.cpu(), want)
        # The table kept float32 rows: what the low-precision lookups stored is exact.
        q = query(rng, keys)
        assert torch.equal(hps.lookup("m", "t", torch.from_numpy(q).to(device)).cpu(), torch.from_numpy(ref.lookup(q)))


@pytest.mark.parametrize("deployment", list(DEPLOYMENTS))
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_rows_equal_the_cpu_twin(tmp_path, rng, deployment, dtype):
    hps, ref, keys = server(tmp_path, rng, DEPLOYMENTS[deployment], dim=16)
    with hps:
        q = torch.from_numpy(query(rng, keys))
        for _ in range(2):
            cpu = hps.lookup("m", "t", q, dtype=dtype)
            gpu = hps.lookup("m", "t", q.cuda(), dtype=dtype)
            assert torch.equal(gpu.cpu().view(torch.int16), cpu.view(torch.int16))


def awkward_rows(dim):
    """float32 values whose rounding is easy to get wrong: exact halfway cases between two bfloat16 values (even
    and odd below), values just off halfway, float16 subnormals and overflow, signed zeros, infinities."""
    bits = []
    for hi in (0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x4000, 0x0001, 0x7F7F):
        bits += [(hi << 16) | lo for lo in (0x8000, 0x7FFF, 0x8001, 0x0000)]
    vals = np.array(bits, dtype=np.uint32).view(np.float32).tolist()
    vals += [1e-6, -3e-7, 6.1e-5, 65504.0, 65520.0, 1e5, -1e5, 0.0, -0.0, np.inf, -np.inf, 1.0 + 2 ** -11,
             1.0 + 3 * 2 ** -11]
    vals = np.array(vals, dtype=np.float32)
    vals = np.resize(vals, (vals.size + dim - 1) // dim * dim)
    return vals.reshape(-1, dim)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("dim", [16, 10])
def test_rounding_of_awkward_values(dtype, dim):
    """Resident tables on each device hold awkward_rows; the rounded rows equal torch's conversion (round to
    nearest even, overflow to inf) on the CPU, and the CUDA twin's equal the CPU's bit for bit."""
    from hps_core.pipeline import TablePipeline

    rows = torch.from_numpy(awkward_rows(dim))
    keys = torch.arange(rows.shape[0], dtype=torch.int64) * 7 + 3
    q = torch.cat([keys.flip(0), torch.tensor([10 ** 12])])  # and a key the table lacks: the default
    want = torch.cat([rows.flip(0), torch.full((1, dim), -0.3)]).to(dtype)
    outs = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        pipe = TablePipeline.resident(device, dim=dim, capacity=rows.shape[0], default_value=-0.3, max_keys=0,
                                      tag=f"awkward.{device}", mode="static", misses_to_tiers=False)
        try:
            pipe.load(keys, rows)
            outs[device] = pipe.lookup(q.to(device), dtype).cpu()
        finally:
            pipe.close()
    assert torch.equal(outs["cpu"].view(torch.int16), want.view(torch.int16))
    if "cuda" in outs:
        assert torch.equal(outs["cuda"].view(torch.int16), outs["cpu"].view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_lookup_layer_returns_its_dtype_and_compiles(tmp_path, rng, device):
    hps, ref, keys = server(tmp_path, rng, {"ratio": 0.5})
    with hps:
        layer = LookupLayer("m", "t", server=hps, dtype=torch.bfloat16)
        assert "dtype=torch.bfloat16" in repr(layer)
        q = torch.from_numpy(query(rng, keys, 64)).reshape(8, 8).to(device)
        want = torch.from_numpy(ref.lookup(q.cpu().numpy())).to(torch.bfloat16)
        assert torch.equal(layer(q).cpu(), want)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        out = compiled(q)
        assert out.dtype == torch.bfloat16 and torch.equal(out.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_a_dtype_a_lookup_cannot_return_raises(tmp_path, rng, device):
    hps, ref, keys = server(tmp_path, rng, {"ratio": 0.5})
    with hps:
        q = torch.from_numpy(keys[:5]).to(device)
        before = hps.stats()["models"]["m"]["t"]
        for bad in (torch.float64, torch.int32, torch.float8_e4m3fn):
            with pytest.raises(TypeError, match="dtype"):
                hps.lookup("m", "t", q, dtype=bad)
            with pytest.raises(TypeError, match="dtype"):
                LookupLayer("m", "t", server=hps, dtype=bad)
        # the native op refuses too, without looking anything up
        handle = hps.pipeline("m", "t", device).handle
        with pytest.raises((TypeError, RuntimeError), match="dtype"):
            torch.ops.hps.lookup(handle, q, torch.float64)
        assert hps.stats()["models"]["m"]["t"] == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_no_cache_gpu_keys_round_on_the_host(tmp_path, rng):
    """A table without a cache served to GPU keys goes through the tiers in Python: same rounding."""
    hps, ref, keys = server(tmp_path, rng, {"enabled": False})
    with hps:
        q = query(rng, keys)
        got = hps.lookup("m", "t", torch.from_numpy(q).cuda(), dtype=torch.float16)
        assert got.dtype == torch.float16 and torch.equal(got.cpu(), torch.from_numpy(ref.lookup(q)).half())
