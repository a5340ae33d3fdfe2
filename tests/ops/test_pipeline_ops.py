"""The lookup-pipeline ops (compact_misses, scatter_rows, bag_reduce) against numpy references, on every device.

compact_misses is checked against np.unique over the miss positions; scatter_rows against a plain loop; bag_reduce
against a float64 numpy reduction (and against torch.nn.functional.embedding_bag for sum/mean without weights).
Every op also goes through torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hps_core import pipeline_ops
from hps_core.testing import KEY_DTYPES, device_params

from op_builders import make_bags

DEVICES = device_params()
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def extremes(dtype: torch.dtype) -> list[int]:
    if dtype == torch.int32:
        return [I32_MIN, I32_MAX, 0, -1, 1, I32_MIN + 1, I32_MAX - 1]
    return [I64_MIN, I64_MAX, I32_MIN, I32_MAX, 0, -1, 1, I64_MIN + 1, I64_MAX - 1]


def random_keys(rng: np.random.Generator, n: int, dtype: torch.dtype, pool: int | None = None) -> torch.Tensor:
    """n keys over the dtype's full range; with `pool`, drawn from `pool` distinct values (many duplicates)."""
    info = torch.iinfo(dtype)
    if pool is None:
        arr = rng.integers(info.min, info.max, size=n, dtype=np.int64, endpoint=True)
    else:
        values = rng.integers(info.min, info.max, size=pool, dtype=np.int64, endpoint=True)
        arr = values[rng.integers(0, pool, size=n)]
    return torch.from_numpy(arr).to(dtype)


# ------------------------------------------------------------------------------------------------ compact_misses


def compact_reference(keys: torch.Tensor, found: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = keys.cpu().numpy().astype(np.int64)
    positions = np.flatnonzero(~found.cpu().numpy())
    unique, inverse = np.unique(k[positions], return_inverse=True)
    return unique, positions, inverse.reshape(-1)


def check_compact(keys: torch.Tensor, found: torch.Tensor) -> None:
    unique, positions, inverse, counts = pipeline_ops.compact_misses(keys, found)
    n = keys.numel()
    for name, t in (("unique_keys", unique), ("positions", positions), ("inverse", inverse)):
        assert t.dtype == torch.int64 and t.shape == (n,) and t.device == keys.device, name
    assert counts.dtype == torch.int64 and counts.shape == (2,) and counts.device == keys.device
    eu, ep, ei = compact_reference(keys, found)
    misses, n_unique = counts.tolist()
    assert (misses, n_unique) == (len(ep), len(eu))
    np.testing.assert_array_equal(unique[:n_unique].cpu().numpy(), eu)
    np.testing.assert_array_equal(positions[:misses].cpu().numpy(), ep)
    np.testing.assert_array_equal(inverse[:misses].cpu().numpy(), ei)
    # Tails past the counts are zero (documented; keeps the op deterministic on both devices).
    assert not unique[n_unique:].any() and not positions[misses:].any() and not inverse[misses:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
@pytest.mark.parametrize("case", ["zero", "no_misses", "all_misses", "duplicates", "extremes", "random"])
def test_compact_misses(device, dtype, case):
    rng = np.random.default_rng(sum(map(ord, case)))
    if case == "zero":
        keys = torch.empty(0, dtype=dtype)
        found = torch.empty(0, dtype=torch.bool)
    elif case == "no_misses":
        keys = random_keys(rng, 100, dtype)
        found = torch.ones(100, dtype=torch.bool)
    elif case == "all_misses":
        keys = random_keys(rng, 100, dtype)
        found = torch.zeros(100, dtype=torch.bool)
    elif case == "duplicates":
        keys = random_keys(rng, 300, dtype, pool=7)
        found = torch.from_numpy(rng.random(300) < 0.3)
    elif case == "extremes":
        ext = extremes(dtype)
        keys = torch.tensor(ext + ext[::-1] + ext, dtype=dtype)
        found = torch.from_numpy(rng.random(len(keys)) < 0.2)
    else:
        keys = random_keys(rng, 5000, dtype, pool=2000)
        found = torch.from_numpy(rng.random(5000) < 0.5)
    check_compact(keys.to(device), found.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compact_misses_int32_and_int64_keys_agree(device):
    keys = torch.tensor([-5, 3, -5, I32_MIN, 7], dtype=torch.int32)
    found = torch.tensor([False, True, False, False, False])
    a = pipeline_ops.compact_misses(keys.to(device), found.to(device))
    b = pipeline_ops.compact_misses(keys.to(torch.int64).to(device), found.to(device))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0][:3].tolist() == [I32_MIN, -5, 7]  # sign-extended, ascending


@pytest.mark.parametrize("device", DEVICES)
def test_compact_misses_bad_input(device):
    keys = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="found must have shape \\(4,\\)"):
        pipeline_ops.compact_misses(keys, torch.zeros(3, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="found must have dtype"):
        pipeline_ops.compact_misses(keys, torch.zeros(4, dtype=torch.uint8, device=device))
    with pytest.raises(TypeError, match="keys must be int64 or int32, found Float"):
        pipeline_ops.compact_misses(keys.float(), torch.zeros(4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="keys must be 1-D"):
        pipeline_ops.compact_misses(keys.view(2, 2), torch.zeros(4, dtype=torch.bool, device=device))


# -------------------------------------------------------------------------------------------------- scatter_rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 3, 16, 128])
def test_scatter_rows_after_compact(device, dim):
    rng = np.random.default_rng(dim)
    n = 400
    keys = random_keys(rng, n, torch.int64, pool=50).to(device)
    found = torch.from_numpy(rng.random(n) < 0.4).to(device)
    unique, positions, inverse, counts = pipeline_ops.compact_misses(keys, found)
    misses, n_unique = counts.tolist()
    hits = torch.randn(n, dim, device=device) * found.unsqueeze(1)
    rows = torch.randn(n_unique, dim, device=device)
    out = hits.clone()
    pipeline_ops.scatter_rows(out, positions, inverse, rows, counts)
    # Every miss position holds the row of its key; hits are untouched.
    expected = hits.cpu().clone()
    key_row = {int(k): rows[j].cpu() for j, k in enumerate(unique[:n_unique].tolist())}
    for p in np.flatnonzero(~found.cpu().numpy()):
        expected[p] = key_row[int(keys[p])]
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_rows_zero_misses_changes_nothing(device):
    out = torch.randn(5, 4, device=device)
    before = out.clone()
    empty = torch.zeros(5, dtype=torch.int64, device=device)
    pipeline_ops.scatter_rows(out, empty, empty, torch.randn(0, 4, device=device),
                              torch.zeros(2, dtype=torch.int64, device=device))
    assert torch.equal(out, before)
    pipeline_ops.scatter_rows(torch.empty(0, 4, device=device), empty[:0], empty[:0],
                              torch.randn(0, 4, device=device), torch.zeros(2, dtype=torch.int64, device=device))


def test_scatter_rows_bad_input_raises_and_changes_nothing():
    out = torch.zeros(3, 2)
    rows = torch.ones(2, 2)
    pos = torch.tensor([0, 5, 1])
    inv = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="positions\\[1\\] must be in \\[0, 3\\), found 5"):
        pipeline_ops.scatter_rows(out, pos, inv, rows, torch.tensor([3, 2]))
    assert not out.any()
    with pytest.raises(ValueError, match="inverse\\[0\\] must be in \\[0, 2\\), found 7"):
        pipeline_ops.scatter_rows(out, torch.tensor([0, 1]), torch.tensor([7, 0]), rows, torch.tensor([2, 2]))
    assert not out.any()
    with pytest.raises(ValueError, match="counts\\[0\\] \\(misses\\) must be in \\[0, 3\\], found 4"):
        pipeline_ops.scatter_rows(out, pos, inv, rows, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="counts must have shape \\(2,\\)"):
        pipeline_ops.scatter_rows(out, pos, inv, rows, torch.tensor([1]))
    with pytest.raises(ValueError, match="rows dim must equal out dim 2, found 3"):
        pipeline_ops.scatter_rows(out, pos, inv, torch.ones(2, 3), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="out must have dtype Float"):
        pipeline_ops.scatter_rows(out.double(), pos, inv, rows, torch.tensor([1, 1]))
    assert not out.any()


# ---------------------------------------------------------------------------------------------------- bag_reduce


def bag_reference(values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mode: str) -> np.ndarray:
    v = values.cpu().numpy().astype(np.float64)
    off = offsets.cpu().numpy()
    w = np.ones(v.shape[0]) if weights is None else weights.cpu().numpy().astype(np.float64)
    out = np.zeros((len(off) - 1, v.shape[1]))
    for b in range(len(off) - 1):
        lo, hi = off[b], off[b + 1]
        s = (w[lo:hi, None] * v[lo:hi]).sum(axis=0)
        if mode == "sum":
            out[b] = s
            continue
        div = w[lo:hi].sum() if mode == "mean" else np.sqrt((w[lo:hi] ** 2).sum())
        out[b] = 0.0 if hi == lo or div == 0 else s / div
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dim", [1, 3, 16, 128, 130])
def test_bag_reduce_matches_float64_reference(device, mode, weighted, dim):
    rng = np.random.default_rng(dim * 7 + weighted)
    values, offsets, weights = make_bags(rng, 40, dim, weighted)
    w = None if weights is None else weights.to(device)
    out = pipeline_ops.bag_reduce(values.to(device), offsets.to(device), w, mode)
    assert out.shape == (40, dim) and out.dtype == torch.float32 and out.device.type == torch.device(device).type
    np.testing.assert_allclose(out.cpu().numpy(), bag_reference(values, offsets, weights, mode), rtol=1e-5, atol=1e-5)
    assert not out[0].any()  # the empty bag
    if weighted and mode != "sum":
        assert not out[1].any()  # the zero-weight bag


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_reduce_matches_embedding_bag(device, mode):
    rng = np.random.default_rng(3)
    values, offsets, _ = make_bags(rng, 25, 16, weighted=False)
    values, offsets = values.to(device), offsets.to(device)
    ours = pipeline_ops.bag_reduce(values, offsets, None, mode)
    indices = torch.arange(values.shape[0], device=device)
    theirs = F.embedding_bag(indices, values, offsets, mode=mode, include_last_offset=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bag_reduce_edge_shapes(device):
    v = torch.randn(0, 4, device=device)
    assert pipeline_ops.bag_reduce(v, torch.zeros(1, dtype=torch.int64, device=device)).shape == (0, 4)
    out = pipeline_ops.bag_reduce(v, torch.zeros(3, dtype=torch.int64, device=device), mode="mean")
    assert out.shape == (2, 4) and not out.any()
    assert pipeline_ops.bag_reduce(torch.randn(3, 0, device=device), torch.tensor([0, 3], device=device)).shape == (1, 0)


def test_bag_reduce_bad_input():
    v = torch.randn(4, 2)
    with pytest.raises(ValueError, match="offsets\\[B\\] must equal the number of values 4, found 3"):
        pipeline_ops.bag_reduce(v, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="offsets must be non-decreasing, found offsets\\[0\\]=2 > offsets\\[1\\]=1"):
        pipeline_ops.bag_reduce(v, torch.tensor([2, 1, 4]))
    with pytest.raises(ValueError, match="offsets\\[0\\] must be >= 0, found -1"):
        pipeline_ops.bag_reduce(v, torch.tensor([-1, 4]))
    with pytest.raises(ValueError, match="weights must have shape \\(4,\\), found \\[3\\]"):
        pipeline_ops.bag_reduce(v, torch.tensor([0, 4]), torch.ones(3))
    with pytest.raises(TypeError, match="weights must have dtype Float"):
        pipeline_ops.bag_reduce(v, torch.tensor([0, 4]), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode must be one of \\['mean', 'sqrtn', 'sum'\\]"):
        pipeline_ops.bag_reduce(v, torch.tensor([0, 4]), mode="max")
    with pytest.raises(ValueError, match="mode must be 0 \\(sum\\), 1 \\(mean\\) or 2 \\(sqrtn\\), found 5"):
        torch.ops.hps.bag_reduce(v, torch.tensor([0, 4]), None, 5)
    with pytest.raises(TypeError, match="mode must be a str or an int"):
        pipeline_ops.bag_reduce(v, torch.tensor([0, 4]), mode=1.0)


# ------------------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_opcheck_compact_misses(device, dtype):
    rng = np.random.default_rng(0)
    keys = random_keys(rng, 64, dtype, pool=10).to(device)
    found = torch.from_numpy(rng.random(64) < 0.5).to(device)
    torch.library.opcheck(torch.ops.hps.compact_misses.default, (keys, found))
    torch.library.opcheck(torch.ops.hps.compact_misses.default, (keys[:0], found[:0]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_scatter_rows(device):
    keys = torch.tensor([4, 1, 4, 9, 1, 2], device=device)
    found = torch.tensor([False, True, False, False, True, False], device=device)
    _, positions, inverse, counts = pipeline_ops.compact_misses(keys, found)
    rows = torch.randn(3, 8, device=device)
    out = torch.zeros(6, 8, device=device)
    torch.library.opcheck(torch.ops.hps.scatter_rows.default, (out, positions, inverse, rows, counts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck_bag_reduce(device, weighted, mode):
    rng = np.random.default_rng(mode)
    values, offsets, weights = make_bags(rng, 6, 8, weighted)
    w = None if weights is None else weights.to(device)
    torch.library.opcheck(torch.ops.hps.bag_reduce.default, (values.to(device), offsets.to(device), w, mode))
