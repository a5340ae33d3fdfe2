"""`bench=dlrm`: per-batch forward latency of the DLRM of HPS's DLRM benchmark (26 slots sharing one table,
dim 128, 13 dense features; benchmarks.suite.dlrm_model) for each batch size, variants measured in one process:

- hps_engine: our engine on the device (cache ratio `cache_ratio`, the table in the host-memory tier below it),
  the torch model on the device; optionally the MLP part replayed as a CUDA graph for small batches;
- native: the table as a CPU tensor, the rows gathered on the CPU (on a GPU run: `index_select` straight into a
  pinned buffer, then one asynchronous copy), the MLP on the device (HPS's "native TF": embeddings in CPU memory,
  dense part on the GPU);
- tf_plugin / tf_native (CPU machines, TF installed): the same model in TF with embeddings from
  `interop.tf_plugin.LookupLayer` vs `tf.nn.embedding_lookup` on a tf.Variable (scale `rows` down on CPU).

As in HPS's benchmark, `replay_same_batch` replays one batch per size after `warmup` calls (all cache hits: the
best case); keys per batch = batch x slots, drawn Zipf(`zipf_alpha`) over the rows, key = row id (int32 keys).
Latency = one synchronised forward call, CUDA events on GPU; HPS's published A100 numbers (`published`, from
HPS's hps_dlrm_benchmark.md) are server-side compute latencies measured by Triton, shown beside ours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import ZipfSampler, latency_summary, time_calls, write_synthetic_table
from benchmarks.suite.config import DlrmBench
from benchmarks.suite.dlrm_model import DLRM
from benchmarks.suite.report import save_figure

log = logging.getLogger(__name__)

MODEL, TABLE = "dlrm", "categorical"
_TORCH_VARIANTS = ("hps_engine", "native")
_TF_VARIANTS = ("tf_plugin", "tf_native")


def _deployment(cfg: DlrmBench, path: str) -> dict:
    return {
        "key_dtype": cfg.key_dtype,
        "models": {MODEL: {
            "tables": [{"name": TABLE, "path": path, "dim": cfg.dim, "max_keys_per_sample": cfg.slots}],
            "max_batch_size": max(cfg.batch_sizes), "deployed_device_list": [0],
            # hit_rate_threshold 1.0 as HPS's benchmark: misses are inserted before the lookup returns.
            "cache": {"ratio": cfg.cache_ratio, "hit_rate_threshold": 1.0, "policy": "lru"}}},
        "tiers": {"host_memory": {"enabled": True, "num_partitions": cfg.host_partitions}},
    }


def _precision(cfg: DlrmBench, device: torch.device):
    """Matmul precision for the run, and the autocast context of each forward."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    if cfg.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext


def _emb_dtype(cfg: DlrmBench) -> torch.dtype | None:
    """What the engine lookup returns: bfloat16 when the model runs in bfloat16 (the lookup writes it rounded, so
    the interaction and the top MLP read half the bytes), float32 (None) otherwise."""
    return torch.bfloat16 if cfg.precision == "bf16" else None


def _graphed(model: DLRM, batch: int, cfg: DlrmBench, device: torch.device, amp) -> Callable:
    """The MLP part (bottom, interaction, top) captured once as a CUDA graph for `batch`; returns
    run(dense, emb) -> out, which copies its inputs into the graph's static buffers and replays it. The engine
    lookup stays outside (it synchronises with the host on misses, which a graph cannot hold)."""
    dense_s = torch.zeros(batch, cfg.dense_features, device=device)
    emb_s = torch.zeros(batch, cfg.slots, cfg.dim, device=device, dtype=_emb_dtype(cfg) or torch.float32)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad(), amp():
        for _ in range(2):
            model(dense_s, emb_s)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the engine's insert worker thread (idle here: no misses) must not invalidate the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad(), amp():
        out_s = model(dense_s, emb_s)

    def run(dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dense_s.copy_(dense)
        emb_s.copy_(emb)
        graph.replay()
        return out_s

    return run


class _Setup:
    """The table (files for the engine, an in-memory array for the native paths), the engine, the model."""

    def __init__(self, cfg: DlrmBench, device: torch.device, tmp: str, skipped: dict[str, str]) -> None:
        self.cfg, self.device = cfg, device
        t0 = time.perf_counter()
        keys = np.arange(cfg.rows, dtype=np.int64)  # key = row id, as HPS's DLRM benchmark (Criteo ids)
        self.files, self.vectors = write_synthetic_table(os.path.join(tmp, "dlrm"), keys, cfg.dim, cfg.seed)
        self.table_write_s = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        self.model = DLRM(cfg.dense_features, cfg.dim, cfg.slots, cfg.bottom_mlp, cfg.top_mlp).eval()
        self.tf_forwards: dict[str, Callable] = {}
        want_tf = [v for v in cfg.variants if v in _TF_VARIANTS]
        tf_ok = False
        if want_tf:
            try:
                import tensorflow  # noqa: F401

                tf_ok = True
            except ImportError as exc:
                for v in want_tf:
                    skipped[v] = f"tensorflow not importable here ({exc})"
        self.server = None
        self.engine_start_s = 0.0
        t0 = time.perf_counter()
        if tf_ok and "tf_plugin" in cfg.variants:
            # The plugin serves from the process's default server; the torch engine variant uses the same one.
            import interop.tf_plugin as hps
            from hps_core import engine as hps_engine

            hps.shutdown()
            hps.Init(global_batch_size=max(cfg.batch_sizes), ps_config_file=_deployment(cfg, str(self.files.path)))
            self.server = hps_engine.default_server()
        elif "hps_engine" in cfg.variants:
            from hps_core.engine import HierarchicalParameterServer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "no CUDA device: served from the CPU"
                self.server = HierarchicalParameterServer(_deployment(cfg, str(self.files.path)), progress=False)
        self.engine_start_s = time.perf_counter() - t0
        if tf_ok:
            from benchmarks.suite.dlrm_tf import TFDLRM, forwards

            self.tf_forwards = forwards(TFDLRM(self.model), self.vectors, MODEL, cfg.dim)
        self.model = self.model.to(device)
        self.native_table = torch.from_numpy(self.vectors)  # CPU, shares the array
        self._pinned: torch.Tensor | None = None

    def pinned_staging(self, rows: int) -> torch.Tensor:
        """(rows, dim) view of one pinned buffer sized for the largest batch (pinning GBs is slow: done once)."""
        if self._pinned is None:
            self._pinned = torch.empty((max(self.cfg.batch_sizes) * self.cfg.slots, self.cfg.dim), pin_memory=True)
        return self._pinned[:rows]

    def close(self) -> None:
        if self.tf_forwards:
            import interop.tf_plugin as hps

            self.tf_forwards = {}
            hps.shutdown()
            self.server = None
        if self.server is not None:
            self.server.close()


def _engine_stats(setup: _Setup) -> dict:
    dev = "cpu" if setup.device.type == "cpu" else f"cuda:{setup.device.index or 0}"
    return setup.server.stats()["models"][MODEL][TABLE][dev]


def _measure(setup: _Setup, variant: str, batch: int, rows: list[np.ndarray], dense: list[np.ndarray],
             amp) -> tuple[dict[str, Any], np.ndarray]:
    """Latency summary of `variant` at `batch`, and its output for the first batch (for the cross-check)."""
    cfg, dev, model = setup.cfg, setup.device, setup.model
    kdt = torch.int32 if cfg.key_dtype == "int32" else torch.int64
    extra: dict[str, Any] = {}
    if variant == "hps_engine":
        emb_dtype = _emb_dtype(cfg)
        keys = [torch.from_numpy(r).to(device=dev, dtype=kdt) for r in rows]
        dd = [torch.from_numpy(d).to(dev) for d in dense]
        mlp = model
        if dev.type == "cuda" and batch <= cfg.cuda_graph_max_batch:
            mlp = _graphed(model, batch, cfg, dev, amp)
            extra["cuda_graph"] = True

        def fn(k, d):
            with torch.no_grad(), amp():
                return mlp(d, setup.server.lookup(MODEL, 0, k, dtype=emb_dtype))
        calls = [(keys[i % len(keys)], dd[i % len(dd)]) for i in range(cfg.repeats)]
    elif variant == "native":
        idx = [torch.from_numpy(r) for r in rows]
        dd = [torch.from_numpy(d).to(dev) for d in dense]
        if dev.type == "cuda":
            # The strongest plain baseline: the CPU gather writes straight into pinned memory (one pass, torch's
            # intra-op threads), then one asynchronous copy; the event keeps the next gather off the buffer
            # until the copy has read it.
            staging = setup.pinned_staging(batch * cfg.slots)
            copied = torch.cuda.Event()
            copied.record()

            def fn(i, d):
                copied.synchronize()
                torch.index_select(setup.native_table, 0, i.view(-1), out=staging)
                emb = staging.to(dev, non_blocking=True).view(batch, cfg.slots, cfg.dim)
                copied.record()
                with torch.no_grad(), amp():
                    return model(d, emb)
        else:
            def fn(i, d):
                with torch.no_grad(), amp():
                    return model(d, torch.nn.functional.embedding(i, setup.native_table))
        calls = [(idx[i % len(idx)], dd[i % len(dd)]) for i in range(cfg.repeats)]
    else:
        import tensorflow as tf

        f = setup.tf_forwards[variant]
        ids = [tf.constant(r, dtype=tf.int32 if (variant == "tf_plugin" and cfg.key_dtype == "int32") else tf.int64)
               for r in rows]
        dd = [tf.constant(d) for d in dense]

        def fn(k, d):
            return f(k, d).numpy()  # .numpy() waits for the result (TF may run ops asynchronously)
        calls = [(ids[i % len(ids)], dd[i % len(dd)]) for i in range(cfg.repeats)]
    clock = dev if variant in _TORCH_VARIANTS else torch.device("cpu")
    for args in calls[: cfg.warmup]:  # warm-up: fills the cache, traces tf.functions, captures nothing timed
        fn(*args)
    if variant == "hps_engine":
        before = _engine_stats(setup)
    t = time_calls(fn, calls, clock, warmup=0, budget_s=cfg.batch_budget_s, min_calls=cfg.min_repeats)
    if variant == "hps_engine":
        after = _engine_stats(setup)  # the timed calls only
        extra["hit_rate"] = (after["cache_hits"] - before["cache_hits"]) / max(after["keys"] - before["keys"], 1)
    out = fn(*calls[0])
    out = np.asarray(out.float().cpu().numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float32)
    return {**latency_summary(t), **extra}, out


def run(cfg: DlrmBench, device: torch.device, out_dir: str) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    for v in cfg.variants:
        if v in _TF_VARIANTS and device.type != "cpu":
            skipped[v] = "TF variants run on CPU machines only (the device image has no TensorFlow)"
    amp = _precision(cfg, device)
    results: dict[str, Any] = {"batches": [], "skipped": skipped, "device": str(device)}
    with tempfile.TemporaryDirectory(prefix="hps_bench_dlrm_", dir=os.environ.get("HPS_BENCH_TMP")) as tmp:
        setup = _Setup(cfg, device, tmp, skipped)
        try:
            results["setup"] = {"table_write_s": setup.table_write_s, "engine_start_and_load_s": setup.engine_start_s,
                                "table_bytes": int(setup.vectors.nbytes)}
            variants = [v for v in cfg.variants if v not in skipped]
            sampler = ZipfSampler(cfg.rows, cfg.zipf_alpha)
            order = np.random.default_rng(cfg.seed + 1).permutation(cfg.rows)  # popularity rank -> row
            deadline = time.monotonic() + cfg.max_wall_s if cfg.max_wall_s else math.inf
            results["batches_not_run"] = []
            for batch in cfg.batch_sizes:
                if time.monotonic() > deadline:
                    results["batches_not_run"].append(batch)
                    continue
                rng = np.random.default_rng([cfg.seed, batch])
                n = 1 if cfg.replay_same_batch else 4
                rows = [order[sampler.sample(rng, batch * cfg.slots)].reshape(batch, cfg.slots) for _ in range(n)]
                dense = [rng.standard_normal((batch, cfg.dense_features), dtype=np.float32) for _ in range(n)]
                entry: dict[str, Any] = {"batch": batch, "keys": batch * cfg.slots, "variants": {}}
                outs = {}
                for v in variants:
                    entry["variants"][v], outs[v] = _measure(setup, v, batch, rows, dense, amp)
                    log.info("dlrm batch %d %s: p50 %.3f ms", batch, v, entry["variants"][v]["p50_ms"])
                ref = outs.get("native", next(iter(outs.values())))
                entry["max_abs_diff_vs_native"] = {v: float(np.max(np.abs(o - ref))) for v, o in outs.items()}
                entry["output_mean"] = {v: float(o.mean()) for v, o in outs.items()}
                results["batches"].append(entry)
            if setup.server is not None:  # counters and per-stage latency of the whole run (all batch sizes)
                results["engine_stats"] = _engine_stats(setup)
            if cfg.storage_error:
                results["storage_error"] = _storage_error(setup, sampler, order, amp)
        finally:
            setup.close()
    results["targets"] = _targets(cfg, results, device)
    return {"results": results, "tables": [_table(cfg, results)], "notes": _notes(cfg, results)}


def _storage_error(setup: _Setup, sampler: ZipfSampler, order: np.ndarray, amp) -> dict[str, Any]:
    """The model's outputs for one batch when the table is kept in each storage of cfg.storage_error (an engine
    each, the table static: every row as the storage keeps it) vs float32 storage: max / mean abs difference."""
    from hps_core.engine import HierarchicalParameterServer

    cfg, dev = setup.cfg, setup.device
    rng = np.random.default_rng([cfg.seed, 16])
    batch = cfg.storage_error_batch
    keys = torch.from_numpy(order[sampler.sample(rng, batch * cfg.slots)].reshape(batch, cfg.slots)).to(dev)
    dense = torch.from_numpy(rng.standard_normal((batch, cfg.dense_features), dtype=np.float32)).to(dev)
    outs = {}
    for storage in ["float32"] + [s for s in cfg.storage_error if s != "float32"]:
        deployment = _deployment(cfg, str(setup.files.path))
        deployment["models"][MODEL]["cache"] = {"type": "static", "storage": storage}
        deployment["models"][MODEL]["max_batch_size"] = max(batch, deployment["models"][MODEL]["max_batch_size"])
        deployment["tiers"]["host_memory"]["enabled"] = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            server = HierarchicalParameterServer(deployment, progress=False)
        try:
            with torch.no_grad(), amp():
                outs[storage] = setup.model(dense, server.lookup(MODEL, 0, keys)).float().cpu()
        finally:
            server.close()
    ref = outs["float32"]
    return {s: {"max_abs": float((o - ref).abs().max()), "mean_abs": float((o - ref).abs().mean()),
                "output_mean_abs": float(ref.abs().mean()), "batch": batch}
            for s, o in outs.items() if s != "float32"}


def _p50(results: dict, batch: int, variant: str) -> float | None:
    for e in results["batches"]:
        if e["batch"] == batch and variant in e["variants"]:
            return e["variants"][variant]["p50_ms"]
    return None


def _targets(cfg: DlrmBench, results: dict, device: torch.device) -> dict[str, Any]:
    """The issue's H200 targets, evaluated when this run measured the batches they name on a GPU."""
    out: dict[str, Any] = {}
    if device.type != "cuda":
        return {"note": "targets are for a GPU run; not evaluated on CPU"}
    small, big = _p50(results, 32, "hps_engine"), _p50(results, 131072, "hps_engine")
    native_big = _p50(results, 131072, "native")
    if small is not None:
        out["latency_at_32_us"] = {"value": small * 1e3, "target": "<= 150", "met": small * 1e3 <= 150}
    if big is not None:
        out["latency_at_131072_ms"] = {"value": big, "target": "<= 3", "met": big <= 3}
    if big is not None and native_big is not None:
        out["speedup_vs_native_at_131072"] = {"value": native_big / big, "target": ">= 15",
                                              "met": native_big / big >= 15}
    return out


def _published_us(cfg: DlrmBench, series: str, batch: int) -> float | None:
    pub = cfg.published or {}
    sizes = list(pub.get("batch_sizes", []))
    if batch in sizes and series in pub.get("latency_us", {}):
        return float(pub["latency_us"][series][sizes.index(batch)])
    return None


def _table(cfg: DlrmBench, results: dict) -> dict[str, Any]:
    variants = list(dict.fromkeys(v for e in results["batches"] for v in e["variants"]))
    pub_series = list((cfg.published or {}).get("latency_us", {}))
    cols = (["batch"] + [f"{v} p50 ms" for v in variants] + [f"{v} p99 ms" for v in variants]
            + (["engine vs native"] if {"hps_engine", "native"} <= set(variants) else [])
            + (["plugin vs TF native"] if {"tf_plugin", "tf_native"} <= set(variants) else [])
            + (["engine hit rate"] if "hps_engine" in variants else [])
            + [f"{s} ms (A100, HPS)" for s in pub_series])
    rows = []
    for e in results["batches"]:
        vs = e["variants"]
        row = [f"{e['batch']:,}"] + [f"{vs[v]['p50_ms']:.3f}" if v in vs else "" for v in variants] \
            + [f"{vs[v]['p99_ms']:.3f}" if v in vs else "" for v in variants]
        if {"hps_engine", "native"} <= set(variants):
            row.append(f"{vs['native']['p50_ms'] / vs['hps_engine']['p50_ms']:.1f}x")
        if {"tf_plugin", "tf_native"} <= set(variants):
            row.append(f"{vs['tf_native']['p50_ms'] / vs['tf_plugin']['p50_ms']:.2f}x")
        if "hps_engine" in variants:
            row.append(f"{vs['hps_engine']['hit_rate']:.3f}")
        for s in pub_series:
            us = _published_us(cfg, s, e["batch"])
            row.append(f"{us / 1e3:.3f}" if us is not None else "")
        rows.append(row)
    return {"title": f"DLRM forward latency per batch ({results['device']})", "columns": cols, "rows": rows}


def _notes(cfg: DlrmBench, results: dict) -> list[str]:
    s = results.get("setup", {})
    notes = [
        f"Table {cfg.rows:,} rows x {cfg.dim} fp32 ({s.get('table_bytes', 0) / 1e9:.2f} GB), {cfg.slots} slots "
        f"sharing it, Zipf alpha {cfg.zipf_alpha}, {cfg.key_dtype} keys; engine cache ratio {cfg.cache_ratio}; "
        f"precision {cfg.precision}"
        + (" (the engine lookup returns bf16 rows); " if _emb_dtype(cfg) is not None else "; ")
        + ("one batch replayed per size after the warm-up (HPS's best case)." if cfg.replay_same_batch
           else "4 distinct batches per size."),
        f"Setup: table written in {s.get('table_write_s', 0):.1f} s, engine start + host-tier load "
        f"{s.get('engine_start_and_load_s', 0):.1f} s.",
        "native = the table as a CPU tensor, rows gathered on the CPU (GPU runs: index_select into pinned memory, "
        "then one async copy to the device), MLP on the device (eager).",
        "HPS columns: A100-SXM4-80GB, TF 2.10 / TRT 8.5, server-side compute latency in Triton "
        "(hps_dlrm_benchmark.md); ours are in-process forward calls on the hardware named in env.",
    ]
    for k, v in results.get("skipped", {}).items():
        notes.append(f"skipped {k}: {v}")
    for k, v in results.get("storage_error", {}).items():
        notes.append(f"storage {k} vs float32 (static table, one batch of {v['batch']}): model output max abs diff "
                     f"{v['max_abs']:.3g}, mean {v['mean_abs']:.3g} (mean |output| {v['output_mean_abs']:.3g})")
    if results.get("batches_not_run"):
        notes.append(f"**stopped early**: max_wall_s = {cfg.max_wall_s} s reached; batches not run: "
                     f"{results['batches_not_run']}")
    for k, v in results.get("targets", {}).items():
        if isinstance(v, dict):
            notes.append(f"target {k}: {v['value']:.3g} (target {v['target']}): {'met' if v['met'] else 'NOT met'}")
    return notes


def plot(results: dict[str, Any], out_dir: str, plt, cfg: DlrmBench | None = None, device_label: str = "") -> list[str]:
    batches = results["batches"]
    variants = list(dict.fromkeys(v for e in batches for v in e["variants"]))
    labels = {"hps_engine": "hps engine (torch)", "native": "native (CPU table, torch MLP)",
              "tf_plugin": "TF + hps plugin", "tf_native": "native TF (CPU table)"}
    fig, (ax, sp) = plt.subplots(1, 2, figsize=(13, 5))
    for i, v in enumerate(variants):
        pts = [(e["batch"], e["variants"][v]["p50_ms"]) for e in batches if v in e["variants"]]
        x, y = zip(*pts)
        ax.plot(x, y, "-o", color=f"C{i}", label=f"{device_label}: {labels.get(v, v)}")
    pub = (cfg.published if cfg is not None else None) or {}
    pub_labels = pub.get("labels", {})
    hw = pub.get("hardware_short", "A100 (HPS published)")
    for j, (series, us) in enumerate(pub.get("latency_us", {}).items()):
        ax.plot(pub["batch_sizes"], [u / 1e3 for u in us], "--", color=f"C{j + 5}", marker="x",
                label=f"{hw}: {pub_labels.get(series, series)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel("forward latency per batch, p50 (ms)")
    shape = f"{cfg.rows:,} x {cfg.dim} table, {cfg.slots} slots" if cfg is not None else "shared table"
    ax.set_title(f"DLRM ({shape}); A100 lines: HPS's 32.7 M x 128 benchmark", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    pairs = [("native", "hps_engine", f"{device_label}: native / hps engine"),
             ("tf_native", "tf_plugin", f"{device_label}: native TF / TF + plugin")]
    for i, (base, ours, label) in enumerate(pairs):
        pts = [(e["batch"], e["variants"][base]["p50_ms"] / e["variants"][ours]["p50_ms"]) for e in batches
               if base in e["variants"] and ours in e["variants"]]
        if pts:
            x, y = zip(*pts)
            sp.plot(x, y, "-o", color=f"C{i}", label=label)
    lat = pub.get("latency_us", {})
    for j, series in enumerate(s for s in lat if s != "native_tf"):
        if "native_tf" in lat:
            sp.plot(pub["batch_sizes"], [n / u for n, u in zip(lat["native_tf"], lat[series])], "--", marker="x",
                    color=f"C{j + 6}", label=f"{hw}: native TF / {pub_labels.get(series, series)}")
    sp.set_xscale("log", base=2)
    sp.set_xlabel("batch size (samples)")
    sp.set_ylabel("speed-up over the native baseline (x)")
    sp.grid(True, which="both", alpha=0.3)
    sp.legend(fontsize=7)
    return [save_figure(fig, plt, out_dir, "dlrm_latency.png")]
