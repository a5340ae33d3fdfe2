"""Input builders shared by the op tests (the per-op modules and test_opcheck_all's case table)."""

from __future__ import annotations

import numpy as np
import torch

from hps_core import ops
from hps_core.testing import CheckedCache


def rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


def filled(device: str, policy: str = "lru", dim: int = 4, num_buckets: int = 2, n: int = 40) -> CheckedCache:
    """A checked cache holding keys 0..n-1 (rows from seed 0)."""
    c = CheckedCache(num_buckets, dim, device, policy)
    c.insert_or_assign(list(range(n)), rows(n, dim))
    return c


def make_bags(rng: np.random.Generator, bags: int, dim: int, weighted: bool):
    """Bags of 0..9 elements (some empty); with weights, one bag whose weights are all zero."""
    sizes = rng.integers(0, 10, size=bags)
    sizes[0] = 0
    sizes[1] = 3
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    n = int(offsets[-1])
    values = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    weights = None
    if weighted:
        weights = torch.from_numpy(rng.uniform(0.1, 2.0, size=n).astype(np.float32))
        weights[offsets[1] : offsets[2]] = 0.0  # a zero-weight bag: mean/sqrtn divisor 0 -> zeros
    return values, offsets, weights


def resident(device: str, keys: np.ndarray, dim: int, rng: np.random.Generator, rows_pinned: bool = False):
    """The resident index of `keys` (built on the CPU, moved to `device`) and its (N, dim) rows."""
    index = ops.resident_index_build(torch.from_numpy(keys))
    rows = torch.from_numpy(rng.standard_normal((keys.size, dim)).astype(np.float32))
    if rows_pinned:
        rows = rows.pin_memory()
    elif device != "cpu":
        rows = rows.to(device)
    return [t.to(device) for t in index], rows
