"""CPU benchmark of the host-memory tier: fetch throughput and memory of the partitioned C++ hash map.

For each dim: a table of `--rows` random int64 keys is loaded into a HostMemoryTier (reserve first, as `load()`
does) and, for the memory figure, into a second one without reserve. Then batches of `--batch` random existing keys
are fetched and timed against two references in the same process, on the same batches (several rounds; in each,
blocks of a few batches per method, the methods in a random order, so all see the same machine load):
  * numpy baseline: `np.searchsorted` on the sorted key array + `np.take` of the rows (what a simple sorted-array
    store would do; single-threaded, as numpy is);
  * torch.index_select with the row ids already known: a pure gather, no key lookup at all (an upper bound).
Also: two Python threads fetching at once (the map releases the GIL) and the bulk-load time.

    python -m benchmarks.bench_host_memory                              # 1M rows, dims 16/64/128, batches of 26,624
    python -m benchmarks.bench_host_memory --rows 200000 --dims 16 --out quick_run    # quick run

Writes <out>/host_memory_cpu.md (markdown table + machine) and <out>/host_memory_cpu.json. Numbers depend on what
else runs on the machine: the load average at start and end is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import threading
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine_info
from hps_core.tiers.host_memory import HostMemoryTier

TAG = "hps_et.bench.t0"
TARGET_KEYS_PER_S_DIM128 = 4_000_000
TARGET_VS_NUMPY = 2.0
TARGET_MEMORY_RATIO = 1.3


def _machine() -> dict[str, Any]:
    info = machine_info(["hps_core/tiers/host_memory.py", "cuda_ext/csrc/cpu/host_map_cpu.cpp",
                         "cuda_ext/csrc/cpu/host_map.h", "benchmarks/bench_host_memory.py"],
                        "host-memory tier/benchmark")
    info["torch_threads"] = torch.get_num_threads()
    return info


def _table(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=rows + rows // 100 + 16, dtype=np.int64))
    rng.shuffle(keys)
    keys = keys[:rows]
    return keys, rng.standard_normal((rows, dim), dtype=np.float32)


def _load(tier: HostMemoryTier, keys: np.ndarray, vectors: np.ndarray, reserve: bool, chunk: int) -> float:
    tier.create_table(TAG, vectors.shape[1])
    start = time.perf_counter()
    if reserve:
        tier.reserve(TAG, len(keys))
    for s in range(0, len(keys), chunk):
        tier.insert(TAG, torch.from_numpy(keys[s : s + chunk]), torch.from_numpy(vectors[s : s + chunk]))
    return time.perf_counter() - start


def _bench_dim(dim: int, args: argparse.Namespace) -> dict[str, Any]:
    keys, vectors = _table(args.rows, dim, seed=dim)
    raw = len(keys) * (8 + 4 * dim)
    out: dict[str, Any] = {"dim": dim, "rows": len(keys), "raw_bytes": raw}

    # Memory without reserve (rows arrive in chunks, the index grows), then drop that tier.
    grown = HostMemoryTier(num_partitions=args.partitions, max_batch_size=args.chunk)
    out["load_s_no_reserve"] = _load(grown, keys, vectors, reserve=False, chunk=args.chunk)
    out["memory_bytes_no_reserve"] = grown.memory_bytes(TAG)
    grown.close()
    del grown

    tier = HostMemoryTier(num_partitions=args.partitions, max_batch_size=max(args.chunk, args.batch))
    out["load_s"] = _load(tier, keys, vectors, reserve=True, chunk=args.chunk)
    out["memory_bytes"] = tier.memory_bytes(TAG)
    assert tier.size(TAG) == len(keys)

    # References: sorted keys + rows in that order (numpy), the rows as a tensor (index_select).
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_rows = keys[order], vectors[order]
    weight = torch.from_numpy(vectors)

    rng = np.random.default_rng(1000 + dim)
    batches = [rng.integers(0, len(keys), args.batch) for _ in range(args.repeats)]
    for idx in batches[: args.warmup]:  # warm-up, and check what is timed (untimed)
        values, found = tier.fetch(TAG, torch.from_numpy(keys[idx]))
        ref = np.take(sorted_rows, np.searchsorted(sorted_keys, keys[idx]), axis=0)
        assert bool(found.all()) and np.array_equal(values.numpy(), ref)
        assert torch.equal(values, torch.index_select(weight, 0, torch.from_numpy(idx)))

    def run_tier(idx: np.ndarray) -> None:
        tier.fetch(TAG, torch.from_numpy(keys[idx]))

    def run_numpy(idx: np.ndarray) -> None:
        np.take(sorted_rows, np.searchsorted(sorted_keys, keys[idx]), axis=0)

    def run_index_select(idx: np.ndarray) -> None:
        torch.index_select(weight, 0, torch.from_numpy(idx))

    # Two Python threads fetching at once (each its own batches): the GIL is released inside the map.
    def two_threads() -> float:
        qs = [torch.from_numpy(keys[rng.integers(0, len(keys), args.batch)]) for _ in range(2 * args.repeats)]

        def worker(part: list[torch.Tensor]) -> None:
            for q in part:
                tier.fetch(TAG, q)

        threads = [threading.Thread(target=worker, args=(qs[i::2],)) for i in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(qs) * args.batch / (time.perf_counter() - start)

    # `--rounds` rounds; in each, blocks of `--block` batches per method with the methods in a random order, so
    # that all three see the same (shared, changing) machine; a batch's key conversion is timed for all three.
    # Rates are the median over all batches of all rounds; the per-round medians give the spread.
    methods = {"tier": run_tier, "numpy": run_numpy, "index_select": run_index_select}
    times: dict[str, list[float]] = {name: [] for name in methods}
    round_rates: dict[str, list[float]] = {name: [] for name in list(methods) + ["two_python_threads"]}
    for _ in range(args.rounds):
        this_round: dict[str, list[float]] = {name: [] for name in methods}
        for start in range(0, len(batches), args.block):
            for name in rng.permutation(list(methods)):
                for idx in batches[start : start + args.block]:
                    t0 = time.perf_counter()
                    methods[name](idx)
                    this_round[name].append(time.perf_counter() - t0)
        for name, ts in this_round.items():
            times[name] += ts
            round_rates[name].append(args.batch / float(np.median(ts)))
        round_rates["two_python_threads"].append(two_threads())

    for name, ts in times.items():
        out[f"{name}_keys_per_s"] = args.batch / float(np.median(ts))
        out[f"{name}_keys_per_s_best"] = args.batch / float(np.min(ts))
    out["two_python_threads_keys_per_s"] = float(np.median(round_rates["two_python_threads"]))
    out["round_medians_keys_per_s"] = round_rates
    tier.close()
    return out


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}"


def _markdown(results: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Host-memory tier (C++ partitioned hash map), CPU benchmark",
        "",
        f"`python -m benchmarks.bench_host_memory` — {args.rows:,} rows per table, {args.partitions} partitions, "
        f"fetch batches of {args.batch:,} random existing keys, median (best) over {args.rounds} rounds of "
        f"{args.repeats} batches after {args.warmup} warm-up batches (rounds min-max: the spread of per-round "
        f"medians); torch intra-op threads: {machine['torch_threads']}. References timed on the "
        f"same batches, in blocks of {args.block} batches per method, methods in a random order each round: "
        "numpy `searchsorted` + `take` (single-threaded), `torch.index_select` with the "
        "row ids known (a pure gather, no key lookup).",
        "",
        "| dim | HostMemoryTier.fetch M keys/s | rounds min-max | numpy M keys/s | vs numpy | index_select M rows/s | "
        "2 Python threads M keys/s | memory / raw (reserve) | memory / raw (no reserve) | load s (reserve) | "
        "targets met |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = r["tier_keys_per_s"] / r["numpy_keys_per_s"]
        mem, mem_grow = r["memory_bytes"] / r["raw_bytes"], r["memory_bytes_no_reserve"] / r["raw_bytes"]
        mem_ok = max(mem, mem_grow) <= TARGET_MEMORY_RATIO
        checks = [f"vs numpy >= {TARGET_VS_NUMPY:g}x: {'yes' if ratio >= TARGET_VS_NUMPY else '**no**'}",
                  f"memory <= {TARGET_MEMORY_RATIO}x: {'yes' if mem_ok else '**no**'}"]
        if r["dim"] == 128:
            ok = r["tier_keys_per_s"] >= TARGET_KEYS_PER_S_DIM128
            checks.insert(0, f">= {TARGET_KEYS_PER_S_DIM128 / 1e6:g} M keys/s: {'yes' if ok else '**no**'}")
        lines.append(
            f"| {r['dim']} | {_fmt_rate(r['tier_keys_per_s'])} ({_fmt_rate(r['tier_keys_per_s_best'])}) | "
            f"{_fmt_rate(min(r['round_medians_keys_per_s']['tier']))}-"
            f"{_fmt_rate(max(r['round_medians_keys_per_s']['tier']))} | "
            f"{_fmt_rate(r['numpy_keys_per_s'])} ({_fmt_rate(r['numpy_keys_per_s_best'])}) | {ratio:.1f}x | "
            f"{_fmt_rate(r['index_select_keys_per_s'])} ({_fmt_rate(r['index_select_keys_per_s_best'])}) | "
            f"{_fmt_rate(r['two_python_threads_keys_per_s'])} | {mem:.3f} | {mem_grow:.3f} | {r['load_s']:.2f} | "
            f"{'; '.join(checks)} |"
        )
    lines += [
        "",
        "Raw bytes = rows x (8 + 4 x dim). Memory = HostHashMap.memory_bytes(): index + value pages (with the per-row "
        "access meta) + free lists, as allocated. index_select runs on torch's intra-op threads and is erratic on a "
        "shared 2-core machine (per-round medians in the JSON); the numpy baseline is single-threaded.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, numpy {machine['numpy']}, "
        f"torch {machine['torch']}; commit {machine['commit']}; {machine['date']}.",
        f"Load average (1 min) at start {machine['loadavg_start']:.2f}, at end {machine['loadavg_end']:.2f} "
        "(the machine is shared: other jobs may run at the same time).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128])
    parser.add_argument("--batch", type=int, default=26_624)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=5, help="batches per method in a row")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --repeats batches per method")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=65_536, help="rows per insert call while loading")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    machine = _machine()
    results = []
    for dim in args.dims:
        r = _bench_dim(dim, args)
        results.append(r)
        print(
            f"dim {dim:4d}: tier {_fmt_rate(r['tier_keys_per_s'])} M keys/s, numpy {_fmt_rate(r['numpy_keys_per_s'])}, "
            f"index_select {_fmt_rate(r['index_select_keys_per_s'])}, 2 threads "
            f"{_fmt_rate(r['two_python_threads_keys_per_s'])}; memory {r['memory_bytes'] / r['raw_bytes']:.3f}x "
            f"(no reserve {r['memory_bytes_no_reserve'] / r['raw_bytes']:.3f}x)",
            flush=True,
        )
    machine["loadavg_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_memory_cpu.md").write_text(_markdown(results, machine, args))
    payload = {"machine": machine, "config": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                                             for k, v in vars(args).items()}, "results": results}
    (args.out / "host_memory_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'host_memory_cpu.md'} and {args.out / 'host_memory_cpu.json'}")


if __name__ == "__main__":
    main()
