"""gather_rows (the uvm table mode's gather) against numpy indexing, for every way host rows can travel to a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hps_core.ops import gather_rows

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def reference(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    t, r = table.cpu().numpy(), rows.cpu().numpy()
    out = np.zeros((r.size, t.shape[1]), dtype=np.float32)
    ok = (r >= 0) & (r < t.shape[0])
    out[ok] = t[r[ok]]
    return torch.from_numpy(out)


def ids(n: int, num_rows: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    r = rng.integers(0, num_rows, size=n)
    r[::97] = -1  # outside the table: zero rows
    r[1::89] = num_rows
    return torch.from_numpy(r.astype(np.int64))


@pytest.mark.parametrize("strategy", ["auto", "zero_copy", "staged"])
def test_cpu_matches_numpy(strategy):
    table = torch.randn(1000, 24)
    rows = ids(5000, 1000)
    assert torch.equal(gather_rows(table, rows, strategy), reference(table, rows))


def test_compiles_fullgraph():
    """gather_rows' fake kernel lets a function using it be traced whole (aot_eager: no C++ compile in the test)."""

    def f(table, rows):
        return gather_rows(table, rows) * 2

    table, rows = torch.randn(50, 8), ids(300, 50)
    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(table, rows), f(table, rows))


def test_bad_strategy_raises():
    with pytest.raises(ValueError, match="strategy must be one of"):
        gather_rows(torch.zeros(2, 2), torch.tensor([0]), "fast")
    with pytest.raises(ValueError, match="strategy must be 0"):
        torch.ops.hps.gather_rows(torch.zeros(2, 2), torch.tensor([0]), 7)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("strategy", ["auto", "zero_copy", "staged"])
@pytest.mark.parametrize("dim,n", [(128, 200_000), (16, 3000), (7, 1000)])
def test_cuda_host_table_matches_numpy(pinned, strategy, dim, n):
    table = torch.randn(50_000, dim)
    if pinned:
        table = table.pin_memory()
    rows = ids(n, 50_000).cuda()
    if strategy == "zero_copy" and not pinned:
        with pytest.raises(ValueError, match="pinned host memory"):
            gather_rows(table, rows, strategy)
        return
    out = gather_rows(table, rows, strategy)
    assert out.device == rows.device
    assert torch.equal(out.cpu(), reference(table, rows))


@pytest.mark.cuda
@CUDA
def test_cuda_device_table_and_empty():
    table = torch.randn(300, 32, device="cuda")
    rows = ids(2000, 300).cuda()
    assert torch.equal(gather_rows(table, rows).cpu(), reference(table, rows))
    assert gather_rows(table.cpu().pin_memory(), rows[:0], "staged").shape == (0, 32)
