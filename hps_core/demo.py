"""The demo (`make demo`): write a synthetic multi-table model in the HPS file format, deploy it with a small
cache + host memory + RocksDB (embedded, no server), serve power-law batches, check results against the files,
and print per-tier hit rates, latency, throughput and memory.

    python -m hps_core.demo [demo.batches=1000] [tiers=host_memory] [models.demo.cache.ratio=0.1] ...
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
import numpy as np
import psutil
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from hps_core.config import load_config, register_configs
from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table

log = logging.getLogger(__name__)


def write_synthetic_tables(cfg: DictConfig, rng: np.random.Generator, console: Console) -> dict:
    """Writes every table of models.demo that does not exist yet; returns {table: (sorted keys, rows in that order)}."""
    files = {}
    for table in cfg.models.demo.tables:
        rows = int(cfg.demo.rows[table.name])
        keys = rng.choice(np.int64(1) << 40, size=rows, replace=False).astype(np.int64)
        vectors = rng.standard_normal((rows, table.dim)).astype(np.float32)
        path = Path(table.path)
        if not (path / "key").exists():
            write_table(path, keys, vectors)
            console.print(f"wrote {rows:,} × {table.dim} rows to {path}")
        order = np.argsort(keys)
        files[table.name] = (keys, keys[order], vectors[order])
    return files


def power_law_keys(keys: np.ndarray, n: int, alpha: float, unknown: float, rng: np.random.Generator) -> np.ndarray:
    """n keys whose popularity ranks follow a Zipf(alpha) law over the table; a fraction are unknown keys."""
    ranks = (rng.zipf(alpha, size=n) - 1) % keys.size
    out = keys[ranks]
    mask = rng.random(n) < unknown
    out[mask] = -rng.integers(1, 1 << 40, size=int(mask.sum()))  # negative keys are never in the demo files
    return out


def expected_rows(sorted_keys: np.ndarray, sorted_rows: np.ndarray, query: np.ndarray, default: float) -> np.ndarray:
    pos = np.clip(np.searchsorted(sorted_keys, query), 0, sorted_keys.size - 1)
    hit = sorted_keys[pos] == query
    out = np.full((query.size, sorted_rows.shape[1]), np.float32(default), dtype=np.float32)
    out[hit] = sorted_rows[pos[hit]]
    return out


def report(hps: HierarchicalParameterServer, served: dict, elapsed: dict, console: Console) -> None:
    stats = hps.stats()
    table = Table(title="hps demo: per table (device cpu)")
    for col in ("table", "keys", "cache hit", "host hit", "rocksdb hit", "defaults", "p50 ms", "p99 ms",
                "keys/s", "cache MB"):
        table.add_column(col, justify="right")
    for name, s in stats["models"]["demo"].items():
        d = next(iter(s.values()))
        keys = max(d["keys"], 1)
        tiers = d["tier_hits"]
        lat = d["latency"]["total"]
        table.add_row(
            name,
            f"{d['keys']:,}",
            f"{d['cache_hits'] / keys:.3f}",
            f"{tiers.get('host_memory', 0) / keys:.3f}",
            f"{tiers.get('rocksdb', 0) / keys:.3f}",
            f"{d['defaults_served']:,}",
            f"{lat.get('p50_ms', 0):.3f}",
            f"{lat.get('p99_ms', 0):.3f}",
            f"{served[name] / max(elapsed[name], 1e-9):,.0f}",
            f"{d.get('cache_memory_bytes', 0) / 2**20:.1f}",
        )
    console.print(table)
    tiers = Table(title="tiers")
    for col in ("tier", "table", "rows", "memory MB"):
        tiers.add_column(col, justify="right")
    for tier in hps.tiers:
        for rt in hps.tables["demo"]:
            held = tier.memory_bytes(rt.tag)
            mem = f"{held / 2**20:.1f}" if held is not None else "-"
            tiers.add_row(tier.name, rt.name, f"{tier.size(rt.tag):,}", mem)
    console.print(tiers)
    console.print(f"process RSS {psutil.Process().memory_info().rss / 2**20:.0f} MB")


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    console = Console(width=max(Console().width, 132))
    rng = np.random.default_rng(int(cfg.demo.seed))
    files = write_synthetic_tables(cfg, rng, console)
    deployment = load_config(cfg)
    start = time.perf_counter()
    with HierarchicalParameterServer(deployment, progress=True) as hps:
        console.print(f"deployed in {time.perf_counter() - start:.1f} s: tiers {[t.name for t in hps.tiers]}")
        served = {name: 0 for name in files}
        elapsed = {name: 0.0 for name in files}
        checked = 0
        model = deployment.models["demo"]
        for step in range(int(cfg.demo.batches)):
            for table in model.tables:
                n = int(cfg.demo.batch_size) * table.max_keys_per_sample
                _, sorted_keys, sorted_rows = files[table.name]
                query = power_law_keys(sorted_keys, n, float(cfg.demo.alpha), float(cfg.demo.unknown_fraction), rng)
                t0 = time.perf_counter()
                out = hps.lookup("demo", table.name, torch.from_numpy(query))
                elapsed[table.name] += time.perf_counter() - t0
                served[table.name] += n
                if step % int(cfg.demo.check_every) == 0:
                    want = expected_rows(sorted_keys, sorted_rows, query, table.default_value)
                    if not np.array_equal(out.numpy(), want):
                        bad = int((out.numpy() != want).any(axis=1).sum())
                        raise SystemExit(f"demo check failed: {bad} of {n} rows of table {table.name} differ")
                    checked += n
        report(hps, served, elapsed, console)
        console.print(f"[green]checked {checked:,} looked-up rows against the table files: all equal[/green]")
        console.print(f"run directory: {os.getcwd()}")


register_configs()

if __name__ == "__main__":
    main()
