"""Where the host time of a lookup goes: the P2 workload (2,000 keys, power law 1.2, 630,000 x 16, cache 90%)
under cProfile, top functions by own time.

    python -m benchmarks.profile_lookup [--iters 500] [--threshold 1.0] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

import numpy as np
import torch

from benchmarks.bench_gpu import _engine, zipf_ranks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--torch-profiler", metavar="TRACE_JSON", default=None,
                    help="profile 50 lookups with torch.profiler instead (CUDA API calls, kernels, copies); print the "
                         "table and write a chrome trace here")
    args = ap.parse_args()
    rows, n = 630_000, 2000
    with tempfile.TemporaryDirectory() as tmp:
        hps, keys, _ = _engine(tmp, rows, 16, 0.9, n, threshold=args.threshold)
        rng = np.random.default_rng(7)
        order = rng.permutation(rows)
        queries = [torch.from_numpy(keys[order[zipf_ranks(rng, 1.2, n, rows)]]).to(args.device)
                   for _ in range(args.iters + 100)]
        for q in queries[:100]:
            hps.lookup("m", "t", q)
        if args.torch_profiler:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with profile(activities=activities) as tprof:
                for q in queries[100:150]:
                    hps.lookup("m", "t", q)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
            hps.close()
            print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            tprof.export_chrome_trace(args.torch_profiler)
            return 0
        prof = cProfile.Profile()
        prof.enable()
        for q in queries[100:]:
            hps.lookup("m", "t", q)
        if args.device == "cuda":
            torch.cuda.synchronize()
        prof.disable()
        hps.close()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
