"""Typed Python wrappers over the lookup-pipeline ops `torch.ops.hps.{compact_misses, scatter_rows, bag_reduce}`,
each with its fake (meta) kernel.

The ops and their contract are declared in cuda_ext/csrc/hps_ops.cpp; the CPU twins live in
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

from hps_core._loader import load_extension

load_extension()

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


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (no data is read). They are registered by hps_core.ops (the module the
# extension names with m.set_python_module: torch requires the registration to come from there); the import at the
# end of this file makes sure that has happened whichever module is imported first.
# ----------------------------------------------------------------------------------------------------------------


def _compact_misses_fake(keys: Tensor, found: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    torch._check(keys.dim() == 1, lambda: f"keys must be 1-D, found shape {tuple(keys.shape)}")
    torch._check(keys.dtype in (torch.int32, torch.int64), lambda: f"keys must be int64 or int32, found {keys.dtype}")
    torch._check(found.dtype == torch.bool, lambda: f"found must have dtype torch.bool, found {found.dtype}")
    torch._check(
        found.dim() == 1 and found.shape[0] == keys.shape[0],
        lambda: f"found must have shape ({keys.shape[0]},), found {tuple(found.shape)}",
    )
    n = keys.shape[0]
    return (
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((n,), dtype=torch.int64),
        keys.new_empty((2,), dtype=torch.int64),
    )


def _scatter_rows_fake(out: Tensor, positions: Tensor, inverse: Tensor, rows: Tensor, counts: Tensor) -> None:
    torch._check(out.dim() == 2, lambda: f"out must be 2-D, found shape {tuple(out.shape)}")
    torch._check(rows.dim() == 2, lambda: f"rows must be 2-D, found shape {tuple(rows.shape)}")
    return None


def _bag_reduce_fake(values: Tensor, offsets: Tensor, weights: Tensor | None, mode: int) -> Tensor:
    torch._check(values.dim() == 2, lambda: f"values must be 2-D, found shape {tuple(values.shape)}")
    torch._check(offsets.dim() == 1, lambda: f"offsets must be 1-D, found shape {tuple(offsets.shape)}")
    torch._check(0 <= mode <= 2, lambda: f"mode must be 0 (sum), 1 (mean) or 2 (sqrtn), found {mode}")
    return values.new_empty((offsets.shape[0] - 1, values.shape[1]))


FAKE_KERNELS = {
    "compact_misses": _compact_misses_fake,
    "scatter_rows": _scatter_rows_fake,
    "bag_reduce": _bag_reduce_fake,
}

from hps_core import ops as _ops  # noqa: E402,F401  (registers FAKE_KERNELS; see above)
