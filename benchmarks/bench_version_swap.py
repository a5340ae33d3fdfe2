"""Version swap without downtime (issue 18 item 2): `swap_model` of a 1 M x 128 model while 8 threads look it up.

    python -m benchmarks.bench_version_swap [--rows 1000000] [--dim 128] [--threads 8] [--out ...]

Version v's rows are all v, so a batch that mixed versions would show two values. Reported: the swap's wall time
(loading the new version beside the old one, then the switch), lookups before / during / after it, failed lookups,
mixed-version batches, and the readers' p50 / p99 latency outside and during the swap.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/version_swap_cpu")
    args = parser.parse_args()
    keys = np.random.default_rng(0).choice(np.int64(1) << 40, args.rows, replace=False)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        for v in (1, 2):
            write_table(Path(tmp) / f"v{v}", keys, np.full((args.rows, args.dim), float(v), np.float32))

        def section(v: int) -> dict:
            return {"tables": [{"name": "t", "path": str(Path(tmp) / f"v{v}"), "dim": args.dim,
                                "max_keys_per_sample": 1024}],
                    "max_batch_size": 1, "deployed_device_list": [0], "cache": {"ratio": 0.1, "hit_rate_threshold": 1.1}}

        cfg = {"key_dtype": "int64", "models": {"m": section(1)}, "tiers": {"host_memory": {"enabled": True}}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            hps = HierarchicalParameterServer(cfg, progress=False)
        stop = threading.Event()
        records: list[tuple[float, float, int]] = []  # (start, seconds, version seen or -1 failed / -2 mixed)
        lock = threading.Lock()

        def reader(seed: int) -> None:
            r = np.random.default_rng(seed)
            mine = []
            while not stop.is_set():
                q = torch.from_numpy(keys[r.integers(0, args.rows, 1024)])
                t0 = time.perf_counter()
                try:
                    vals = torch.unique(hps.lookup("m", "t", q)).tolist()
                    seen = int(vals[0]) if len(vals) == 1 else -2
                except Exception:  # noqa: BLE001 - counted
                    seen = -1
                mine.append((t0, time.perf_counter() - t0, seen))
            with lock:
                records.extend(mine)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        s0 = time.perf_counter()
        hps.swap_model("m", section(2))
        s1 = time.perf_counter()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        hps.close()
    lat = {name: np.array([d for s, d, _ in records if sel(s)]) * 1e3 for name, sel in
           (("outside", lambda s: s < s0 or s >= s1), ("during", lambda s: s0 <= s < s1))}
    res = {**info, "rows": args.rows, "dim": args.dim, "threads": args.threads, "swap_s": s1 - s0,
           "lookups": len(records), "failed": sum(1 for *_, v in records if v == -1),
           "mixed": sum(1 for *_, v in records if v == -2),
           "v1_after_swap": sum(1 for s, _, v in records if v == 1 and s >= s1),
           "v2_before_swap": sum(1 for s, _, v in records if v == 2 and s < s0),
           "latency_ms": {k: {"n": int(a.size), "p50": float(np.percentile(a, 50)) if a.size else None,
                              "p99": float(np.percentile(a, 99)) if a.size else None} for k, a in lat.items()}}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    o, d = res["latency_ms"]["outside"], res["latency_ms"]["during"]
    md = [f"# Version swap under load ({res['cpu']}, torch {res['torch']}, commit {res['commit']}, {res['date']})",
          "", f"{args.rows:,} x {args.dim} fp32 model (host-memory tier + 10% cache), {args.threads} reader threads "
          "of 1,024 keys; `swap_model` to a second version (every row of version v is all v).", "",
          "| what | value |", "|---|---:|",
          f"| swap time (load v2 beside v1, then switch) | {res['swap_s']:.2f} s |",
          f"| lookups / failed / mixed-version batches | {res['lookups']:,} / {res['failed']} / {res['mixed']} |",
          f"| v1 served after the swap returned / v2 before it started | {res['v1_after_swap']} / "
          f"{res['v2_before_swap']} |",
          f"| reader p50 / p99 outside the swap (ms) | {o['p50']:.3f} / {o['p99']:.3f} |",
          f"| reader p50 / p99 during the swap (ms) | {d['p50']:.3f} / {d['p99']:.3f} |"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
