"""CPU engine lookup, B = 1024 x 26 keys per call, against torch.nn.functional.embedding on precomputed row indices.

    python -m benchmarks.bench_engine_cpu [--rows 500000] [--out benchmarks/results/engine_cpu.json]

Cases per dim (16, 128): the cache holds every queried key (all hits; the cache sized at the table), and a 10%
cache under Zipf(1.05) keys (misses go to the host-memory tier). F.embedding does no hashing: it is the floor of a
gather of the same rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile

import numpy as np
import torch

from benchmarks.common import commit, cpu_model, median_ms, zipf_ranks
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table

BATCH = 1024 * 26


def run(rows: int, dims: list[int], rounds: int) -> dict:
    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in dims:
            keys = rng.choice(1 << 40, size=rows, replace=False).astype(np.int64)
            vectors = rng.random((rows, dim), dtype=np.float32)
            path = os.path.join(tmp, f"t{dim}")
            write_table(path, keys, vectors, check_duplicates=False)
            weight = torch.from_numpy(vectors)
            for case, ratio, alpha in (("all_hit", 1.0, None), ("cache_10pct_zipf1.05", 0.1, 1.05)):
                cfg = {"models": {"m": {"tables": [{"name": "t", "path": path, "dim": dim, "max_keys_per_sample": 26}],
                                        "max_batch_size": 1024,
                                        "cache": {"ratio": ratio, "hit_rate_threshold": 1.1}}},
                       "tiers": {"host_memory": {"enabled": True}}}
                with HierarchicalParameterServer(cfg, progress=False) as hps:
                    if alpha is None:
                        idx = [rng.integers(0, min(rows, 200_000), BATCH) for _ in range(rounds)]
                        for s in range(0, min(rows, 200_000), BATCH):  # warm: every queried key cached
                            hps.lookup("m", 0, torch.from_numpy(keys[s:s + BATCH]))
                    else:
                        order = rng.permutation(rows)
                        idx = [order[zipf_ranks(rng, alpha, BATCH, rows)] for _ in range(rounds)]
                        for i in idx[:5]:
                            hps.lookup("m", 0, torch.from_numpy(keys[i]))
                    qk = [(torch.from_numpy(keys[i]),) for i in idx]
                    qi = [(torch.from_numpy(i),) for i in idx]
                    before = hps.stats()["models"]["m"]["t"]["cpu"]
                    t_engine = median_ms(lambda k: hps.lookup("m", 0, k), qk)
                    after = hps.stats()["models"]["m"]["t"]["cpu"]
                    t_emb = median_ms(lambda i: torch.nn.functional.embedding(i, weight), qi)
                    hits = (after["cache_hits"] - before["cache_hits"]) / max(after["keys"] - before["keys"], 1)
                out.append({"dim": dim, "case": case, "keys_per_call": BATCH, "engine_ms": t_engine,
                            "engine_mkeys_s": BATCH / t_engine / 1e3, "f_embedding_ms": t_emb,
                            "f_embedding_mkeys_s": BATCH / t_emb / 1e3, "ratio": t_engine / t_emb, "hit_rate": hits})
                print(out[-1], flush=True)
    return {"results": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/engine_cpu.json")
    args = ap.parse_args()
    res = run(args.rows, [16, 128], args.rounds)

    res["env"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit(), "cpu": cpu_model(),
                  "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                  "rows": args.rows, "load_average": os.getloadavg()}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
