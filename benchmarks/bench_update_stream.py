"""Streamed updates into a serving deployment (issue 18): rows per second from a Redis stream through update()
while a thread keeps looking up, and that thread's lookup latency idle vs during the updates.

    python -m benchmarks.bench_update_stream [--rows 200000] [--updates 400000] [--dim 128] [--out ...]

A local `redis-server` (started here), a table of `--rows` x dim in the host-memory tier with a 20% cache, an
update_source of type redis_stream. A publisher process (the trainer) pushes `--updates` rows (existing keys, new
values) in messages of 8,192 rows (its publish time reported apart); the figure is rows applied / seconds from the first publish to the
last row applied. Lookups: 1,024 keys per call, back to back, on one thread; p50 / p99 while idle (3 s before)
and while the updates are applied.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, redis_fixture
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--updates", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/update_stream_cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keys = rng.choice(np.int64(1) << 40, args.rows, replace=False)
    vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp, redis_fixture().local_redis_server(tmp) as port:
        write_table(Path(tmp) / "t", keys, vectors)
        cfg = {"key_dtype": "int64",
               "models": {"m": {"tables": [{"name": "t", "path": str(Path(tmp) / "t"), "dim": args.dim,
                                            "max_keys_per_sample": 1024}],
                                "max_batch_size": 1, "deployed_device_list": [0],
                                "cache": {"ratio": 0.2, "hit_rate_threshold": 1.1}}},
               "tiers": {"host_memory": {"enabled": True}},
               "update_source": {"type": "redis_stream", "brokers": f"127.0.0.1:{port}", "group": "bench",
                                 "poll_timeout_ms": 20}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            hps = HierarchicalParameterServer(cfg, progress=False)
        lat: list[tuple[float, float]] = []  # (start time, seconds)
        stop = threading.Event()

        def reader() -> None:
            r = np.random.default_rng(1)
            while not stop.is_set():
                q = torch.from_numpy(keys[r.integers(0, args.rows, 1024)])
                t0 = time.perf_counter()
                hps.lookup("m", "t", q)
                lat.append((t0, time.perf_counter() - t0))

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(3.0)
        idle_end = time.perf_counter()
        upd_keys = keys[rng.integers(0, args.rows, args.updates)]
        upd_rows = rng.standard_normal((args.updates, args.dim)).astype(np.float32)
        np.save(Path(tmp) / "k.npy", upd_keys)
        np.save(Path(tmp) / "r.npy", upd_rows)
        # The trainer is another process (as in production): publishing here would share this process's GIL
        # with the lookup thread being measured.
        # It prints the wall-clock time of its first publish and how long publishing took.
        code = ("import sys, time, numpy as np, redis; from hps_core.update_stream import publish; "
                "k, r = np.load(sys.argv[1]), np.load(sys.argv[2]); c = redis.Redis(port=int(sys.argv[3])); "
                "start = time.time(); t = time.perf_counter(); "
                "publish(c, 'hps_updates', 'm', 't', k, r, chunk_rows=8192); "
                "print(start, time.perf_counter() - t)")
        pub = subprocess.Popen([sys.executable, "-c", code, str(Path(tmp) / "k.npy"), str(Path(tmp) / "r.npy"),
                                str(port)], stdout=subprocess.PIPE, text=True)
        while hps.stats()["update_source"]["applied_rows"] < args.updates:
            time.sleep(0.002)
        end_wall, t1 = time.time(), time.perf_counter()
        out_line = pub.communicate(timeout=60)[0].strip().splitlines()[-1].split()
        start_wall, published = float(out_line[0]), float(out_line[1])
        applied = end_wall - start_wall
        t0 = t1 - applied  # the publisher's first message, on this process's perf_counter clock
        stop.set()
        t.join()
        stats = hps.stats()["update_source"]
        hps.close()
    idle = np.array([d for s, d in lat if s < idle_end]) * 1e3
    during = np.array([d for s, d in lat if t0 <= s < t1]) * 1e3
    res = {**info, "rows": args.rows, "dim": args.dim, "updates": args.updates, "publish_s": published,
           "applied_s": applied, "rows_per_s": args.updates / applied, "stream_stats": stats,
           "lookup_idle_ms": {"n": int(idle.size), "p50": float(np.percentile(idle, 50)),
                              "p99": float(np.percentile(idle, 99))},
           "lookup_during_ms": {"n": int(during.size), "p50": float(np.percentile(during, 50)),
                                "p99": float(np.percentile(during, 99))}}
    res["p99_during_vs_idle"] = res["lookup_during_ms"]["p99"] / res["lookup_idle_ms"]["p99"]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    md = [f"# Streamed updates (Redis stream -> update()) while lookups run ({res['cpu']}, torch {res['torch']}, "
          f"commit {res['commit']}, {res['date']})", "",
          f"Table {args.rows:,} x {args.dim} fp32, host-memory tier + 20% cache; {args.updates:,} updated rows in "
          f"messages of 8,192; one lookup thread, 1,024 keys per call.", "",
          "| what | value |", "|---|---:|",
          f"| rows applied per second (the publisher's first message -> last row applied) | {res['rows_per_s']:,.0f} |",
          f"| publish time alone (s) | {published:.2f} |",
          f"| lookup p50 / p99 idle (ms) | {res['lookup_idle_ms']['p50']:.3f} / {res['lookup_idle_ms']['p99']:.3f} |",
          f"| lookup p50 / p99 during updates (ms) | {res['lookup_during_ms']['p50']:.3f} / "
          f"{res['lookup_during_ms']['p99']:.3f} |",
          f"| p99 during / idle | {res['p99_during_vs_idle']:.2f} |"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
