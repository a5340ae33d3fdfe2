"""Pieces every benchmark shares: machine facts, key distributions, synthetic tables, timing, percentiles.

Used by the Hydra suite (`python -m benchmarks.run`) and by the older single-purpose scripts (bench_gpu.py,
bench_engine_cpu.py, bench_host_memory.py, bench_rocksdb.py, bench_redis_cluster.py), so that a number in any of
them was produced by the same sampler, table generator and clock.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import itertools
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# DLRM batch 131072 x 26 categorical slots: the keys of one full-size lookup call.
DLRM_KEYS = 131072 * 26


# ------------------------------------------------------------------------------------------------ machine facts


def _cmd(*args: str, timeout: float = 20) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    for line in _cmd("lscpu").splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def commit(watched: Sequence[str] = (), label: str = "changes") -> str:
    """Short commit of the checkout; "(+ uncommitted <label>)" when any `watched` path (all, when empty) has local
    changes, so a number is never attributed to code it was not measured on. $HPS_COMMIT wins when set: the GPU
    machine gets a copy of the tree whose .git (if any) is stale."""
    if os.environ.get("HPS_COMMIT"):
        return os.environ["HPS_COMMIT"]
    head = _cmd("git", "rev-parse", "--short", "HEAD")
    if not head:
        return os.environ.get("HPS_COMMIT", "unknown")
    dirty = _cmd("git", "status", "--porcelain", "--untracked-files=no", "--", *watched)
    return f"{head} (+ uncommitted {label})" if dirty else head


def machine_info(watched: list[str] | None = None, label: str = "changes") -> dict[str, Any]:
    """CPU model, cores, versions, commit and date (and the GPU when torch sees one)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "commit": commit(watched or (), label),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg()[0],
    }
    info.update(gpu_info())
    return info


def gpu_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": torch.version.cuda, "gpu": p.name, "sm_count": p.multi_processor_count,
            "gpu_memory_gib": round(p.total_memory / 2**30, 1),
            "driver": _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")}


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of `names` ("missing" for the absent ones), without importing them."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


# ------------------------------------------------------------------------------------------------ keys


class ZipfSampler:
    """Ranks in [0, rows) with P(rank r) ~ (r + 1)^-alpha, by exact inverse-CDF sampling (any alpha > 0).

    The CDF is built once (8 bytes per row), so drawing many batches from a 32.7 M-row table costs one
    `searchsorted` per batch rather than a new cumsum each time.

    Example:
        >>> ZipfSampler(1000, 1.05).sample(np.random.default_rng(0), 5)  # doctest: +SKIP
        array([  0,  12,   1, 503,   3])
    """

    def __init__(self, rows: int, alpha: float) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.rows, self.alpha = int(rows), float(alpha)
        cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -alpha)
        cdf /= cdf[-1]
        self._cdf = cdf

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 ranks, i.i.d.

        The uniforms are sorted before the search (searchsorted on sorted queries walks the CDF in order: ~3x
        faster on a 32 M-row CDF) and the ranks shuffled afterwards, which gives the same joint distribution.
        """
        u = np.sort(rng.random(n))
        ranks = np.searchsorted(self._cdf, u, side="right").clip(0, self.rows - 1).astype(np.int64)
        rng.shuffle(ranks)
        return ranks


def zipf_ranks(rng: np.random.Generator, alpha: float, n: int, rows: int) -> np.ndarray:
    """n ranks in [0, rows) with P(rank r) ~ (r+1)^-alpha (one-shot form of ZipfSampler)."""
    return ZipfSampler(rows, alpha).sample(rng, n)


def distinct_keys(rng: np.random.Generator, n: int, high: int, low: int = 0) -> np.ndarray:
    """n distinct int64 keys drawn uniformly from [low, high), in random order."""
    span = high - low
    if n > span:
        raise ValueError(f"cannot draw {n} distinct keys from [{low}, {high})")
    if n > span // 4:  # dense: a permutation is cheaper than rejection
        return (rng.permutation(span)[:n] + low).astype(np.int64)
    keys = np.unique(rng.integers(low, high, size=n + n // 50 + 16, dtype=np.int64))
    while keys.size < n:
        keys = np.unique(np.concatenate([keys, rng.integers(low, high, size=n - keys.size + 16, dtype=np.int64)]))
    rng.shuffle(keys)
    return keys[:n]


# ------------------------------------------------------------------------------------------------ tables


def synthetic_rows(out: np.ndarray, seed: int, block_rows: int = 1 << 16) -> np.ndarray:
    """Fill `out` (rows, dim) float32 with reproducible, row-distinct values, fast enough for a 16.7 GB table.

    Drawing 4.2 G random floats takes minutes; instead one random block of `block_rows` rows is drawn and row r
    is block[r % block_rows] + (r // block_rows) * 2^-10, so rows differ and any row can be checked exactly. Chunks
    are filled by a thread pool (numpy releases the GIL in the add).
    """
    rows, dim = out.shape
    block = np.random.default_rng(seed).random((min(block_rows, rows), dim), dtype=np.float32)

    def fill(start: int) -> None:
        stop = min(start + block_rows, rows)
        np.add(block[: stop - start], np.float32((start // block_rows) * 2.0**-10), out=out[start:stop])

    starts = range(0, rows, block_rows)
    workers = min(16, os.cpu_count() or 1)
    if workers > 1 and rows > 4 * block_rows:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, starts))
    else:
        for s in starts:
            fill(s)
    return out


def write_synthetic_table(path: str | os.PathLike, keys: np.ndarray, dim: int, seed: int,
                          check_duplicates: bool = False):
    """Write an HPS table directory (`key`, `emb_vector`) with synthetic rows; returns (TableFiles, vectors).

    `vectors` is an in-memory (anonymous) float32 array, the reference the benchmarks compare lookups with and the
    table of the native baselines. NOTE: the files are written with plain `tofile` (no fsync, no temp-file rename
    as hps_core.tables.write_table does): benchmark tables are scratch data, and skipping the sync saves tens of
    seconds on the 16.7 GB DLRM table. The written directory is then opened (validated) by hps_core.tables.
    """
    from hps_core.tables import open_table

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    vectors = synthetic_rows(np.empty((keys.size, dim), dtype=np.float32), seed)
    keys.tofile(path / "key")
    vectors.tofile(path / "emb_vector")
    return open_table(path, dim, check_duplicates=check_duplicates), vectors


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[..., Any], calls: Sequence[tuple] | Iterable[tuple], device: torch.device | str = "cpu",
               warmup: int = 2, budget_s: float | None = None, min_calls: int = 3) -> np.ndarray:
    """Seconds of each `fn(*args)` for args in `calls` (after `warmup` untimed calls on the first ones).

    On a CUDA device each call is bracketed by CUDA events with the stream synchronised before it, so the time
    includes host work inside the call (the engine's host syncs, a CPU gather) as well as the kernels. On the CPU:
    perf_counter. With `budget_s`, timing stops once the budget is spent and at least `min_calls` calls ran.
    """
    cuda = torch.device(device).type == "cuda"
    if isinstance(calls, Sequence):  # a list: warm up on its first calls, then time all of them
        warm, timed = calls[:warmup], calls
    else:  # an iterator (calls made on the fly): the warm-up consumes its first calls
        timed = iter(calls)
        warm = list(itertools.islice(timed, warmup))
    for args in warm:
        fn(*args)
    sync(device)
    times: list[float] = []
    spent = 0.0
    for args in timed:
        dt = time_one(fn, args, device, cuda)
        times.append(dt)
        spent += dt
        if budget_s is not None and spent >= budget_s and len(times) >= min_calls:
            break
    return np.asarray(times)


def time_one(fn: Callable[..., Any], args: tuple, device: torch.device | str, cuda: bool | None = None) -> float:
    """Seconds of one `fn(*args)`: CUDA events around it (stream synchronised first) on a CUDA device, else
    perf_counter; see time_calls."""
    if cuda is None:
        cuda = torch.device(device).type == "cuda"
    if not cuda:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_time_ms(fn: Callable[[], Any], warmup: int = 5, repeat: int = 20) -> dict:
    """Median / min / mean milliseconds of fn() by CUDA events (calls back to back, no sync between them)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t = np.array(times)
    return {"median_ms": float(np.median(t)), "min_ms": float(t.min()), "mean_ms": float(t.mean()), "repeat": repeat}


def median_ms(fn: Callable[..., Any], calls: list, warmup: int = 3) -> float:
    """Median wall milliseconds of fn(*args) over `calls` (the first `warmup` also run untimed first)."""
    return float(np.median(time_calls(fn, calls, "cpu", warmup=warmup)) * 1e3)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean / p50 / p90 / p99 / min / max in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"count": int(ms.size), "mean_ms": float(ms.mean()), "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": float(p99), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


# ------------------------------------------------------------------------------------------------ services


def redis_fixture():
    """The harness that starts a real local Redis Cluster (tests/tiers/redis_fixture.py), loaded as a module."""
    if "redis_fixture" in sys.modules:
        return sys.modules["redis_fixture"]
    spec = importlib.util.spec_from_file_location("redis_fixture", ROOT / "tests" / "tiers" / "redis_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["redis_fixture"] = mod
    spec.loader.exec_module(mod)
    return mod
