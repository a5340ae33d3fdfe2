"""Where a GPU lookup's wall time goes outside the kernels (issue 12's small-batch and P2 targets).

    python -m benchmarks.profile_host_path [--out host_path.json] [--quick]

For a resident table (gpucacheper 1.0, the find waits for its miss count) and a static one (nothing waited on), at
1,024 and 26,624 keys: the wall time of the native op until it returns, of the op plus a device sync, and of the
sync alone after it; the pipeline's own stage latencies; and a torch.profiler table of the CUDA API calls and
kernels. For P2 (2,000 keys, power law 1.2, 630,000 x 16, cache 90%, synchronous inserts): the same split when the
query is prebuilt, built by numpy just before (as in a server), or preceded by a busy wait of the same length that
touches no memory (separates an idle GPU from a cold CPU cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_gpu import _table, env_info, hps_json
from benchmarks.common import zipf_ranks


def _split(call, args, sync_after: bool = True) -> dict:
    """Per call: microseconds until call returns, and until a device sync after it returns."""
    ret, tot = [], []
    for a in args[:20]:
        call(a)
    torch.cuda.synchronize()
    for a in args:
        t0 = time.perf_counter()
        call(a)
        t1 = time.perf_counter()
        if sync_after:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        ret.append(t1 - t0)
        tot.append(t2 - t0)
    r, t = np.array(ret) * 1e6, np.array(tot) * 1e6
    return {"return_us_p50": float(np.median(r)), "total_us_p50": float(np.median(t)),
            "total_us_mean": float(t.mean()), "total_us_p99": float(np.percentile(t, 99))}


def _profile_table(call, args, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for a in args:
            call(a)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def small(quick: bool) -> dict:
    from hps_core.engine import HierarchicalParameterServer

    dev = torch.device("cuda")
    rows, dim = (200_000, 128)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, keys, _ = _table(tmp, rows, dim, seed=2)
        keys_d = torch.from_numpy(keys).to(dev)
        for deployment, static in (("gpucacheper_1.0", False), ("use_static_table", True)):
            hps = HierarchicalParameterServer(hps_json(tmp, path, dim, 26_624, static=static,
                                                       name=f"{deployment}.json"), progress=False)
            pipe = hps.pipeline("m", "t", dev)
            op = torch.ops.hps.lookup.default
            d: dict = {}
            for n in (1024, 26_624):
                qs = [keys_d[torch.randint(0, rows, (n,), device=dev)] for _ in range(200)]
                d[f"op_{n}"] = _split(lambda q: op(pipe.handle, q), qs)
                d[f"lookup_{n}"] = _split(lambda q: hps.lookup("m", "t", q), qs)
                d[f"op_no_sync_{n}"] = _split(lambda q: op(pipe.handle, q), qs, sync_after=False)
                d[f"profile_{n}"] = _profile_table(lambda q: op(pipe.handle, q), qs[:30])
            d["latency"] = hps.stats()["models"]["m"]["t"]["cuda:0"]["latency"]
            res[deployment] = d
            hps.close()
    # the sync alone on an idle device
    torch.cuda.synchronize()
    t = []
    for _ in range(200):
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    res["idle_sync_us_p50"] = float(np.median(t) * 1e6)
    return res


def p2(quick: bool) -> dict:
    from hps_core.engine import HierarchicalParameterServer

    rows, dim, n = 630_000, 16, 2000
    iters = 600 if not quick else 100
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, keys, _ = _table(tmp, rows, dim, seed=0)
        hps = HierarchicalParameterServer(hps_json(tmp, path, dim, n, gpucacheper=0.9, threshold=1.1),
                                          progress=False)
        rng = np.random.default_rng(7)
        order = rng.permutation(rows)

        def make_query():
            return torch.from_numpy(keys[order[zipf_ranks(rng, 1.2, n, rows)]]).cuda()

        t0 = time.perf_counter()
        for _ in range(50):
            make_query()
        gen_s = (time.perf_counter() - t0) / 50
        res["make_query_us"] = gen_s * 1e6
        for q in [make_query() for _ in range(300)]:
            hps.lookup("m", "t", q)
        for mode in ("prebuilt", "numpy_before", "busy_wait_before", "sleep_before"):
            prebuilt = [make_query() for _ in range(iters)]
            ret, tot = [], []
            for i in range(iters):
                if mode == "numpy_before":
                    q = make_query()
                else:
                    q = prebuilt[i]
                    if mode == "busy_wait_before":
                        end = time.perf_counter() + gen_s
                        while time.perf_counter() < end:
                            pass
                    elif mode == "sleep_before":
                        time.sleep(gen_s)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                hps.lookup("m", "t", q)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                ret.append(t1 - t0)
                tot.append(t2 - t0)
            r, t = np.array(ret) * 1e6, np.array(tot) * 1e6
            res[mode] = {"return_us_p50": float(np.median(r)), "total_us_mean": float(t.mean()),
                         "total_us_p50": float(np.median(t)), "total_us_p99": float(np.percentile(t, 99))}
        qs = [make_query() for _ in range(30)]
        res["profile_prebuilt"] = _profile_table(lambda q: hps.lookup("m", "t", q), qs)
        res["latency"] = hps.stats()["models"]["m"]["t"]["cuda:0"]["latency"]
        hps.close()
    return res


def big(quick: bool) -> dict:
    """3.4 M keys x 128, every key resident: the find kernel's own time (torch.profiler) and the call's wall and
    event times, for a resident table that waits for its miss count and a static one that does not."""
    from torch.profiler import ProfilerActivity, profile

    from hps_core.engine import HierarchicalParameterServer

    dev = torch.device("cuda")
    rows, dim, n = (1_000_000, 128, 3_407_872) if not quick else (100_000, 128, 340_000)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, keys, _ = _table(tmp, rows, dim, seed=3)
        keys_d = torch.from_numpy(keys).to(dev)
        qs = [keys_d[torch.randint(0, rows, (n,), device=dev)] for _ in range(4)]
        for deployment, static in (("gpucacheper_1.0", False), ("use_static_table", True)):
            hps = HierarchicalParameterServer(hps_json(tmp, path, dim, n, static=static, name=f"{deployment}.json"),
                                              progress=False)
            pipe = hps.pipeline("m", "t", dev)
            op = torch.ops.hps.lookup.default
            d: dict = {}
            for q in qs:
                op(pipe.handle, q)
            torch.cuda.synchronize()
            wall, ev = [], []
            for i in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                t0 = time.perf_counter()
                op(pipe.handle, qs[i % 4])
                t1 = time.perf_counter()
                e.record()
                e.synchronize()
                wall.append((t1 - t0) * 1e3)
                ev.append(s.elapsed_time(e))
            d["op_return_ms_p50"] = float(np.median(wall))
            d["event_ms_p50"] = float(np.median(ev))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(10):
                    op(pipe.handle, qs[i % 4])
                torch.cuda.synchronize()
            kern = [k for k in prof.key_averages() if "find_kernel" in k.key]
            d["find_kernel_cuda_ms_avg"] = (kern[0].device_time_total / kern[0].count / 1e3) if kern else None
            d["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                     max_name_column_width=50)
            res[deployment] = d
            hps.close()
            torch.cuda.empty_cache()
    return res


def p1trace(quick: bool, trace_path: str | None = None) -> dict:
    """P1's resident deployment as bench_p1 builds it (2 M x 128 from HPS files, gpucacheper 1.0, 3.4 M keys through
    hps.lookup, four query sets in turn, CUDA-event timing): per call, the host's view (op start -> return), the
    kernel's start and end (torch.profiler), and the event pair around the call."""
    from torch.profiler import ProfilerActivity, profile

    from hps_core.engine import HierarchicalParameterServer

    dev = torch.device("cuda")
    rows, dim, n = (2_000_000, 128, 3_407_872) if not quick else (200_000, 128, 340_000)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, keys, _ = _table(tmp, rows, dim)
        keys_d = torch.from_numpy(keys).to(dev)
        qs = [keys_d[torch.randint(0, rows, (n,), device=dev)] for _ in range(4)]
        for deployment, static in (("gpucacheper_1.0", False), ("use_static_table", True)):
            hps = HierarchicalParameterServer(hps_json(tmp, path, dim, n, static=static, name=f"{deployment}.json"),
                                              progress=False)
            for i in range(8):
                hps.lookup("m", "t", qs[i % 4])
            torch.cuda.synchronize()
            ev, host = [], []
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(20):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    t0 = time.perf_counter()
                    hps.lookup("m", "t", qs[i % 4])
                    host.append((time.perf_counter() - t0) * 1e3)
                    e.record()
                    e.synchronize()
                    ev.append(s.elapsed_time(e))
            if trace_path:
                prof.export_chrome_trace(f"{trace_path}.{deployment}.json")
            evs = prof.events()
            ops = sorted([x for x in evs if x.name == "hps::lookup"], key=lambda x: x.time_range.start)
            kerns = sorted([x for x in evs if "find_kernel" in x.name and x.device_type.name == "CUDA"],
                           key=lambda x: x.time_range.start)
            launches = sorted([x for x in evs if x.name == "cudaLaunchKernel"], key=lambda x: x.time_range.start)
            per = []
            for i, (o, k) in enumerate(zip(ops, kerns)):
                la = [x for x in launches if o.time_range.start <= x.time_range.start <= o.time_range.end]
                per.append({
                    "event_ms": round(ev[i], 4), "host_ms": round(host[i], 4),
                    "op_ms": round((o.time_range.end - o.time_range.start) / 1e3, 4),
                    "kernel_ms": round((k.time_range.end - k.time_range.start) / 1e3, 4),
                    "op_start_to_launch_us": round((la[0].time_range.start - o.time_range.start), 1) if la else None,
                    "launch_to_kernel_start_us": round((k.time_range.start - la[0].time_range.start), 1) if la else None,
                    "kernel_end_to_op_end_us": round((o.time_range.end - k.time_range.end), 1),
                })
            res[deployment] = per
            hps.close()
            torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="host_path.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="big,small,p2")
    ap.add_argument("--trace", default=None, help="p1trace: write chrome traces to TRACE.<deployment>.json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    res = {"env": env_info()}
    runs = {"big": lambda: big(args.quick), "small": lambda: small(args.quick), "p2": lambda: p2(args.quick),
            "p1trace": lambda: p1trace(args.quick, args.trace)}
    for part, run in runs.items():
        if part in parts:
            res[part] = run()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for part in parts:
        if part == "p1trace":
            for k, v in res[part].items():
                print(f"--- p1trace/{k}")
                for row in v:
                    print(row)
            continue
        for k, v in res[part].items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, str):
                        print(f"--- {part}/{k}/{kk}\n{vv}")
                    elif kk != "latency":
                        print(f"{part}/{k}/{kk}: {vv}")
            else:
                print(f"{part}/{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
