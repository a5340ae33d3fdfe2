"""Issue 12 on the CPU (what CI-class hardware can measure): tables that fit stay resident, and what the public
lookup paths add over the table's find.

    python -m benchmarks.bench_lookup_cpu [--out benchmarks/results/lookup_pipeline_cpu.json]

RESIDENT  400,000 x 16 table from HPS files (issue 12's CPU case), gpucacheper 1.0 and use_static_table: misses and
          evictions over a second pass of every key (random order, 26,624 keys per call), and the table's bytes
          against rows x row bytes.
OVERHEAD  1,000,000 x 16 resident table (gpucacheper 1.0), 1,024 / 26,624 keys, all hits: median per-call time of
          hps.lookup and LookupLayer next to the native op they end in (torch.ops.hps.lookup: the pipeline alone)
          and F.embedding on precomputed row ids; and, labelled, the resident_find op on the same index and rows
          (it allocates and zero-fills its miss lists each call, so it is no lower bound). Same process, same keys.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import machine_info, median_ms, write_synthetic_table
from hps_core import ops
from hps_core.engine import HierarchicalParameterServer
from hps_core.nn import LookupLayer


def _engine(tmp: str, path: str, dim: int, *, static: bool, keys_per_call: int) -> HierarchicalParameterServer:
    cfg = {
        "supportlonglong": True,
        "models": [{
            "model": "m", "sparse_files": [path], "embedding_table_names": ["t"], "embedding_vecsize_per_table": [dim],
            "maxnum_catfeature_query_per_table_per_sample": [keys_per_call], "default_value_for_each_table": [0.0],
            "deployed_device_list": [0], "max_batch_size": 1, "gpucacheper": 1.0, "hit_rate_threshold": 1.1,
            "use_static_table": static, "cache_refresh_percentage_per_iteration": 0.0,
        }],
    }
    p = os.path.join(tmp, f"hps_{int(static)}.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    return HierarchicalParameterServer(p, progress=False)


def bench_resident(tmp: str) -> dict:
    rows, dim, n = 400_000, 16, 26_624
    rng = np.random.default_rng(1)
    keys = rng.choice(1 << 40, size=rows, replace=False).astype(np.int64)
    path = os.path.join(tmp, "resident")
    write_synthetic_table(path, keys, dim, seed=1)
    out = {"rows": rows, "dim": dim, "keys_per_call": n}
    for name, static in (("gpucacheper_1.0", False), ("use_static_table", True)):
        with _engine(tmp, path, dim, static=static, keys_per_call=n) as hps:
            for pass_ in ("first_pass", "second_pass"):
                before = hps.stats()["models"]["m"]["t"]["cpu"]
                order = rng.permutation(keys)
                for s in range(0, rows, n):
                    hps.lookup("m", "t", torch.from_numpy(order[s:s + n]))
                after = hps.stats()["models"]["m"]["t"]["cpu"]
                out.setdefault(name, {})[pass_] = {
                    "keys": after["keys"] - before["keys"], "misses": after["cache_misses"] - before["cache_misses"],
                    "evictions": after["evictions"] - before["evictions"]}
            s = hps.stats()["models"]["m"]["t"]["cpu"]
            out[name].update({"table_bytes": s["cache_memory_bytes"], "rows_x_row_bytes": rows * dim * 4,
                              "bytes_ratio": s["cache_memory_bytes"] / (rows * dim * 4),
                              "index_bytes_per_key": (s["cache_memory_bytes"] - rows * dim * 4) / rows,
                              "resident_keys": s["cache_size"]})
    return out


def bench_overhead(tmp: str, rounds: int) -> dict:
    rows, dim = 1_000_000, 16
    rng = np.random.default_rng(2)
    keys = rng.choice(1 << 40, size=rows, replace=False).astype(np.int64)
    path = os.path.join(tmp, "overhead")
    _, vectors = write_synthetic_table(path, keys, dim, seed=2)
    weight = torch.from_numpy(vectors)
    index = ops.resident_index_build(torch.from_numpy(keys))
    out: dict = {"rows": rows, "dim": dim}
    with _engine(tmp, path, dim, static=False, keys_per_call=26_624) as hps:
        layer = LookupLayer("m", "t", server=hps)
        pipe = hps.pipeline("m", "t", "cpu")
        op = torch.ops.hps.lookup.default
        for n in (1024, 26_624):
            ids = [torch.from_numpy(rng.integers(0, rows, n)) for _ in range(rounds)]
            qs = [torch.from_numpy(keys[i.numpy()]) for i in ids]
            r = {
                "resident_find_op": median_ms(lambda q: ops.resident_find(*index, weight, q, 0.0), [(q,) for q in qs]),
                "f_embedding": median_ms(lambda i: torch.nn.functional.embedding(i, weight), [(i,) for i in ids]),
                "lookup": median_ms(lambda q: hps.lookup("m", "t", q), [(q,) for q in qs]),
                "lookup_layer": median_ms(layer, [(q,) for q in qs]),
                "native_op": median_ms(lambda q: op(pipe.handle, q), [(q,) for q in qs]),
            }
            r["lookup_minus_native_op_us"] = (r["lookup"] - r["native_op"]) * 1e3
            r["lookup_layer_minus_native_op_us"] = (r["lookup_layer"] - r["native_op"]) * 1e3
            r["lookup_vs_f_embedding"] = r["lookup"] / r["f_embedding"]
            r["exact"] = bool(torch.equal(layer(qs[0]), torch.nn.functional.embedding(ids[0], weight)))
            out[f"keys_{n}_ms"] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/lookup_pipeline_cpu.json")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"env": machine_info(), "resident": bench_resident(tmp), "overhead": bench_overhead(tmp, args.rounds)}
    res["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
