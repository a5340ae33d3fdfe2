"""Typed Python wrappers over the lookup-pipeline ops `torch.ops.hps.{compact_misses, scatter_rows, bag_reduce}`.

The ops and their contract are declared in cuda_ext/csrc/hps_ops.cpp, their fake kernels in hps_core.ops (with
every other op's); the CPU twins live in
cuda_ext/csrc/cpu/pipeline_cpu.cpp, the CUDA ones in cuda_ext/csrc/cuda/pipeline_cuda.cu, and both give identical
results (bag_reduce included, bit for bit). None of them synchronises the host on CUDA: data-dependent sizes come
back as fixed-capacity buffers plus a `counts` tensor that stays on the device, so a lookup can run
`find -> compact_misses -> (fetch) -> scatter_rows` under `torch.compile` / CUDA graphs.

Importing this module loads the native extension (hps_core._C); it raises ImportError with the reason if the
extension cannot be used.

Example:
    >>> import torch
    >>> from hps_core import pipeline_ops
    >>> keys = torch.tensor([7, 3, 7, 9])
    >>> found = torch.tensor([True, False, False, False])
    >>> unique, positions, inverse, counts = pipeline_ops.compact_misses(keys, found)
    >>> counts.tolist(), unique[:2].tolist(), positions[:3].tolist(), inverse[:3].tolist()
    ([3, 3], [3, 7], [1, 2, 3], [0, 1, 2])
"""

from __future__ import annotations

import torch
from torch import Tensor

from hps_core import ops as _ops  # noqa: F401  (loads the extension and registers these ops' fake kernels)

__all__ = ["BAG_MODES", "compact_misses", "scatter_rows", "bag_reduce"]

# `mode` codes of bag_reduce (hps_ops.cpp contract): per bag the sum, the mean (divided by the sum of weights) or
# the sum divided by sqrt(sum of squared weights).
BAG_MODES = {"sum": 0, "mean": 1, "sqrtn": 2}


def compact_misses(keys: Tensor, found: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The misses of a find, de-duplicated, without a host sync.

    Args:
        keys: (n,) int32 or int64, any device (int32 keys are widened to int64 by sign extension).
        found: (n,) bool on the same device (the `found` mask of cache_find).

    Returns:
        unique_keys (n,) int64: the distinct miss keys in ascending order (first counts[1] valid);
        positions (n,) int64: the miss positions in ascending order (first counts[0] valid);
        inverse (n,) int64: for the i-th miss, the index of its key in unique_keys (first counts[0] valid);
        counts (2,) int64: [misses, unique]. All on keys' device; entries past the counts are zero.

    Example:
        >>> u, p, inv, c = compact_misses(torch.tensor([5, 5]), torch.tensor([False, False]))
        >>> c.tolist(), u[:1].tolist(), inv.tolist()
        ([2, 1], [5], [0, 0])
    """
    return torch.ops.hps.compact_misses.default(keys, found)


def scatter_rows(out: Tensor, positions: Tensor, inverse: Tensor, rows: Tensor, counts: Tensor) -> None:
    """out[positions[i]] = rows[inverse[i]] for i < counts[0] (mutates `out`).

    Args:
        out: (n, D) float32, contiguous.
        positions, inverse: (cap,) int64, as returned by compact_misses.
        rows: (u, D) float32: one row per unique miss key.
        counts: (2,) int64 [misses, unique], as returned by compact_misses (read on the device on CUDA).
        All on one device. On CPU an index outside out/rows raises ValueError before anything is written; on CUDA
        (no host sync) such an index is skipped.

    Example:
        >>> out = torch.zeros(3, 2)
        >>> scatter_rows(out, torch.tensor([0, 2, 0]), torch.tensor([1, 0, 0]), torch.ones(2, 2),
        ...              torch.tensor([2, 2]))
        >>> out[:, 0].tolist()
        [1.0, 0.0, 1.0]
    """
    torch.ops.hps.scatter_rows.default(out, positions, inverse, rows, counts)


def bag_reduce(values: Tensor, offsets: Tensor, weights: Tensor | None = None, mode: str | int = "sum") -> Tensor:
    """Per-bag reduction of rows, as `embedding_bag` does after its gather.

    Bag b holds rows offsets[b] .. offsets[b + 1] - 1. With w_i the weights (1 without):
    sum = sum(w_i * v_i); mean = sum / sum(w_i); sqrtn = sum / sqrt(sum(w_i ** 2)). An empty bag, or a zero
    divisor, gives a zero row. Accumulation is float32 in element order on both devices, so CPU and CUDA agree
    bitwise.

    Args:
        values: (n, D) float32.
        offsets: (B + 1,) int64, non-decreasing, offsets[0] >= 0, offsets[B] == n (checked on CPU; on CUDA
            out-of-range offsets are clamped to [0, n] since checking would sync the host).
        weights: (n,) float32 or None.
        mode: "sum", "mean", "sqrtn" or their codes 0, 1, 2.

    Returns:
        (B, D) float32 on values' device.

    Example:
        >>> bag_reduce(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 2, 3]), mode="mean").flatten().tolist()
        [2.0, 5.0]
    """
    if isinstance(mode, str):
        if mode not in BAG_MODES:
            raise ValueError(f"mode must be one of {sorted(BAG_MODES)} (or 0, 1, 2), found {mode!r}")
        code = BAG_MODES[mode]
    elif isinstance(mode, int) and not isinstance(mode, bool):
        if mode not in BAG_MODES.values():
            raise ValueError(f"mode must be one of {sorted(BAG_MODES.values())} (or {sorted(BAG_MODES)}), found {mode}")
        code = mode
    else:
        raise TypeError(f"mode must be a str or an int, found {type(mode).__name__}")
    return torch.ops.hps.bag_reduce.default(values, offsets, weights, code)
