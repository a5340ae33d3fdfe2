"""Helpers for the TF plugin tests: HPS-style deployments (real table files + HPS JSON / our YAML), exact comparison,
random sparse ids, fresh-interpreter runs. (A plain module, imported by name: tests/ has no packages.)

The layout follows HPS's own hps_tf/test/unit/test_hps.py: two models, `foo` with one table 30000 x 16 and `bar` with
two tables 50000 x 64 and 2000 x 32, random float tables keyed 0..N-1, a cache holding every row and synchronous
inserts (gpucacheper 1.0, hit_rate_threshold 1.0), int32 keys (`supportlonglong: false`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hps_core.tables import write_table

REPO = Path(__file__).resolve().parents[2]

MAX_BATCH_SIZE = 1024
MAX_NNZ = 10


@dataclass
class Table:
    model: str
    table_id: int
    vectors: np.ndarray  # (rows, dim) float32, row i is key i
    default_value: float

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def rows(self) -> int:
        return self.vectors.shape[0]


@dataclass
class Deployment:
    config_path: Path
    tables: list[Table] = field(default_factory=list)
    key_dtype: str = "int32"


# (model, rows, dim, default value); defaults differ per table so "unknown key -> that table's default" is checked.
LAYOUT = [("foo", 30000, 16, 0.5), ("bar", 50000, 64, -1.0), ("bar", 2000, 32, 2.0)]


def write_deployment(root: Path, *, key_dtype: str = "int32", fmt: str = "json", seed: int = 0,
                     max_batch_size: int = MAX_BATCH_SIZE, max_nnz: int = MAX_NNZ, gpucache: bool = True) -> Deployment:
    """Write the HPS test layout's tables and a config (HPS JSON or our YAML) under `root`; gpucache False: the
    tables have no cache (every key from the host-memory tier)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    dep = Deployment(config_path=root / f"hps.{fmt if fmt == 'json' else 'yaml'}", key_dtype=key_dtype)
    per_model: dict[str, list[tuple[str, int, float]]] = {}
    for model, rows, dim, default in LAYOUT:
        table_id = len(per_model.setdefault(model, []))
        path = root / f"{model}{table_id}"
        vectors = rng.uniform(-1.0, 1.0, (rows, dim)).astype(np.float32)
        write_table(path, np.arange(rows, dtype=np.int64), vectors)
        per_model[model].append((str(path), dim, default))
        dep.tables.append(Table(model, table_id, vectors, default))
    if fmt == "json":
        config = {
            "supportlonglong": key_dtype == "int64",
            "models": [
                {
                    "model": model,
                    "sparse_files": [p for p, _, _ in tabs],
                    "embedding_table_names": [f"{model}_t{i}" for i in range(len(tabs))],
                    "embedding_vecsize_per_table": [d for _, d, _ in tabs],
                    "maxnum_catfeature_query_per_table_per_sample": [max_nnz] * len(tabs),
                    "default_value_for_each_table": [v for _, _, v in tabs],
                    "deployed_device_list": [0],
                    "max_batch_size": max_batch_size,
                    "hit_rate_threshold": 1.0,
                    "gpucacheper": 1.0,
                    "gpucache": gpucache,
                }
                for model, tabs in per_model.items()
            ],
        }
        dep.config_path.write_text(json.dumps(config, indent=2))
    else:  # our native YAML schema
        lines = [f"key_dtype: {key_dtype}", "models:"]
        for model, tabs in per_model.items():
            lines += [f"  {model}:", f"    max_batch_size: {max_batch_size}", "    deployed_device_list: [0]",
                      f"    cache: {{enabled: {str(gpucache).lower()}, ratio: 1.0, hit_rate_threshold: 1.0}}",
                      "    tables:"]
            for i, (p, d, v) in enumerate(tabs):
                lines += [f"      - {{name: {model}_t{i}, path: '{p}', dim: {d}, max_keys_per_sample: {max_nnz}, "
                          f"default_value: {v}}}"]
        dep.config_path.write_text("\n".join(lines) + "\n")
    return dep


def assert_bit_identical(actual, expected) -> None:
    """Same shape, float32, and the same bits everywhere (uint32 views: -0.0 vs 0.0 or NaN payloads would show)."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    assert a.dtype == e.dtype == np.float32, (a.dtype, e.dtype)
    mismatch = a.view(np.uint32) != e.view(np.uint32)
    assert not mismatch.any(), (
        f"{mismatch.sum()} of {a.size} values differ, e.g. {a[mismatch][:5]} vs {e[mismatch][:5]}")


def random_sparse(rng: np.random.Generator, rows: int, max_nnz: int, high: int, dtype):
    """Canonical row-major tf.SparseTensor (rows x max_nnz) with 1..max_nnz ids per row, ids in [0, high)."""
    import tensorflow as tf

    counts = rng.integers(1, max_nnz + 1, rows)
    row_idx = np.repeat(np.arange(rows), counts)
    col_idx = np.concatenate([np.arange(c) for c in counts])
    values = rng.integers(0, high, row_idx.size)
    return tf.SparseTensor(np.stack([row_idx, col_idx], 1).astype(np.int64), tf.constant(values, dtype),
                           [rows, max_nnz])


def run_python(args: list[str], *, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python args...` in a fresh interpreter with the repo on the path; fail the test with its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"`python {' '.join(args)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")
    return proc
