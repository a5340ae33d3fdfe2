"""The DLPack adapter's cost (interop.arrays, issue 17): `arrays.lookup` on NumPy (and CuPy / JAX where installed)
keys against the engine's `lookup` on the same keys as a torch tensor, in one process, interleaved rounds.

    python -m benchmarks.bench_arrays [--keys 1024,26624] [--rounds 40] [--out benchmarks/results/arrays_cpu]

Table 100,000 x 64 fp32, cache on (sized for the table, warm: every lookup all hits), int64 keys. Per round each path
runs `--calls` calls; the figure is the median per-call time over rounds, and the adapter's cost is the difference of
the medians. On a GPU machine the CuPy path runs on CUDA keys against torch CUDA keys (synchronised per call).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table
from interop import arrays

ROWS, DIM = 100_000, 64


def _median_us(fn, rounds: int, calls: int, sync=None) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="1024,26624")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/arrays_cpu")
    args = parser.parse_args()
    sizes = [int(s) for s in args.keys.split(",")]
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1 << 62, ROWS, dtype=np.int64)
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    results: dict = {**machine_info(), "rows": ROWS, "dim": DIM, "cells": []}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no CUDA device: served from the CPU"
        write_table(Path(tmp) / "t", keys, vectors)
        gpu = torch.cuda.is_available()
        cfg = {"key_dtype": "int64",
               "models": {"m": {"tables": [{"name": "t", "path": str(Path(tmp) / "t"), "dim": DIM,
                                            "max_keys_per_sample": max(sizes)}],
                                "max_batch_size": 1, "deployed_device_list": [0],
                                "cache": {"ratio": 1.0, "hit_rate_threshold": 1.1}}},
               "tiers": {"host_memory": {"enabled": True}}}
        with HierarchicalParameterServer(cfg, progress=False) as hps:
            for n in sizes:
                q = keys[rng.integers(0, ROWS, n)]
                paths = {"engine_torch_cpu": (lambda t=torch.from_numpy(q): hps.lookup("m", "t", t), None),
                         "arrays_numpy": (lambda a=q: arrays.lookup("m", "t", a, server=hps), None)}
                if importlib.util.find_spec("jax") is not None:
                    import jax
                    import jax.dlpack
                    import jax.numpy as jnp

                    # int64 keys stay int64 (JAX's default would cut them to int32: other keys, another dtype)
                    jax.config.update("jax_enable_x64", True)
                    jq = jnp.asarray(q)
                    assert jq.dtype == jnp.int64
                    # what is timed returns the torch path's rows
                    np.testing.assert_array_equal(np.asarray(arrays.lookup("m", "t", jq, server=hps)),
                                                  hps.lookup("m", "t", torch.from_numpy(q)).numpy())
                    paths["arrays_jax_cpu"] = (lambda a=jq: arrays.lookup("m", "t", a, server=hps), None)
                    # JAX's own floor: wrapping an existing torch buffer as a jax.Array, nothing else
                    rows = hps.lookup("m", "t", torch.from_numpy(q))
                    paths["jax_from_dlpack_alone"] = (lambda r=rows: jax.dlpack.from_dlpack(r), None)
                if gpu:
                    tq = torch.from_numpy(q).cuda()
                    paths["engine_torch_cuda"] = (lambda t=tq: hps.lookup("m", "t", t), torch.cuda.synchronize)
                    if importlib.util.find_spec("cupy") is not None:
                        import cupy

                        cq = cupy.asarray(q)
                        paths["arrays_cupy"] = (lambda a=cq: arrays.lookup("m", "t", a, server=hps),
                                                cupy.cuda.get_current_stream().synchronize)
                for fn, sync in paths.values():  # warm: the cache holds every key after this
                    for _ in range(3):
                        fn()
                    if sync:
                        sync()
                medians = {name: [] for name in paths}
                for _ in range(3):  # interleave: load changes on a shared machine hit every path alike
                    for name, (fn, sync) in paths.items():
                        medians[name].append(_median_us(fn, max(1, args.rounds // 3), args.calls, sync))
                cell = {"keys": n, **{name: statistics.median(v) for name, v in medians.items()}}
                cell["adapter_cost_us_numpy"] = cell["arrays_numpy"] - cell["engine_torch_cpu"]
                if "arrays_jax_cpu" in cell:
                    cell["adapter_cost_us_jax_cpu"] = cell["arrays_jax_cpu"] - cell["engine_torch_cpu"]
                if "arrays_cupy" in cell:
                    cell["adapter_cost_us_cupy"] = cell["arrays_cupy"] - cell["engine_torch_cuda"]
                results["cells"].append(cell)
                print(json.dumps(cell), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    notes = ["", "jax_from_dlpack_alone: `jax.dlpack.from_dlpack` of the lookup's torch result and nothing else - what "
             "JAX itself takes to wrap an existing buffer (zero-copy) as a jax.Array; the JAX adapter cost cannot go "
             "below it."]
    lines = [f"# interop.arrays adapter cost ({results['cpu']}, torch {results['torch']}, numpy "
             f"{results['numpy']}, commit {results['commit']}, {results['date']})", "",
             f"Table {ROWS:,} x {DIM} fp32, cache holding every row (all hits), int64 keys; median us per call.", "",
             "| keys | path | us / call | adapter cost over the torch call (us) |", "|---:|---|---:|---:|"]
    for c in results["cells"]:
        for name in [k for k in c if k.startswith(("engine_", "arrays_", "jax_"))]:
            cost = {"arrays_numpy": "adapter_cost_us_numpy", "arrays_jax_cpu": "adapter_cost_us_jax_cpu",
                    "arrays_cupy": "adapter_cost_us_cupy"}.get(name)
            lines.append(f"| {c['keys']:,} | {name} | {c[name]:.1f} | {c[cost]:.1f} |" if cost
                         else f"| {c['keys']:,} | {name} | {c[name]:.1f} | - |")
    lines += notes
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
