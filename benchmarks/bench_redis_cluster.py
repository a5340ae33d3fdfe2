"""Redis Cluster tier benchmark on a local 3-node cluster (started and stopped here, on free loopback ports).

Measures, in one run:
  1. tier fetch keys/s for dim 64 and 128 (~200k rows loaded, batches of 1,024 and 26,624 random existing keys)
     against redis-py's own cluster client doing the same job on the same data: `RedisCluster.pipeline()` with one
     HMGET per partition hash of HPS's layout (the tier's `partition_of`), replies decoded into float32 (n, dim)
     + found flags; both paths run on the same batches, interleaved batch by batch, and are checked to return the
     same rows (issue 19 item 5: does the tier's own RESP client earn its place);
  2. the same fetch with LFU metadata kept (overflow handling on: the cost of HPS's per-fetch meta update);
  3. lookup latency through the tier while one node is healthy / killed / restarted / hung (SIGSTOP);
  4. engine lookups (Redis tier above RocksDB) while a node is killed and restarted: errors surfaced to callers.

Run: `python -m benchmarks.bench_redis_cluster [--rows 200000] [--batches 1024 26624] [--iters N]`; writes
benchmarks/results/redis_cluster_cpu.md and .json (machine, versions, commit, date with the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import subprocess
import tempfile
import threading
import time

import numpy as np
import redis
import torch
from redis.cluster import ClusterNode, RedisCluster

import hps_core
from benchmarks.common import redis_fixture
from hps_core.tables import open_table, write_table
from hps_core.tiers.redis_cluster import RedisClusterTier, partition_of

ROOT = pathlib.Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines()
                  if line.startswith("Model name")), platform.processor())
    import hiredis

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis_server": run(["redis-server", "--version"]),
        "redis_py": redis.__version__,
        "hiredis": hiredis.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "commit": run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "dirty_tree": bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


def pct(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    if ms.size == 0:
        return {"count": 0}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"count": int(ms.size), "p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2),
            "max_ms": round(float(ms.max()), 2)}


def make_rows(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**50), 2**50, int(rows * 1.1)))[:rows]
    rng.shuffle(keys)
    return keys, rng.standard_normal((keys.size, dim)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ throughput


def bench_tier(tier, tag, batches, expected, warmup=3) -> dict:
    """Tier fetch alone (used for the LFU-meta run)."""
    for b in batches[:warmup]:
        tier.fetch(tag, torch.from_numpy(b))
    times = []
    for b in batches:
        t0 = time.perf_counter()
        tier.fetch(tag, torch.from_numpy(b))
        times.append(time.perf_counter() - t0)
    values, found = tier.fetch(tag, torch.from_numpy(batches[0]))
    assert found.all() and np.array_equal(values.numpy(), expected), "tier returned wrong rows"
    total = sum(len(b) for b in batches)
    return {"keys_per_s": round(total / sum(times)), **pct(times)}


class RedisPyHmget:
    """The same fetch done with redis-py's cluster client: HPS's layout, one HMGET per partition hash in a
    `RedisCluster.pipeline()` (redis-py groups the commands per node, writes every node then reads every node),
    replies decoded into float32 (n, dim) + found flags. Everything from int64 keys to the array is timed.

    Uses the tier's own `partition_of` and hash names (`hps_et{<tag>/p<p>}v`, field = 8 raw key bytes).
    """

    def __init__(self, rc: RedisCluster, tag: str, dim: int, num_partitions: int) -> None:
        self.rc, self.dim, self.num_partitions = rc, dim, num_partitions
        self.hkeys = [f"hps_et{{{tag}/p{p}}}v".encode() for p in range(num_partitions)]

    def fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = keys.size
        parts = partition_of(keys, self.num_partitions)
        order = np.argsort(parts, kind="stable")
        ends = np.cumsum(np.bincount(parts, minlength=self.num_partitions)).tolist()
        fields = np.ascontiguousarray(keys[order], dtype="<i8").view("V8").tolist()  # 8-byte bytes objects
        pipe = self.rc.pipeline()
        ranges = []
        lo = 0
        for p, hi in enumerate(ends):
            if hi > lo:
                pipe.hmget(self.hkeys[p], fields[lo:hi])
                ranges.append((lo, hi))
            lo = hi
        replies = pipe.execute()
        out = np.zeros((n, self.dim), np.float32)
        found = np.zeros(n, np.bool_)
        for (lo, hi), reply in zip(ranges, replies):
            idx = order[lo:hi]
            if None in reply:  # the all-hit case skips the mask (as the tier does)
                idx = idx[np.fromiter((v is not None for v in reply), np.bool_, hi - lo)]
            data = b"".join(filter(None, reply))
            out[idx] = np.frombuffer(data, np.float32).reshape(-1, self.dim)
            found[idx] = True
        return out, found


def bench_interleaved(tier, base: RedisPyHmget, tag, batches, warmup=3) -> dict:
    """Tier fetch and the redis-py baseline on the same batches, batch by batch (who goes first alternates)."""
    for b in batches[:warmup]:
        tier.fetch(tag, torch.from_numpy(b))
        base.fetch(b)
    times: dict[str, list[float]] = {"tier": [], "redis_py": []}
    cpu: dict[str, list[float]] = {"tier": [], "redis_py": []}  # client CPU (this process), not the servers'
    for i, b in enumerate(batches):
        steps = [("tier", lambda: tier.fetch(tag, torch.from_numpy(b))), ("redis_py", lambda: base.fetch(b))]
        for name, fn in steps if i % 2 == 0 else steps[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name, t in times.items():
        p = pct(t)
        out[name] = {"keys_per_s_median": round(len(batches[0]) / (p["p50_ms"] / 1e3)),
                     "keys_per_s_p99": round(len(batches[0]) / (p["p99_ms"] / 1e3)),
                     "keys_per_s_mean": round(sum(len(b) for b in batches) / sum(t)), **p,
                     "client_cpu_ms_median": round(float(np.median(cpu[name])) * 1e3, 2)}
    return out


def check_same_rows(tier, base: RedisPyHmget, tag, keys, vectors, batch, rng) -> None:
    """Both paths return the same rows and found flags, the table's rows, on a batch with ~10% absent keys."""
    idx = rng.integers(0, keys.size, batch)
    probe = keys[idx].copy()
    absent = rng.random(batch) < 0.1
    probe[absent] = rng.integers(2**55, 2**60, int(absent.sum()))  # outside make_rows' key range
    t_vals, t_found = tier.fetch(tag, torch.from_numpy(probe))
    b_vals, b_found = base.fetch(probe)
    assert np.array_equal(t_found.numpy(), b_found) and np.array_equal(b_found, ~absent), "found flags differ"
    assert np.array_equal(t_vals.numpy(), b_vals), "tier and redis-py rows differ"
    assert np.array_equal(b_vals[~absent], vectors[idx[~absent]]) and not b_vals[absent].any(), "wrong rows"


# ------------------------------------------------------------------------------------------------ faults


def fault_phases(cluster, tier, tag, keys, batch, victim, phase_s) -> dict:
    """Fetch latency through the tier: healthy, node killed, node restarted (until hits are back), node hung."""
    rng = np.random.default_rng(11)
    out = {}
    exceptions = 0

    def run(seconds, stop_when_all_found=False):
        nonlocal exceptions
        times, found_frac = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            b = torch.from_numpy(keys[rng.integers(0, keys.size, batch)])
            t0 = time.perf_counter()
            try:
                _, found = tier.fetch(tag, b)
            except Exception:
                exceptions += 1
                continue
            times.append(time.perf_counter() - t0)
            found_frac.append(float(found.float().mean()))
            if stop_when_all_found and found_frac[-1] == 1.0:
                break
        return times, found_frac

    stats0 = tier.stats()[tag]
    t, f = run(phase_s)
    out["healthy"] = {**pct(t), "found_fraction": round(float(np.mean(f)), 4)}
    cluster.save(victim)  # the node keeps its rows when it comes back
    cluster.kill(victim)
    t, f = run(phase_s)
    s = tier.stats()[tag]
    out["node_killed"] = {**pct(t), "found_fraction": round(float(np.mean(f)), 4),
                          "keys_counted_as_errors": s.errors - stats0.errors,
                          "failed_node_requests": s.failed_requests - stats0.failed_requests}
    t0 = time.monotonic()
    cluster.restart(victim, wait=False)
    times, fr = run(60.0, stop_when_all_found=True)
    out["node_restarted"] = {"seconds_until_all_keys_hit_again": round(time.monotonic() - t0, 2),
                             "batches_until_then": len(times)}
    cluster.wait_cluster_ok()
    t, f = run(phase_s)
    out["after_recovery"] = {**pct(t), "found_fraction": round(float(np.mean(f)), 4)}
    stats1 = tier.stats()[tag]
    cluster.pause(victim)
    try:
        t, f = run(phase_s)
    finally:
        cluster.resume(victim)
    s = tier.stats()[tag]
    out["node_hung_sigstop"] = {**pct(t), "found_fraction": round(float(np.mean(f)), 4),
                                "failed_node_requests": s.failed_requests - stats1.failed_requests,
                                "keys_skipped": s.keys_skipped - stats1.keys_skipped}
    cluster.wait_cluster_ok()
    out["exceptions_raised_to_caller"] = exceptions
    return out


def engine_fault_run(cluster, workdir, keys, vectors, victim, batch, phase_s, user, password) -> dict:
    """Engine lookups (Redis tier above RocksDB, no host tier) while a node is killed then restarted."""
    from hps_core.engine import HierarchicalParameterServer

    dim = vectors.shape[1]
    write_table(workdir / "engine_t0", keys, vectors)
    cfg = {
        "key_dtype": "int64",
        "models": {"m": {"tables": [{"name": "t0", "path": str(workdir / "engine_t0"), "dim": dim,
                                     "max_keys_per_sample": 26, "default_value": 0.0}],
                         "max_batch_size": max(1, batch // 26) + 1, "deployed_device_list": [0],
                         "cache": {"ratio": 0.05, "hit_rate_threshold": 1.1}}},
        "tiers": {"host_memory": {"enabled": False},
                  "redis_cluster": {"enabled": True, "address": cluster.addresses, "user_name": user,
                                    "password": password, "num_partitions": 8, "num_node_connections": 2},
                  "rocksdb": {"enabled": True, "path": str(workdir / "engine_rocksdb")}},
    }
    rng = np.random.default_rng(5)
    result = {"lookups": 0, "exceptions_raised_to_caller": 0, "wrong_rows": 0}
    lat: dict[str, list[float]] = {"healthy": [], "node_saving": [], "node_killed": [], "node_restarted": []}
    phase = ["healthy"]
    stop = threading.Event()
    t_load = time.perf_counter()
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        result["start_and_load_s"] = round(time.perf_counter() - t_load, 2)

        def loop():
            while not stop.is_set():
                idx = rng.integers(0, keys.size, batch)
                t0 = time.perf_counter()
                try:
                    out = hps.lookup("m", "t0", torch.from_numpy(keys[idx])).numpy()
                except Exception:
                    result["exceptions_raised_to_caller"] += 1
                    continue
                lat[phase[0]].append(time.perf_counter() - t0)
                result["wrong_rows"] += int((~np.all(out == vectors[idx], axis=1)).sum())
                result["lookups"] += 1

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        time.sleep(phase_s)
        phase[0] = "node_saving"  # BGSAVE (fork) so the node keeps its rows: not part of the healthy numbers
        cluster.save(victim)
        phase[0] = "node_killed"
        cluster.kill(victim)
        time.sleep(phase_s)
        phase[0] = "node_restarted"
        cluster.restart(victim)
        time.sleep(phase_s)
        stop.set()
        th.join()
        st = hps.stats()
        tag = "hps_et.m.t0"
        result["redis_tier_errors"] = st["tiers"]["redis_cluster"][tag]["errors"]
        result["tier_hits"] = st["models"]["m"]["t0"]["cpu"]["tier_hits"]
        result["defaults_served"] = st["models"]["m"]["t0"]["cpu"]["defaults_served"]
    result["latency"] = {k: pct(v) for k, v in lat.items()}
    return result


# ------------------------------------------------------------------------------------------------ report


def write_report(out_dir: pathlib.Path, data: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "redis_cluster_cpu.json").write_text(json.dumps(data, indent=2) + "\n")
    m = data["machine"]
    lines = [
        "# Redis Cluster tier — CPU benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; {m['redis_server']}; "
        f"redis-py {m['redis_py']}, hiredis {m['hiredis']}; numpy {m['numpy']}, torch {m['torch']}.",
        f"Commit {m['commit']}{' (+ uncommitted changes)' if m['dirty_tree'] else ''}, {m['date']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
        "(the machine is shared: expect ±20%).",
        f"Cluster: 3 masters, 0 replicas, on loopback, started by the benchmark. Rows {data['params']['rows']:,} "
        f"per table, num_partitions {data['params']['num_partitions']}, batches of random existing keys (the "
        f"batch counts are in the table; 3 warm-up batches each); LFU / fault / engine runs use batches of "
        f"{data['params']['batch']:,}.",
        "",
        "## Fetch: tier vs redis-py cluster pipeline (same layout, same batches, interleaved)",
        "",
        "keys/s at the median batch time (p50) and at the p99 batch time; higher is better. Both paths start from "
        "int64 keys and end with float32 (n, dim) rows + found flags.",
        "",
        "| dim | batch | batches | tier keys/s p50 | redis-py keys/s p50 | tier / redis-py | "
        "tier p50 / p99 ms | redis-py p50 / p99 ms | tier keys/s at p99 | redis-py keys/s at p99 | "
        "client CPU ms/batch tier / redis-py |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dim, r in data["throughput"].items():
        for batch, rb in r["batches"].items():
            t, b = rb["tier"], rb["redis_py_pipeline_hmget"]
            lines.append(
                f"| {dim} | {int(batch):,} | {t['count']} | {t['keys_per_s_median']:,} | "
                f"{b['keys_per_s_median']:,} | {t['keys_per_s_median'] / b['keys_per_s_median']:.2f}x | "
                f"{t['p50_ms']} / {t['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} | {t['keys_per_s_p99']:,} | "
                f"{b['keys_per_s_p99']:,} | {t['client_cpu_ms_median']} / {b['client_cpu_ms_median']} |")
    pairs = [(rb["tier"], rb["redis_py_pipeline_hmget"]) for r in data["throughput"].values()
             for rb in r["batches"].values()]
    speed = [t["keys_per_s_median"] / b["keys_per_s_median"] for t, b in pairs]
    cpu = [b["client_cpu_ms_median"] / t["client_cpu_ms_median"] for t, b in pairs]
    p99_better = sum(t["p99_ms"] < b["p99_ms"] for t, b in pairs)
    lines += ["", f"Tier / redis-py keys/s at the median: {min(speed):.2f}x to {max(speed):.2f}x; redis-py needs "
                  f"{min(cpu):.2f}x to {max(cpu):.2f}x the tier's client CPU per batch; tier p99 lower at "
                  f"{p99_better} of {len(pairs)} points (p99 is noisy on this shared machine: rerun before "
                  "reading much into it)."]
    lines += ["", "Tier load (bulk HSET pipelines): " + ", ".join(
        f"dim {dim} {r['tier_load_rows_per_s']:,} rows/s" for dim, r in data["throughput"].items()) + "."]
    if "tier_lfu_meta" in data:
        r = data["tier_lfu_meta"]
        lines += ["", f"With LFU metadata kept (overflow_margin set, evict_least_used, as conf/tiers/"
                      f"host_redis_rocksdb.yaml), dim {r['dim']}: {r['keys_per_s']:,} keys/s "
                      f"(p50 {r['p50_ms']} ms): the per-fetch meta write HPS does is a second round trip."]
    if "faults" in data:
        f = data["faults"]
        lines += [
            "",
            f"## Fetch latency through the tier with one node down (dim {data['params']['fault_dim']}, batch "
            f"{data['params']['batch']:,}, timeout_ms {data['params']['timeout_ms']})",
            "",
            "| phase | batches | p50 ms | p99 ms | max ms | keys found |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for phase in ("healthy", "node_killed", "after_recovery", "node_hung_sigstop"):
            p = f[phase]
            lines.append(f"| {phase} | {p['count']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} | "
                         f"{p['found_fraction']:.1%} |")
        lines += [
            "",
            f"Node killed: {f['node_killed']['keys_counted_as_errors']:,} keys reported missing and counted "
            f"(`stats().errors`), {f['node_killed']['failed_node_requests']} failed node requests. Restarted node "
            f"(with its RDB): all keys hit again {f['node_restarted']['seconds_until_all_keys_hit_again']} s after "
            f"the restart command (includes the redis-server start). Hung node (SIGSTOP): "
            f"{f['node_hung_sigstop']['failed_node_requests']} timed-out requests, "
            f"{f['node_hung_sigstop']['keys_skipped']:,} keys not even sent (node backing off). Exceptions raised to "
            f"the caller: {f['exceptions_raised_to_caller']}.",
        ]
    if "engine" in data:
        e = data["engine"]
        lines += [
            "",
            "## Engine lookups (Redis tier above RocksDB) while a node is killed and restarted",
            "",
            f"{e['lookups']} lookups of {data['params']['batch']:,} keys: **{e['exceptions_raised_to_caller']} "
            f"errors raised to callers, {e['wrong_rows']} wrong rows**; Redis tier errors counted "
            f"{e['redis_tier_errors']:,}; tier hits {e['tier_hits']}; defaults served {e['defaults_served']}.",
            "",
            "| phase | lookups | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for phase, p in e["latency"].items():
            if p.get("count"):
                lines.append(f"| {phase} | {p['count']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} |")
    lines += [
        "",
        "## Notes",
        "",
        "- Tier fetch: keys hashed to partitions (hash per partition, hash tag `{<tag>/p<n>}`), one HMGET per "
        "(partition, <= max_batch_size keys); every node's commands are sent before any reply is read, so the "
        "three servers work at the same time; RESP commands are built with numpy and replies parsed by hiredis, "
        "one `bytes.join` + `np.frombuffer` per command.",
        "- redis-py baseline: `redis.cluster.RedisCluster` (hiredis parser and packer; RESP2 and 1 MiB socket "
        "reads, as the tier's connections) on the same hashes: the tier's `partition_of`, a stable sort by "
        "partition, the 8-byte fields as bytes, one `pipe.hmget` per partition in one `rc.pipeline()` (redis-py "
        "sends every node's commands before reading any), then per reply a found mask, one `bytes.join` + "
        "`np.frombuffer` and a scatter into the float32 (n, dim) output. Its rows and found flags are checked "
        "equal to the tier's (batch with ~10% absent keys) before timing. The two paths alternate batch by batch "
        "(which one goes first alternates too), after 3 warm-up batches each. (This replaces the earlier "
        "`mget_nonatomic` baseline, which used another layout: one string key per row.)",
        "- The three redis-server processes and the client share the 2 cores; other work on the machine during "
        "the run shows in the load average above.",
        "- Fault phases use the tier alone (keys of the dead node reported missing, counted); the engine run shows "
        "those keys served by RocksDB instead. The victim node is persisted with BGSAVE before it is killed.",
        "",
    ]
    (out_dir / "redis_cluster_cpu.md").write_text("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1_024, 26_624], help="throughput batch sizes")
    ap.add_argument("--batch", type=int, default=26_624, help="batch of the LFU, fault and engine runs")
    ap.add_argument("--iters", type=int, default=0,
                    help="timed batches per throughput point (0: 400 of 1,024 keys, 75 of 26,624, ...)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--num-partitions", type=int, default=8)
    ap.add_argument("--timeout-ms", type=int, default=500)
    ap.add_argument("--phase-seconds", type=float, default=4.0)
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--only-throughput", action="store_true", help="skip the LFU, fault and engine runs")
    ap.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fx = redis_fixture()
    user, password = "hps_bench", "bench-" + os.urandom(6).hex()
    data: dict = {"machine": machine_info(), "params": {
        "rows": args.rows, "batch": args.batch, "batches": args.batches, "iters": args.iters,
        "num_partitions": args.num_partitions,
        "timeout_ms": args.timeout_ms, "fault_dim": max(args.dims)}, "throughput": {}}
    with tempfile.TemporaryDirectory(prefix="hps_redis_bench_") as tmp:
        tmp = pathlib.Path(tmp)
        with fx.LocalRedisCluster(tmp / "cluster") as cluster:
            cluster.acl_setuser(user, password)
            tier = RedisClusterTier(cluster.addresses, user_name=user, password=password,
                                    num_partitions=args.num_partitions, num_node_connections=4,
                                    timeout_ms=args.timeout_ms)
            host, port = cluster.addresses[0].split(":")
            rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))], username=user, password=password,
                              protocol=2, socket_read_size=1 << 20)  # the tier's RESP version and read size
            try:
                for dim in args.dims:
                    keys, vectors = make_rows(args.rows, dim, seed=dim)
                    files = write_table(tmp / f"t{dim}", keys, vectors)
                    tag = f"hps_et.bench.t{dim}"
                    tier.create_table(tag, dim)
                    t0 = time.perf_counter()
                    tier.load(tag, open_table(files.path, dim), progress=True)
                    load_rate = round(keys.size / (time.perf_counter() - t0))
                    base = RedisPyHmget(rc, tag, dim, args.num_partitions)
                    rng = np.random.default_rng(dim + 1)
                    entry = data["throughput"][str(dim)] = {"tier_load_rows_per_s": load_rate, "batches": {}}
                    for batch in args.batches:
                        check_same_rows(tier, base, tag, keys, vectors, batch, rng)
                        iters = args.iters or max(40, min(400, 2_000_000 // batch))
                        batches = [keys[rng.integers(0, keys.size, batch)] for _ in range(iters)]
                        r = bench_interleaved(tier, base, tag, batches)
                        entry["batches"][str(batch)] = {"tier": r["tier"], "redis_py_pipeline_hmget": r["redis_py"]}
                        print(f"dim {dim} batch {batch}: tier {r['tier']['keys_per_s_median']:,} keys/s "
                              f"(p99 {r['tier']['p99_ms']} ms), redis-py {r['redis_py']['keys_per_s_median']:,} "
                              f"keys/s (p99 {r['redis_py']['p99_ms']} ms)", flush=True)
                rc.close()
                if not args.only_throughput:
                    dim = max(args.dims)
                    tag = f"hps_et.bench.t{dim}"
                    lfu = RedisClusterTier(cluster.addresses, user_name=user, password=password,
                                           num_partitions=args.num_partitions, num_node_connections=4,
                                           overflow_margin=10_000_000, overflow_policy="evict_least_used")
                    lfu.create_table(tag, dim)
                    rng = np.random.default_rng(3)
                    keys, vectors = make_rows(args.rows, dim, seed=dim)
                    idx = [rng.integers(0, keys.size, args.batch) for _ in range(args.iters or 30)]
                    data["tier_lfu_meta"] = {"dim": dim, **bench_tier(lfu, tag, [keys[i] for i in idx],
                                                                      vectors[idx[0]])}
                    lfu.close()
                    data["faults"] = fault_phases(cluster, tier, tag, keys, args.batch, victim=1,
                                                  phase_s=args.phase_seconds)
                    print("faults:", json.dumps(data["faults"]), flush=True)
                    tier.close()
                    if not args.no_engine:
                        cluster.flushall()
                        ekeys, evecs = make_rows(args.rows, 64, seed=99)
                        data["engine"] = engine_fault_run(cluster, tmp, ekeys, evecs, victim=2, batch=args.batch,
                                                          phase_s=args.phase_seconds, user=user, password=password)
                        print("engine:", json.dumps(data["engine"]), flush=True)
            finally:
                tier.close()
    data["machine"]["hps_core_version"] = getattr(hps_core, "__version__", "")
    write_report(args.out_dir, data)
    print(f"wrote {args.out_dir / 'redis_cluster_cpu.md'}")
    return data


if __name__ == "__main__":
    main()
