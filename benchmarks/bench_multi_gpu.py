"""Multi-GPU scaling of the engine (issue 8): one serving thread per device, the same work per device, 1 vs N.

    python -m benchmarks.bench_multi_gpu --out results.json [--gpus 0,1 | --devices cpu] [--quick] [--only hit,zipf]

hit   every key cached: dim 128, 131072 x 26 keys per call (quick: 8192 x 26), keys drawn uniformly from a hot set
      of half the cache's rows (residency on every device is checked with `contains` before timing; keys a bucket
      refused are dropped from the hot set and counted).
zipf  10% cache, Zipf alpha 1.05 over an 8 M x 128 table (quick: 400 K x 128) held whole in the host-memory tier that
      every device shares, 131072 x 26 keys per call (quick: 4096 x 26), synchronous inserts (exact rows).

For each workload one engine deploys the table on every listed device: one cache per device, one host tier. Every
device is warmed first (all at once). Then the timed phase runs with one thread on the first device, then with one
thread per listed device, each thread making the same calls on its own device (its device current, its own stream).
aggregate keys/s = all keys / wall time from the common start (a barrier) to the end of the last thread (its stream
synchronised); per-device keys/s = that device's keys / its own wall time (CUDA-event time on its stream recorded
next to it); scaling = aggregate(N devices) / aggregate(1 device); hit rate per device from the engine's stats over
the timed calls. The rows of each device's first batch are compared with the table after timing.

Devices: `--gpus 0,1` (CUDA ordinals) or `--devices cpu` / `--devices cuda:0,cuda:1` (default: every visible GPU,
else the CPU). A device may be listed twice (`--devices cpu,cpu`): two threads on one cache, a contention check, not
a scaling number. On a CPU-only machine `--quick --devices cpu` is a smoke check of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import DLRM_KEYS, ZipfSampler, distinct_keys, machine_info, write_synthetic_table

DIM = 128
SIZES = {  # full / quick
    "hit": {"rows": (4_000_000, 200_000), "keys_per_call": (DLRM_KEYS, 8192 * 26), "batches": (4, 3),
            "calls": (200, 6)},
    "zipf": {"rows": (8_000_000, 400_000), "keys_per_call": (DLRM_KEYS, 4096 * 26), "batches": (8, 4),
             "calls": (12, 6), "warm_calls": (8, 4)},
}
ALPHA = 1.05
CACHE_RATIO_ZIPF = 0.1
CHECK_ROWS = 65536  # rows of each device's first batch compared with the table


# ------------------------------------------------------------------------------------------------ environment


def devices_from_args(args: argparse.Namespace) -> list[torch.device]:
    if args.gpus is not None and args.devices is not None:
        raise SystemExit("give --gpus or --devices, not both")
    if args.gpus is not None:
        names = [f"cuda:{int(g)}" for g in args.gpus.split(",") if g.strip()]
    elif args.devices is not None:
        names = [d.strip() for d in args.devices.split(",") if d.strip()]
    else:
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    devices = [torch.device(n) for n in names]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in devices:
        if d.type == "cuda" and (d.index is None or d.index >= count):
            raise SystemExit(f"device {d} does not exist ({count} CUDA devices visible)")
        if d.type not in ("cuda", "cpu"):
            raise SystemExit(f"device {d}: only cpu and cuda:<n> are served")
    if not devices:
        raise SystemExit("no device given")
    return devices


def env_info(devices: list[torch.device]) -> dict[str, Any]:
    """machine_info (CPU, versions, commit, date, GPU 0) plus every listed device, peer access and the topology."""
    info = machine_info(["hps_core", "cuda_ext", "benchmarks/bench_multi_gpu.py"], "engine/benchmark changes")
    info["cuda"] = torch.version.cuda
    info["visible_gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = []
    for d in dict.fromkeys(devices):
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            listed.append({"device": str(d), "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                           "sm_count": p.multi_processor_count})
        else:
            listed.append({"device": "cpu", "name": info.get("cpu"), "threads": torch.get_num_threads()})
    info["devices"] = listed
    gpus = sorted({d.index for d in devices if d.type == "cuda"})
    info["peer_access"] = {f"{i}->{j}": torch.cuda.can_device_access_peer(i, j) for i in gpus for j in gpus if i != j}
    if len(gpus) > 1:
        try:
            info["nvidia_smi_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                                     timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi_topo"] = "?"
    return info


# ------------------------------------------------------------------------------------------------ engine


def make_engine(tmp: str, rows: int, ratio: float, keys_per_call: int, devices: list[torch.device], seed: int):
    """One table of `rows` x DIM (synthetic rows, HPS files in `tmp`) in the host-memory tier, a cache of `ratio` x
    rows on every device. Returns (engine, table keys, table rows)."""
    from hps_core.engine import HierarchicalParameterServer

    rng = np.random.default_rng(seed)
    keys = distinct_keys(rng, rows, 1 << 40)
    path = os.path.join(tmp, f"t_{rows}_{DIM}")
    _, vectors = write_synthetic_table(path, keys, DIM, seed)
    ordinals = sorted({d.index for d in devices if d.type == "cuda"}) or [0]
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t", "path": path, "dim": DIM, "max_keys_per_sample": keys_per_call}],
                         "max_batch_size": 1, "deployed_device_list": ordinals,
                         # 1.0: a batch goes asynchronous only when it has no miss, so every row served is exact
                         "cache": {"ratio": ratio, "hit_rate_threshold": 1.0, "policy": "lru"}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": min(16, os.cpu_count() or 1)}},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no CUDA device", RuntimeWarning)  # CPU smoke runs: ordinals -> CPU
        hps = HierarchicalParameterServer(cfg, progress=False)
    return hps, keys, vectors


def _device_stats(hps, device: torch.device) -> dict[str, Any]:
    """The engine's counters of the table on `device` (zeros before a CPU cache exists: made on first use)."""
    return hps.stats()["models"]["m"]["t"].get(str(device), {"cache_hits": 0, "keys": 0, "tier_hits": {}})


# ------------------------------------------------------------------------------------------------ threads


def per_device_threads(devices: list[torch.device], fn: Callable[[int, torch.device], Any]) -> list[dict[str, Any]]:
    """fn(i, device) in one thread per entry of `devices`, released together by a barrier; each thread makes its
    device current and runs on a stream of its own. Returns per thread {"start", "end", "event_s", "result"}
    (perf_counter seconds; CUDA-event seconds on the thread's stream, None on the CPU)."""
    barrier = threading.Barrier(len(devices))
    out: list[dict[str, Any]] = [{} for _ in devices]
    errors: list[str] = []

    def body(i: int, device: torch.device) -> None:
        try:
            stream = None
            if device.type == "cuda":
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
                torch.cuda.synchronize(device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                ev0 = ev1 = None
                barrier.wait(timeout=600)
                start = time.perf_counter()
                if stream is not None:
                    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    ev0.record(stream)
                result = fn(i, device)
                if stream is not None:
                    ev1.record(stream)
                    stream.synchronize()
                end = time.perf_counter()
            out[i] = {"start": start, "end": end, "result": result,
                      "event_s": ev0.elapsed_time(ev1) / 1e3 if ev0 is not None else None}
        except BaseException:  # noqa: BLE001 - re-raised in the caller
            errors.append(f"thread {i} on {device}:\n{traceback.format_exc()}")
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i, d), name=f"bench-{d}-{i}") for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return out


def timed_phase(hps, devices: list[torch.device], batches: list[list[torch.Tensor]], calls: int) -> dict[str, Any]:
    """`calls` lookups per device from its own thread (batches[i] cycled), all started together."""
    unique_devs = list(dict.fromkeys(devices))
    before = {d: _device_stats(hps, d) for d in unique_devs}

    def work(i: int, device: torch.device) -> int:
        keys = 0
        for c in range(calls):
            q = batches[i][c % len(batches[i])]
            hps.lookup("m", "t", q)
            keys += q.numel()
        return keys

    runs = per_device_threads(devices, work)
    after = {d: _device_stats(hps, d) for d in unique_devs}
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    total = sum(r["result"] for r in runs)
    per_device = []
    for d, r in zip(devices, runs):
        own = r["end"] - r["start"]
        a, b = after[d], before[d]
        hits, keys = a["cache_hits"] - b["cache_hits"], a["keys"] - b["keys"]
        per_device.append({
            "device": str(d), "calls": calls, "keys": r["result"], "wall_s": own,
            "keys_per_s": r["result"] / own, "ms_per_call": own / calls * 1e3,
            "event_ms_per_call": r["event_s"] / calls * 1e3 if r["event_s"] is not None else None,
            # a device listed twice shares one cache and one stats entry: its hit rate covers both threads
            "hit_rate": hits / keys if keys else None,
            "host_tier_hits": a["tier_hits"].get("host_memory", 0) - b["tier_hits"].get("host_memory", 0),
        })
    return {"devices": [str(d) for d in devices], "wall_s": wall, "keys": total,
            "aggregate_keys_per_s": total / wall, "per_device": per_device}


def check_rows(hps, devices, batches, index, vectors) -> dict[str, bool]:
    """Each device's first batch again; its first CHECK_ROWS rows must equal the table rows of its keys."""
    ok = {}
    for i, d in enumerate(devices):
        if d.type == "cuda":
            torch.cuda.set_device(d)
        out = hps.lookup("m", "t", batches[i][0])
        m = min(CHECK_ROWS, out.shape[0])
        ok[f"{i}:{d}"] = bool(np.array_equal(out[:m].cpu().numpy(), vectors[index[i][:m]]))
    return ok


def scaling_runs(hps, devices, batches, calls) -> dict[str, Any]:
    res: dict[str, Any] = {"one_device": timed_phase(hps, devices[:1], batches[:1], calls)}
    if len(devices) > 1:
        res["all_devices"] = timed_phase(hps, devices, batches, calls)
        res["scaling"] = res["all_devices"]["aggregate_keys_per_s"] / res["one_device"]["aggregate_keys_per_s"]
        res["ideal_scaling"] = len(devices)
    else:
        res["scaling"] = None
        res["note"] = "one device listed: no multi-device run"
    return res


# ------------------------------------------------------------------------------------------------ workloads


def bench_hit(devices: list[torch.device], quick: bool, tmp: str) -> dict[str, Any]:
    q = int(quick)
    rows, n = SIZES["hit"]["rows"][q], SIZES["hit"]["keys_per_call"][q]
    nb, calls = SIZES["hit"]["batches"][q], SIZES["hit"]["calls"][q]
    t0 = time.perf_counter()
    hps, keys, vectors = make_engine(tmp, rows, 1.0, n, devices, seed=1)
    try:
        setup_s = time.perf_counter() - t0
        rt = hps.table("m", "t")
        hot = np.arange(rows // 2)  # table rows of the hot set (keys are random, so this is a random key set)
        for d in dict.fromkeys(devices):  # fill every device's cache with the hot set
            for s in range(0, hot.size, n):
                hps.lookup("m", "t", torch.from_numpy(keys[hot[s:s + n]]).to(d))
        resident = np.ones(hot.size, dtype=bool)
        for d in dict.fromkeys(devices):
            resident &= rt.caches[d].contains(torch.from_numpy(keys[hot]).to(d)).cpu().numpy()
        hot = hot[resident]
        rng = np.random.default_rng(2)
        index = [[hot[rng.integers(0, hot.size, n)] for _ in range(nb)] for _ in devices]
        batches = [[torch.from_numpy(keys[ix]).to(d) for ix in index[i]] for i, d in enumerate(devices)]
        for i, d in enumerate(devices):  # warm: one untimed call per batch on every device
            for b in batches[i]:
                hps.lookup("m", "t", b)
        res = {"rows": rows, "dim": DIM, "keys_per_call": n, "cache_ratio": 1.0,
               "cache_slots": rt.caches[devices[0]].num_slots, "hot_keys": int(hot.size),
               "hot_keys_resident_fraction": float(resident.mean()), "calls_per_device": calls, "setup_s": setup_s}
        res.update(scaling_runs(hps, devices, batches, calls))
        res["rows_equal"] = check_rows(hps, devices, batches, [ix[0] for ix in index], vectors)
        return res
    finally:
        hps.close()


def bench_zipf(devices: list[torch.device], quick: bool, tmp: str) -> dict[str, Any]:
    q = int(quick)
    rows, n = SIZES["zipf"]["rows"][q], SIZES["zipf"]["keys_per_call"][q]
    nb, calls, warm = SIZES["zipf"]["batches"][q], SIZES["zipf"]["calls"][q], SIZES["zipf"]["warm_calls"][q]
    t0 = time.perf_counter()
    hps, keys, vectors = make_engine(tmp, rows, CACHE_RATIO_ZIPF, n, devices, seed=3)
    try:
        setup_s = time.perf_counter() - t0
        rng = np.random.default_rng(4)
        popularity = rng.permutation(rows)  # rank -> table row
        sampler = ZipfSampler(rows, ALPHA)
        # Each device serves its own requests drawn from the same popularity (data-parallel serving).
        index = [[popularity[sampler.sample(np.random.default_rng(100 * i + b), n)] for b in range(nb)]
                 for i in range(len(devices))]
        batches = [[torch.from_numpy(keys[ix]).to(d) for ix in index[i]] for i, d in enumerate(devices)]
        t1 = time.perf_counter()
        warm_phase = timed_phase(hps, devices, batches, warm)  # every cache learns the head of the distribution
        res = {"rows": rows, "dim": DIM, "keys_per_call": n, "alpha": ALPHA, "cache_ratio": CACHE_RATIO_ZIPF,
               "cache_slots": hps.table("m", "t").caches[devices[0]].num_slots, "tier": "host_memory (shared)",
               "calls_per_device": calls, "warm_calls_per_device": warm, "setup_s": setup_s,
               "warm_s": time.perf_counter() - t1,
               "warm_hit_rate": [p["hit_rate"] for p in warm_phase["per_device"]]}
        res.update(scaling_runs(hps, devices, batches, calls))
        res["rows_equal"] = check_rows(hps, devices, batches, [ix[0] for ix in index], vectors)
        return res
    finally:
        hps.close()


BENCHES = {"hit": bench_hit, "zipf": bench_zipf}


def _summary(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"[{name}] ERROR {r['error'].strip().splitlines()[-1]}"
    lines = [f"[{name}] {r['keys_per_call']:,} keys/call, {r['rows']:,} x {r['dim']} rows, rows equal: "
             f"{all(r['rows_equal'].values())}"]
    for phase in ("one_device", "all_devices"):
        if phase in r:
            p = r[phase]
            per = ", ".join(f"{x['device']} {x['keys_per_s'] / 1e6:.1f} M/s hit {x['hit_rate']:.3f}"
                            if x["hit_rate"] is not None else f"{x['device']} {x['keys_per_s'] / 1e6:.1f} M/s"
                            for x in p["per_device"])
            lines.append(f"  {phase:11s} aggregate {p['aggregate_keys_per_s'] / 1e6:.2f} M keys/s  ({per})")
    if r.get("scaling") is not None:
        lines.append(f"  scaling {r['scaling']:.2f}x over {r['ideal_scaling']} devices")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="multi_gpu_results.json")
    ap.add_argument("--gpus", default=None, help="CUDA ordinals, e.g. 0,1")
    ap.add_argument("--devices", default=None, help="device names, e.g. cpu or cuda:0,cuda:1")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="small tables and batches (a smoke run)")
    ap.add_argument("--tmp", default=os.environ.get("HPS_BENCH_TMP"), help="where the table files are written")
    args = ap.parse_args()
    devices = devices_from_args(args)
    results: dict[str, Any] = {"env": env_info(devices), "devices": [str(d) for d in devices], "quick": args.quick,
                               "command": " ".join(["python -m benchmarks.bench_multi_gpu", *sys.argv[1:]])}
    print(f"devices {results['devices']}; {json.dumps(results['env']['devices'])}", flush=True)
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                results[name] = BENCHES[name](devices, args.quick, tmp)
        except Exception:  # noqa: BLE001 - one failure must not lose the other numbers
            results[name] = {"error": traceback.format_exc()}
        results[name]["wall_s"] = time.perf_counter() - t0
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(_summary(name, results[name]), flush=True)
    failed = [n for n in args.only.split(",") if "error" in results[n] or not all(results[n]["rows_equal"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
