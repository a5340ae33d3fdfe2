"""CPU micro-benchmark of the embedding-cache ops: find (all hits) and insert_or_assign, in keys/s, next to a
baseline measured in the same process (torch.index_select of the same rows by precomputed slot index: the copy
without any hashing or probing).

    python -m benchmarks.bench_cache_cpu [--slots 262144] [--dims 16,128] [--batches 1024,16384,131072]

Prints a table; writes nothing. Times are the median of repeats after a warm-up (time.perf_counter).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from hps_core import ops
from hps_core.cache import EmbeddingCache


def median_seconds(fn, warmup: int = 2, repeat: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_dim(slots: int, dim: int, batches: list[int]) -> list[tuple]:
    gen = torch.Generator().manual_seed(dim)
    cache = EmbeddingCache(slots, dim, policy="lru")
    # Fill to ~70% of the slots with random keys (no refusals in practice, a few evictions).
    fill = int(cache.num_slots * 0.7)
    keys = torch.randint(-(2**62), 2**62, (fill,), generator=gen)
    cache.insert_or_assign(keys, torch.randn(fill, dim, generator=gen))
    present, _ = cache.export_all()
    out = []
    for batch in batches:
        q = present[torch.randint(0, present.numel(), (batch,), generator=gen)]
        found_all = cache.contains(q).all().item()
        assert found_all, "the all-hit query must hit"
        t_find = median_seconds(lambda: cache.find(q))
        # Baseline: the same rows gathered by slot index (what find costs without hashing and probing).
        slot_of = {k: s for s, k in enumerate(cache.slot_keys.tolist()) if cache.digests[s]} if batch <= 16384 else None
        if slot_of is not None:
            idx = torch.tensor([slot_of[k] for k in q.tolist()])
        else:
            # Large batches: any random slots, same row count and sizes (gather cost does not depend on which).
            idx = torch.randint(0, cache.num_slots, (batch,), generator=gen)
        t_gather = median_seconds(lambda: torch.index_select(cache.values, 0, idx))
        # Insert: fresh keys into a copy of the filled cache each repeat (inserts and some evictions).
        new_keys = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
        new_rows = torch.randn(batch, dim, generator=gen)
        state = {k: v.clone() for k, v in cache.state().items()}

        def insert():
            cache.load_state(state)
            t0 = time.perf_counter()
            cache.insert_or_assign_no_sync(new_keys, new_rows)
            return time.perf_counter() - t0

        insert()
        t_insert = statistics.median(insert() for _ in range(5))
        cache.load_state(state)
        out.append((dim, batch, batch / t_find, batch / t_gather, batch * dim * 4 * 2 / t_find / 1e9,
                    batch / t_insert))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=1 << 18, help="cache capacity in slots")
    parser.add_argument("--dims", default="16,128")
    parser.add_argument("--batches", default="1024,16384,131072")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    ops.bucket_size()  # load the extension before timing
    print(f"# bench_cache_cpu {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
          f"python {platform.python_version()} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"cpus {os.cpu_count()} slots {args.slots}")
    header = f"{'dim':>5} {'batch':>8} {'find keys/s':>14} {'gather keys/s':>14} {'find GB/s':>10} {'insert keys/s':>14}"
    print(header)
    print("-" * len(header))
    for dim in dims:
        for row in bench_dim(args.slots, dim, batches):
            d, b, f, g, gbs, ins = row
            print(f"{d:>5} {b:>8} {f:>14,.0f} {g:>14,.0f} {gbs:>10.2f} {ins:>14,.0f}")


if __name__ == "__main__":
    main()
