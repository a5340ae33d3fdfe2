"""Serving embeddings to models that are not torch or TF: a JAX model and a CuPy pipeline, both reading their
embedding rows through `interop.arrays` (DLPack, no copies), checked against the table files.

    python examples/arrays_models.py [--workdir DIR] [--batches 20]

The JAX model (a one-layer scorer over the mean of each sample's embeddings) runs wherever JAX runs (CPU here; the
keys' device is the lookup's). The CuPy pipeline (sum-pooled bags of keys, then a dot with a weight vector) runs
when CuPy and a GPU are there, on a non-default CuPy stream - the lookup runs on that stream too. Each prints its
outputs' agreement with the same computation on the rows read from the table files with NumPy.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from hps_core.engine import HierarchicalParameterServer
from hps_core.tables import write_table
from interop import arrays

ROWS, DIM, SLOTS = 50_000, 16, 8


def deploy(workdir: Path) -> tuple[HierarchicalParameterServer, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    keys = rng.choice(np.int64(1) << 40, ROWS, replace=False)
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    write_table(workdir / "item", keys, vectors)
    cfg = {"key_dtype": "int64",
           "models": {"ranker": {"tables": [{"name": "item", "path": str(workdir / "item"), "dim": DIM,
                                             "max_keys_per_sample": SLOTS}],
                                 "max_batch_size": 256, "deployed_device_list": [0],
                                 "cache": {"ratio": 0.2, "policy": "lfu", "admission": "tinylfu",
                                           "hit_rate_threshold": 1.1}}},
           "tiers": {"host_memory": {"enabled": True}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no GPU: the deployment is served from the CPU
        return HierarchicalParameterServer(cfg, progress=False), keys, vectors


def run_jax(hps, keys, vectors, batches: int) -> float:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # int64 keys stay int64
    w = jnp.asarray(np.random.default_rng(1).standard_normal(DIM).astype(np.float32))
    rows_of = {int(k): i for i, k in enumerate(keys)}
    rng = np.random.default_rng(2)

    @jax.jit
    def score(emb):  # (B, SLOTS, DIM) -> (B,)
        return jax.nn.sigmoid(emb.mean(axis=1) @ w)

    worst = 0.0
    for _ in range(batches):
        ids = jnp.asarray(rng.choice(keys, (256, SLOTS)))
        got = np.asarray(score(arrays.lookup("ranker", "item", ids, server=hps)))
        want = 1 / (1 + np.exp(-(vectors[[rows_of[int(k)] for k in np.asarray(ids).ravel()]]
                                 .reshape(256, SLOTS, DIM).mean(1) @ np.asarray(w))))
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def run_cupy(hps, keys, vectors, batches: int) -> float:
    import cupy

    w = cupy.asarray(np.random.default_rng(3).standard_normal(DIM).astype(np.float32))
    rows_of = {int(k): i for i, k in enumerate(keys)}
    rng = np.random.default_rng(4)
    worst = 0.0
    with cupy.cuda.Stream(non_blocking=True) as stream:
        for _ in range(batches):
            ids = rng.choice(keys, 256 * SLOTS)
            offsets = np.arange(0, ids.size, SLOTS)
            pooled = arrays.bag_lookup("ranker", "item", cupy.asarray(ids), offsets=cupy.asarray(offsets),
                                       mode="sum", server=hps)
            got = cupy.asnumpy(pooled @ w, stream=stream)
            stream.synchronize()
            want = vectors[[rows_of[int(k)] for k in ids]].reshape(256, SLOTS, DIM).sum(1) @ cupy.asnumpy(w)
            worst = max(worst, float(np.abs(got - want).max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hps, keys, vectors = deploy(Path(args.workdir or tmp))
        with hps:
            ran = False
            if importlib.util.find_spec("jax") is not None:
                print(f"JAX model: max |error| vs the table files {run_jax(hps, keys, vectors, args.batches):.2e}")
                ran = True
            if importlib.util.find_spec("cupy") is not None and torch.cuda.is_available():
                print(f"CuPy pipeline: max |error| vs the table files {run_cupy(hps, keys, vectors, args.batches):.2e}")
                ran = True
            if not ran:
                print("neither JAX nor CuPy (with a GPU) is installed: nothing to run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
