"""The engine serving GPU keys end to end, against the CPU engine and the numpy reference (run with -m cuda)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.engine import HierarchicalParameterServer

from engine_refs import Reference, make_table

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
]


def config(tmp_path, rng, mode, ratio, threshold=1.1, dim=32, rows=4000):
    path = tmp_path / f"t_{mode}"
    keys, vectors = make_table(path, rows, dim, rng)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": str(path), "dim": dim, "max_keys_per_sample": 64,
                                     "default_value": -2.0}],
                         "max_batch_size": 512, "deployed_device_list": [0],
                         "cache": {"ratio": ratio, "type": mode, "hit_rate_threshold": threshold}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": 4}},
    }
    return cfg, Reference(keys, vectors, -2.0)


def queries(ref, rng, n, count):
    known = np.array(list(ref.rows), dtype=np.int64)
    out = []
    for _ in range(count):
        q = rng.choice(known, n)
        q[::11] = rng.integers(-(1 << 62), 1 << 62, size=q[::11].size)
        q[:2] = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]
        out.append(q)
    return out


@pytest.mark.parametrize("mode,ratio", [("dynamic", 0.05), ("dynamic", 1.0), ("static", 0.2), ("uvm", 0.2)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_gpu_engine_equals_cpu_engine_and_reference(tmp_path, rng, mode, ratio, dtype):
    cfg, ref = config(tmp_path, rng, mode, ratio)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        for q in queries(ref, rng, 2000, 6):
            if dtype == torch.int32:
                q = (q % (1 << 31)).astype(np.int64)
            keys = torch.from_numpy(q).to(dtype)
            gpu = hps.lookup("m", 0, keys.cuda().reshape(40, 50))
            cpu = hps.lookup("m", 0, keys.reshape(40, 50))
            assert gpu.device.type == "cuda" and gpu.shape == (40, 50, ref.dim)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
            np.testing.assert_array_equal(gpu.cpu().numpy(), ref.lookup(keys.numpy().reshape(40, 50)))
        stats = hps.stats()["models"]["m"]["t"]
        assert stats["cuda:0"]["keys"] == 6 * 2000


def test_gpu_update_refresh_and_async(tmp_path, rng):
    # A learning cache (at ratio >= 1 the table is resident and nothing misses); the file's last rows are outside
    # what the start-up warm-up fills.
    cfg, ref = config(tmp_path, rng, "dynamic", 0.5, threshold=0.0)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        keys = torch.tensor(list(ref.rows)[-256:], device="cuda")
        first = hps.lookup("m", 0, keys)  # async mode: defaults now, rows inserted by the worker
        assert bool((first == ref.default).all())
        hps.wait_for_inserts()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(hps.lookup("m", 0, keys).cpu().numpy(), ref.lookup(keys.cpu().numpy()))
        new = torch.randn(256, ref.dim)
        hps.update("m", 0, keys.cpu(), new)
        torch.testing.assert_close(hps.lookup("m", 0, keys).cpu(), new, rtol=0, atol=0)
        changed = torch.full((256, ref.dim), 3.0)
        hps.tiers[0].insert("hps_et.m.t", keys.cpu(), changed)
        assert hps.refresh("m", 0) >= 256
        torch.testing.assert_close(hps.lookup("m", 0, keys).cpu(), changed, rtol=0, atol=0)


def test_gpu_lookup_on_a_side_stream(tmp_path, rng):
    """Lookups issued on a non-default stream produce the same rows (work follows the caller's stream)."""
    cfg, ref = config(tmp_path, rng, "dynamic", 0.2)
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        side = torch.cuda.Stream()
        qs = [torch.from_numpy(q).cuda() for q in queries(ref, rng, 1000, 4)]
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            outs = [hps.lookup("m", 0, q) for q in qs]
        side.synchronize()
        for q, out in zip(qs, outs):
            np.testing.assert_array_equal(out.cpu().numpy(), ref.lookup(q.cpu().numpy()))
