"""CPU benchmark of the TF plugin's lookup against native TensorFlow, measured in the same process.

    python -m benchmarks.bench_tf_plugin [--rows 200000] [--dims 16,128] [--batch 1024] [--slots 26]
        [--rounds 15] [--calls 5] [--out benchmarks/results/tf_plugin_cpu]

One batch = batch x slots int64 keys (default 1024 x 26 = 26,624), drawn at random from the table's keys, which
are arbitrary 62-bit ids (as a recommender's hashed features are). Paths timed, eager and under tf.function:

- native_embedding_lookup: `tf.nn.embedding_lookup` on a tf.Variable holding the whole table, fed row *positions*
  (what native TF does when keys are already 0..N-1: the floor of what a lookup can cost);
- native_hash_table: `tf.lookup.StaticHashTable` (key -> row) + `tf.gather` on the same Variable (what native TF
  needs for arbitrary int64 keys; unknown keys -> an extra default row);
- native_keras_embedding: `keras.layers.Embedding` holding the table, fed positions (a Keras layer call, like ours);
- hps_layer: `hps.LookupLayer` (Keras layer call: HpsLookup op -> DLPack -> engine -> DLPack);
- hps_lookup: `hps.lookup`, the raw op without the Keras layer;
- engine (eager only): `HierarchicalParameterServer.lookup` on a torch tensor, no TF at all (the plugin's floor).

The HPS table lives in the host-memory tier. Two deployments are measured: `cache` (the per-device cache on, sized
for the whole table, warmed: the steady state) and `tier` (cache off: every key goes to the host-memory tier).
Each path runs `--calls` back-to-back calls per round; rounds rotate through the paths so that load changes on a
shared machine hit all paths alike; the figure is the median per-call time over rounds. Results: a markdown table
(stdout and <out>.md) and the raw numbers (<out>.json), with machine, versions, commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import torch

import interop.tf_plugin as hps
from interop.tf_op import serve
from hps_core import engine as hps_engine
from hps_core.tables import write_table

MODEL = "bench"


def machine_info() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    lscpu = {}
    for line in run(["lscpu"]).splitlines():
        key, _, value = line.partition(":")
        lscpu[key.strip()] = value.strip()
    commit = run(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(run(["git", "status", "--porcelain"]))
    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "threads_per_core": lscpu.get("Thread(s) per core"),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "commit": commit,
        "dirty_tree": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
    }


def write_config(root: Path, paths: list[Path], dims: list[int], batch: int, slots: int, cache: bool) -> Path:
    config = {
        "supportlonglong": True,
        "models": [{
            "model": MODEL,
            "sparse_files": [str(p) for p in paths],
            "embedding_vecsize_per_table": dims,
            "maxnum_catfeature_query_per_table_per_sample": [slots] * len(dims),
            "default_value_for_each_table": [0.0] * len(dims),
            "deployed_device_list": [0],
            "max_batch_size": batch,
            "gpucache": cache,
            "gpucacheper": 1.0,
            "hit_rate_threshold": 1.0,  # synchronous inserts: every lookup returns the stored rows
        }],
    }
    path = root / f"hps_{'cache' if cache else 'tier'}.json"
    path.write_text(json.dumps(config))
    return path


def rotate_timings(paths: dict, rounds: int, calls: int) -> dict:
    """Median per-call seconds of each path, rounds interleaved across paths."""
    for fn in paths.values():  # warm-up (traces tf.functions, fills caches)
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = paths[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
            cpu[name].append((time.process_time() - c0) / calls)
    # Wall time is the figure; process CPU time (all threads) is kept too: on a loaded machine it shows how much
    # of the wall time was waiting for a core.
    return {name: {"median_ms": statistics.median(s) * 1e3, "min_ms": min(s) * 1e3,
                   "p90_ms": float(np.percentile(s, 90)) * 1e3, "cpu_median_ms": statistics.median(cpu[name]) * 1e3}
            for name, s in samples.items()}


def bench_dim(table_index: int, dim: int, keys: np.ndarray, vectors: np.ndarray, args, rng) -> dict:
    n_keys = args.batch * args.slots
    pos = rng.integers(0, keys.size, (args.batch, args.slots))
    positions = tf.constant(pos, tf.int64)
    batch_keys = tf.constant(keys[pos], tf.int64)
    torch_keys = torch.from_numpy(keys[pos].copy())

    params = tf.Variable(np.vstack([vectors, np.zeros((1, dim), np.float32)]))  # + the default row
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys), tf.range(keys.size, dtype=tf.int64)),
        default_value=keys.size)
    layer = hps.LookupLayer(MODEL, table_index, dim, tf.float32)
    keras_embedding = keras.layers.Embedding(keys.size + 1, dim)
    keras_embedding.build((None,))
    keras_embedding.embeddings.assign(params)
    server = hps_engine.default_server()

    # Correctness first: every path returns the same rows.
    ref = tf.nn.embedding_lookup(params, positions).numpy()
    for got in (tf.gather(params, table.lookup(batch_keys)).numpy(), layer(batch_keys).numpy(),
                keras_embedding(positions).numpy(),
                server.lookup(MODEL, table_index, torch_keys).numpy()):
        np.testing.assert_array_equal(got, ref)

    f_native = tf.function(lambda p: tf.nn.embedding_lookup(params, p))
    f_hash = tf.function(lambda k: tf.gather(params, table.lookup(k)))
    f_layer = tf.function(lambda k: layer(k))
    f_keras = tf.function(lambda p: keras_embedding(p))
    f_raw = tf.function(lambda k: hps.lookup(k, MODEL, table_index, dim))
    f_layer_cb = tf.function(lambda k: layer(k))  # its own kernel: traced and run with the native route off

    def callback(fn):  # the same call through the Python callback (the native route off for it)
        def run():
            serve.set_native(False)
            try:
                return fn()
            finally:
                serve.set_native(True)
        return run

    paths = {
        "eager/native_embedding_lookup": lambda: tf.nn.embedding_lookup(params, positions),
        "eager/native_hash_table": lambda: tf.gather(params, table.lookup(batch_keys)),
        "eager/native_keras_embedding": lambda: keras_embedding(positions),
        "eager/hps_layer": lambda: layer(batch_keys),
        "eager/hps_lookup": lambda: hps.lookup(batch_keys, MODEL, table_index, dim),
        "eager/hps_layer_callback": callback(lambda: layer(batch_keys)),
        "eager/engine_torch": lambda: server.lookup(MODEL, table_index, torch_keys),
        "tf.function/native_embedding_lookup": lambda: f_native(positions),
        "tf.function/native_hash_table": lambda: f_hash(batch_keys),
        "tf.function/native_keras_embedding": lambda: f_keras(positions),
        "tf.function/hps_layer": lambda: f_layer(batch_keys),
        "tf.function/hps_lookup": lambda: f_raw(batch_keys),
        "tf.function/hps_layer_callback": callback(lambda: f_layer_cb(batch_keys)),
    }
    timings = rotate_timings(paths, args.rounds, args.calls)
    for t in timings.values():
        t["mkeys_per_s"] = n_keys / (t["median_ms"] / 1e3) / 1e6
    return timings


def run_deployment(name: str, config: Path, tables: list, args) -> dict:
    hps.shutdown()
    t0 = time.perf_counter()
    hps.Init(global_batch_size=args.batch, ps_config_file=str(config))
    load_s = time.perf_counter() - t0
    out = {"init_and_load_s": round(load_s, 2), "dims": {}}
    rng = np.random.default_rng(7)
    for i, (dim, keys, vectors) in enumerate(tables):
        out["dims"][str(dim)] = bench_dim(i, dim, keys, vectors, args, rng)
    hps.shutdown()
    return out


def to_markdown(result: dict) -> str:
    m, p = result["machine"], result["params"]
    lines = [
        "# TF plugin lookup — CPU benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs; Python {m['python']}; TensorFlow {m['tensorflow']}, Keras "
        f"{m['keras']}, torch {m['torch']}, numpy {m['numpy']}.",
        f"Commit {m['commit']}{' (+ uncommitted changes)' if m['dirty_tree'] else ''}, {m['date']}; load average at "
        f"start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} (shared machine: expect ±20%).",
        f"Table rows {p['rows']:,} per dim, int64 keys (random 62-bit ids), batch {p['batch']} x {p['slots']} = "
        f"{p['batch'] * p['slots']:,} keys per lookup; median per-call time of {p['rounds']} rounds x "
        f"{p['calls']} calls, paths interleaved. Ratio = time / native embedding_lookup time in the same mode.",
        "",
    ]
    for dep_name, dep in result["deployments"].items():
        what = ("cache on (sized for the whole table, warm), host-memory tier below" if dep_name == "cache"
                else "cache off: every key from the host-memory tier")
        lines += [f"## Deployment `{dep_name}`: {what} (Init + load {dep['init_and_load_s']} s)", "",
                  "| dim | mode | path | ms / batch | M keys/s | vs native embedding_lookup | CPU ms / batch |",
                  "|---:|---|---|---:|---:|---:|---:|"]
        for dim, timings in dep["dims"].items():
            for key, t in timings.items():
                mode, path = key.split("/")
                base = timings[f"{mode}/native_embedding_lookup"]["median_ms"]
                lines.append(f"| {dim} | {mode} | {path} | {t['median_ms']:.3f} | {t['mkeys_per_s']:.1f} | "
                             f"{t['median_ms'] / base:.2f}x | {t['cpu_median_ms']:.3f} |")
        lines.append("")
    lines += ["## Targets (issue 15; ratio = time / `tf.nn.embedding_lookup` time in the same mode)", "",
              "Constant cost = eager `hps.lookup` (or `LookupLayer`) minus the torch engine alone on the same keys "
              "(target <= 0.1 ms); `hps.lookup` and `LookupLayer` <= 1.2x `tf.nn.embedding_lookup` and faster than "
              "StaticHashTable + gather, eager and in tf.function. `_callback` rows: the same layer through the Python "
              "callback (the native route off), for comparison.", "",
              "| deployment | dim | constant cost lookup / layer (ms) | lookup eager / tf.function | "
              "layer eager / tf.function | layer via callback eager / tf.function | faster than hash + gather | "
              "all met |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for dep_name, dep in result["deployments"].items():
        for dim, t in dep["dims"].items():
            def ms(key: str) -> float:
                return t[key]["median_ms"]

            def ratio(mode: str, path: str) -> float:
                return ms(f"{mode}/{path}") / ms(f"{mode}/native_embedding_lookup")

            cost = (ms("eager/hps_lookup") - ms("eager/engine_torch"), ms("eager/hps_layer") - ms("eager/engine_torch"))
            ratios = [ratio(m, p) for p in ("hps_lookup", "hps_layer") for m in ("eager", "tf.function")]
            faster = all(ms(f"{m}/{p}") < ms(f"{m}/native_hash_table") for p in ("hps_lookup", "hps_layer")
                         for m in ("eager", "tf.function"))
            met = max(cost) <= 0.1 and max(ratios) <= 1.2 and faster
            lines.append(
                f"| {dep_name} | {dim} | {cost[0]:.3f} / {cost[1]:.3f} | {ratios[0]:.2f}x / {ratios[1]:.2f}x | "
                f"{ratios[2]:.2f}x / {ratios[3]:.2f}x | {ratio('eager', 'hps_layer_callback'):.2f}x / "
                f"{ratio('tf.function', 'hps_layer_callback'):.2f}x | {'yes' if faster else 'no'} | "
                f"{'yes' if met else 'NOT met'} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", default="16,128")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=26)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--deployments", default="cache,tier")
    parser.add_argument("--out", default="benchmarks/results/tf_plugin_cpu",
                        help="path prefix of the .md and .json results ('' to write nothing)")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    machine = machine_info()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="hps_bench_tf_") as tmp:
        root = Path(tmp)
        tables, paths = [], []
        for dim in dims:
            keys = np.unique(rng.integers(0, 2**62, args.rows * 2, dtype=np.int64))[: args.rows]
            rng.shuffle(keys)
            vectors = rng.standard_normal((args.rows, dim)).astype(np.float32)
            path = root / f"t{dim}"
            write_table(path, keys, vectors)
            tables.append((dim, keys, vectors))
            paths.append(path)
        deployments = {}
        for name in args.deployments.split(","):
            config = write_config(root, paths, dims, args.batch, args.slots, cache=name == "cache")
            deployments[name] = run_deployment(name, config, tables, args)
    result = {"machine": machine, "params": {k: v for k, v in vars(args).items() if k != "out"},
              "deployments": deployments}
    text = to_markdown(result)
    print(text)  # noqa: T201 - a benchmark's report
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
